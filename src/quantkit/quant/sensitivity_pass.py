"""The calibration pass behind quant.sensitivity: the float model, the Hessian of every decoder
linear's input, the single-tensor KL probes, and (validate) a check of the estimate against
measured single-tensor changes. `measure_sensitivity` caches its result in quantkit's cache
(keyed by the model file, the calibration and the candidate types)."""

from __future__ import annotations

import hashlib
import os
import random
import time
from dataclasses import dataclass

import torch

from ..util.errors import QuantkitError
from ..util.progress import progress
from .gguf_policy import allows_quantization, tensor_order
from .sensitivity import (HEAD_NAMES, PROBE_SAMPLES, PROBE_TOKENS, Prober, Sensitivity, TensorCost, interp_scale,
                          candidate_types, linear_errors, probe_layers, roundtrip, spearman, tensor_class,
                          tensor_layer)

CACHE_VERSION = 1


@dataclass
class FloatModel:
    """A model in float32 with every decoder block loaded; `params` maps the GGUF names of its
    quantizable tensors (the embedding, an untied output head, every decoder linear) to their
    parameters, `groups` each decoder linear to the first linear of its input group (the ones
    that share one input, quant.pipeline.SEQUENTIAL_GROUPS) as (module, its GGUF name)."""
    model: object
    tokenizer: object
    base: object
    layers: list
    params: dict
    groups: dict
    tied: bool


def load_float_model(src, path: str) -> FloatModel:
    """`src` (opened from `path`) as a float32 transformers model with all its blocks loaded."""
    from ..models.arch import hf_to_gguf_name
    from .pipeline import SEQUENTIAL_GROUPS, decoder_layers
    from .streaming import block_loader, streaming_model
    model, tokenizer, arch, fetch = streaming_model(src, path)
    base, layers, prefix = decoder_layers(model)
    load = block_loader(fetch, path)
    for i, layer in enumerate(layers):
        load(i, f"{prefix}.{i}", layer)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is None or head.weight is emb.weight
    if not tied:
        w = fetch("lm_head.weight")
        if w is None:
            raise QuantkitError("the model has no output head tensor (lm_head.weight)", path)
        head.weight.data = w
    params: dict[str, torch.nn.Parameter] = {"token_embd.weight": emb.weight}
    if not tied:
        params["output.weight"] = head.weight
    groups = {}
    for i, layer in enumerate(layers):
        lin = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        for g in SEQUENTIAL_GROUPS:
            members = [n for n in g if n in lin]
            for n in members:
                g_name = hf_to_gguf_name(arch, f"{prefix}.{i}.{n}.weight")
                params[g_name] = lin[n].weight
                groups[g_name] = (lin[members[0]], f"{prefix}.{i}.{members[0]}")
    return FloatModel(model, tokenizer, base, list(layers), params, groups, tied)


class SensitivityPass:
    """The float model of `src` with its calibration Hessians and probe references."""

    def __init__(self, src, path: str, calib: str | None, nsamples: int, seqlen: int, show_progress: bool = True):
        from .calib import calibration_ids
        from .gptq import accumulate_hessian, new_hessian, symmetrize_hessian

        self.src, self.path, self.show_progress = src, path, show_progress
        fm = load_float_model(src, path)
        model, tokenizer, base, layers = fm.model, fm.tokenizer, fm.base, fm.layers
        emb = model.get_input_embeddings()
        self.tied, self.model, self.n_layer, self.params = fm.tied, model, len(layers), fm.params
        self.hessian_of: dict[str, torch.Tensor] = {}
        hooks, counts = [], {}
        hs: dict[str, torch.Tensor] = {}

        def hook(key):
            def fn(mod, inp):
                counts[key] = accumulate_hessian(inp[0], hs[key], counts.get(key, 0), upper=True)
            return fn

        for g_name, (first, key) in fm.groups.items():
            if key not in hs:
                hs[key] = new_hessian(first.in_features)
                hooks.append(first.register_forward_pre_hook(hook(key)))
            self.hessian_of[g_name] = hs[key]
        self.ids = calibration_ids(tokenizer, calib, nsamples, seqlen)
        del tokenizer
        self.token_counts = torch.bincount(self.ids.reshape(-1), minlength=emb.num_embeddings)
        bar = progress(total=len(self.ids), desc="sensitivity: Hessians", unit="sample",
                       leave=False) if show_progress else None
        try:
            with torch.no_grad():
                for row in self.ids:
                    base(input_ids=row[None], use_cache=False)      # no output head: it is probed
                    if bar is not None:
                        bar.update(1)
        finally:
            for h in hooks:
                h.remove()
            if bar is not None:
                bar.close()
        for H in hs.values():
            symmetrize_hessian(H)
        self.prober = Prober(model, self.ids[:PROBE_SAMPLES, :PROBE_TOKENS], layers)

    def tensors(self) -> tuple[dict, dict, list[str]]:
        """(quantizable tensors: name -> shape, fixed: name -> (shape, type), order)."""
        from ..models.gguf import GGUFSource
        infos = {t.name: t for t in self.src.tensors()}
        order = tensor_order(list(infos))
        is_gguf = isinstance(self.src, GGUFSource)
        quant, fixed = {}, {}
        for n in order:
            shape = tuple(int(s) for s in infos[n].shape)
            src_type = infos[n].type if is_gguf else "f32"
            if not allows_quantization(n, len(shape)):
                fixed[n] = (shape, src_type)
            elif n in self.params and candidate_types(shape):
                quant[n] = shape
            else:                   # quantizable, but no estimate: Q8_0 where it fits, else F16
                fixed[n] = (shape, "q8_0" if shape[-1] % 32 == 0 else "f16")
        return quant, fixed, order

    def _roundtrip(self, t: str, w: torch.Tensor) -> torch.Tensor:
        return w.half().float() if t == "f16" else roundtrip(t, w)

    def probe(self, name: str, t: str) -> float:
        p = self.params[name]
        return self.prober.kl({p: self._roundtrip(t, p.data)}, tensor_layer(name))

    # Several kinds of step with one progress bar between them; one function reads as the recipe.
    def measure(self, probes_per_class: int = 3, types=None) -> Sensitivity:
        """`types`: the candidate types (None: all, quant.sensitivity.candidate_types)."""
        t0 = time.perf_counter()
        quant, fixed, order = self.tensors()
        for n in [n for n, s in quant.items() if not candidate_types(s, types)]:
            s = quant.pop(n)                # no candidate allowed: Q8_0 where it fits, else F16 (as tensors())
            fixed[n] = (s, "q8_0" if s[-1] % 32 == 0 else "f16")
        linears = [n for n in quant if n not in HEAD_NAMES]
        heads = [n for n in quant if n in HEAD_NAMES]
        errors = {}
        bar = progress(total=len(linears) + len(heads), desc="sensitivity: errors and probes", unit="tensor",
                       leave=False) if self.show_progress else None
        for n in linears:
            errors[n] = linear_errors(self.params[n].data, self.hessian_of[n], candidate_types(quant[n], types))
            if bar is not None:
                bar.update(0.5)
        probes, scales = [], {}
        by_class: dict[str, dict[int, str]] = {}
        for n in linears:
            by_class.setdefault(tensor_class(n), {})[tensor_layer(n) or 0] = n
        for cls, at in sorted(by_class.items()):
            layers = sorted(at)
            want = probe_layers(len(layers), probes_per_class)
            pts = []
            for k in want:
                n = at[layers[k]]
                t = candidate_types(quant[n], types)[-1]
                kl, err = self.probe(n, t), errors[n][t]
                probes.append({"tensor": n, "type": t, "kl": kl, "err": err})
                pts.append((layers[k], max(kl, 1e-12) / max(err, 1e-30)))
            scales[cls] = pts
        tensors = {}
        for n in linears:
            cls, layer = tensor_class(n), tensor_layer(n) or 0
            s = interp_scale(scales[cls], layer)
            tensors[n] = TensorCost(quant[n], cls, layer, {t: s * e for t, e in errors[n].items()}, errors[n])
            if bar is not None:
                bar.update(0.5)
        for n in heads:
            costs = {}
            for t in candidate_types(quant[n], types):
                costs[t] = 0.0 if t == "f16" else self.probe(n, t)
                probes.append({"tensor": n, "type": t, "kl": costs[t], "err": None})
            tensors[n] = TensorCost(quant[n], tensor_class(n), None, costs)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return Sensitivity(tensors, fixed, order, scales, probes,
                           {"seconds_probes": time.perf_counter() - t0, "tied_embeddings": self.tied,
                            "probe_tokens": int(self.prober.ids.numel())})

    def validate(self, sens: Sensitivity, n: int = 32, seed: int = 0) -> dict:
        """Spearman correlation of estimated vs measured KL over `n` random single-tensor changes
        (decoder linears, quantized types, none of the probes the scales came from)."""
        used = {(p["tensor"], p["type"]) for p in sens.probes}
        pool = [(name, t) for name, c in sens.tensors.items() if c.cls not in ("token_embd", "output")
                for t in c.costs if t != "f16" and (name, t) not in used]
        rng = random.Random(seed)
        sample = rng.sample(pool, min(n, len(pool)))
        pred, meas = [], []
        for name, t in sample:
            pred.append(sens.tensors[name].costs[t])
            meas.append(self.probe(name, t))
        rho = spearman(pred, meas) if len(sample) >= 2 else float("nan")
        return {"spearman": rho, "n": len(sample),
                "pairs": [{"tensor": a, "type": t, "predicted": p, "measured": m}
                          for (a, t), p, m in zip(sample, pred, meas)]}


def cache_path(path: str, calib: str | None, nsamples: int, seqlen: int, types=None) -> str:
    """Where measure_sensitivity keeps its result for this model and calibration."""
    from ..models.bundled import cache_dir
    from .sensitivity import candidate_types as ct
    files = [path] if os.path.isfile(path) else sorted(os.path.join(path, f) for f in os.listdir(path))
    stats = [(f, os.stat(f).st_size, int(os.stat(f).st_mtime)) for f in files if os.path.isfile(f)]
    key = repr((CACHE_VERSION, os.path.abspath(path), stats, calib and os.path.abspath(calib),
                nsamples, seqlen, PROBE_SAMPLES, PROBE_TOKENS, ct((1, 3 * 256 * 32), types)))
    return os.path.join(cache_dir(), "sensitivity", hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")


def measure_sensitivity(src, path: str, *, calib: str | None = None, nsamples: int = 16, seqlen: int = 512,
                        show_progress: bool = True, cache: bool = True, types=None) -> Sensitivity:
    """Sensitivity of `src` (opened from `path`), calibrated on nsamples x seqlen tokens of
    `calib` (default wikitext-2 valid), over the candidate `types` (None: all); from quantkit's
    cache when the same pass ran before."""
    if types is not None:
        from ..codecs.registry import QTYPES
        bad = [t for t in types if t not in QTYPES]
        if bad or not types:
            raise QuantkitError(f"--types {','.join(types)}: {', '.join(bad) or 'no type'} is not a GGUF type quantkit "
                                "knows", hint="e.g. --types f16,q8_0,q6_k,q5_k,q4_k,q4_0")
        types = sorted(set(types))
    cp = cache_path(path, calib, nsamples, seqlen, types) if cache and os.path.exists(path) else None
    if cp is None:
        return _measure(src, path, calib, nsamples, seqlen, show_progress, None, types)
    import fcntl
    os.makedirs(os.path.dirname(cp), exist_ok=True)
    with open(cp + ".lock", "a") as lock:          # a second process waits, then reads the first one's result
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _measure(src, path, calib, nsamples, seqlen, show_progress, cp, types)


def _measure(src, path, calib, nsamples, seqlen, show_progress, cp, types=None) -> Sensitivity:
    if cp and os.path.isfile(cp):
        try:
            with open(cp, encoding="utf-8") as f:
                return Sensitivity.from_json(f.read())
        except (OSError, ValueError, KeyError):
            pass
    t0 = time.perf_counter()
    sp = SensitivityPass(src, path, calib, nsamples, seqlen, show_progress)
    sens = sp.measure(types=types)
    sens.meta.update({"seconds": time.perf_counter() - t0, "calib": calib, "nsamples": nsamples, "seqlen": seqlen})
    del sp
    if cp:
        from ..util.atomic import atomic_output
        try:
            with atomic_output(cp) as tmp, open(tmp, "w", encoding="utf-8") as f:
                f.write(sens.to_json())
        except OSError:
            pass
    return sens
