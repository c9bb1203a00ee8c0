"""The public Python API; every CLI command is a thin wrapper over one function here.

    import quantkit.api as qk
    qk.inspect("model.gguf")
    qk.quantize("model.gguf", "out.gguf", format="gguf:q4_0")
    qk.quantize("model.gguf", "out.gguf", format="gguf:q4_0+gptq", nsamples=64)
    qk.quantize_gpu("model_dir", "out_dir", format="gptq:w4g128+gptq")
    qk.quantize_gpu("model_dir", "out_dir", recipe=quantkit.recipe.from_flags("gptq", "gptq", bits=3))

What to make is a recipe (quantkit.recipe): a string such as "gguf:q4_0+gptq", or a Recipe.

Functions that read language models take `trust_pickle` (default False): a Hugging Face directory
whose weights are pytorch_model*.bin (pickles) is refused unless it is True.
"""

from __future__ import annotations

import os
from typing import Any

from .common import QuantizeResult, open_model, pickle_opt_in  # noqa: F401
from .quantize import ImatrixResult, imatrix, quantize, quantize_budget, quantize_gpu  # noqa: F401


@pickle_opt_in
def inspect(model=None) -> dict[str, Any]:
    """Architecture, parameter count, tensors (name, shape, type, bytes), bits per weight, tokenizer,
    what the model is and what quantkit can do with it ("model"), and for a vision-language
    directory its vision tower ("vision": models.vision.describe_vision)."""
    from ..models.arch import describe
    src = open_model(model)
    tensors = [{"name": t.name, "shape": list(t.shape), "type": t.type, "bytes": t.nbytes} for t in src.tensors()]
    n_params = sum(t.n_elements for t in src.tensors())
    n_bytes = sum(t.nbytes for t in src.tensors())
    path = src.path
    file_bytes = os.path.getsize(path) if os.path.isfile(path) else None
    types: dict[str, int] = {}
    for t in src.tensors():
        types[t.type] = types.get(t.type, 0) + 1
    linear = [t for t in src.tensors() if len(t.shape) >= 2 and t.name.startswith("blk.")]
    lin_params = sum(t.n_elements for t in linear)
    return {
        "path": path,
        "format": "gguf" if file_bytes is not None else "hf",
        "architecture": src.spec.to_dict(),
        "parameters": n_params,
        "tensor_bytes": n_bytes,
        "file_bytes": file_bytes,
        "bits_per_weight": 8 * n_bytes / n_params if n_params else 0.0,
        "bits_per_weight_linear": 8 * sum(t.nbytes for t in linear) / lin_params if lin_params else 0.0,
        "types": types,
        "tokenizer": {"model": src.tokenizer.model, "pre": src.tokenizer.pre, "n_tokens": src.tokenizer.n_tokens},
        "model": describe(src.spec.arch, getattr(src, "hf_arch", None), getattr(src, "config", None),
                          src.spec.n_expert, src.spec.n_expert_used),
        "tensors": tensors,
        "vision": _describe_vision(path) if file_bytes is None else None,
    }


def _describe_vision(path):
    from ..models.vision import describe_vision
    return describe_vision(path)


DEMO_PROMPT = "The capital of France is"


DEMO_TEXT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "wikitext2-test-excerpt.txt")


DEMO_LADDER = ("q8_0", "q5_0", "q4_0", "q4_0+gptq", "iq4_xs", "q3_k_m")


def demo(out_dir: str | os.PathLike | None = None, file_types=DEMO_LADDER, prompt: str = DEMO_PROMPT,
         max_tokens: int = 24, show_progress: bool = True, eval_chunks: int = 4,
         eval_ctx: int = 256, calib: str | None = None, nsamples: int | None = None,
         seqlen: int | None = None, n_threads: int | None = None, imatrix: str | None = None) -> list:
    """The main job: a ladder of the bundled model (default Q8_0, Q5_0, Q4_0 RTN, Q4_0 GPTQ,
    IQ4_XS, Q3_K_M; a rung "TYPE+gptq" is GPTQ onto the same llama.cpp type, calibrated on the WikiText-2
    *valid* excerpt shipped with quantkit, 16 x 256 tokens (recipe.LADDER_CALIBRATION), or
    `calib`, `nsamples` x `seqlen`), each run in llama.cpp on a
    short prompt and scored against the F32 reference on a short text (perplexity, KL divergence,
    top-1 agreement; `eval_chunks` x `eval_ctx` tokens of the WikiText-2 *test* excerpt shipped
    with quantkit; 0 chunks skips it). An IQ rung ("iq4_xs") is round-to-nearest with an
    importance matrix: `imatrix` (a file), else one computed from the same calibration. Files go
    to `out_dir` (written afresh), or (None) come
    from quantkit's ladder cache, so a rerun re-uses them. One eval.results.DemoRow per rung; the HTML report is
    out_dir/report.html (or ~/.cache/quantkit/demo/report.html). `n_threads`: llama.cpp's threads
    (default: up to 2)."""
    from ..eval.ladder import build_rungs, label_ladder, ladder_types
    from ..eval.results import DemoRow
    from ..runtimes.llama_cpp import LlamaCpp
    from ..models.bundled import bundled_path, cache_dir
    from ..util.progress import progress
    cal = _ladder_calibration(calib, nsamples, seqlen, imatrix)
    if out_dir is not None:
        from ..util.atomic import check_output
        check_output(out_dir, directory=True, flag="--out-dir")
    report_dir = os.fspath(out_dir or os.path.join(cache_dir(), "demo"))
    types = ladder_types(list(file_types))          # (an unknown rung is refused before any folder is made)
    os.makedirs(report_dir, exist_ok=True)
    rungs = build_rungs(None, types, None if out_dir is None else report_dir,
                        show_progress=show_progress, calibration=cal,
                        stem=None if out_dir is None else "gemma-3-270m")
    rows = []
    for rg in rungs:
        info = inspect(rg.path)
        with progress(total=2, desc=f"llama.cpp {rg.label}: load, generate", disable=not show_progress) as bar:
            rt = LlamaCpp(rg.path, n_ctx=256, n_threads=n_threads or min(2, os.cpu_count() or 1))
            bar.update()
            try:
                gen = rt.generate(prompt, max_tokens=max_tokens)
            finally:
                rt.close()
            bar.update()
        rows.append(DemoRow(format=rg.file_type.upper(), method=rg.method.upper(), rung=rg.label,
                            file=rg.path, file_bytes=info["file_bytes"],
                            bits_per_weight=info["bits_per_weight"], quantize_s=None if rg.reused else rg.seconds,
                            reused=rg.reused, calibration=rg.calibration,
                            load_s=gen.load_s, prompt_tok_s=gen.prompt_tok_s, gen_tok_s=gen.gen_tok_s,
                            threads=gen.n_threads, output=gen.text))
    if eval_chunks > 0 and rows:
        from ..eval.report import write_report
        # the bundled file first: its F32 dequantization is the reference, and it is scored beside its rungs
        result = evaluate([bundled_path(), *(r.file for r in rows)], text=DEMO_TEXT, n_chunks=eval_chunks,
                          n_ctx=eval_ctx, n_threads=n_threads, speed=False, show_progress=show_progress)
        label_ladder(result, rungs)
        result.meta["command"] = "quantkit demo"
        scored = {os.path.abspath(r.path): r for r in result.rows if not r.is_reference}
        ref = next((r for r in result.rows if r.is_reference), None)
        report = write_report(result, os.path.join(report_dir, "report.html"))
        for r in rows:
            q = scored.get(os.path.abspath(r.file))
            if q is not None:
                r.ppl, r.kld, r.top1 = q.ppl, q.kld_mean, q.top1_agreement
            r.ref_ppl, r.report, r.eval_tokens = ref and ref.ppl, report, f"{eval_chunks} x {eval_ctx}"
    return rows


def load_encoder(path=None):
    """Load a BERT-family encoder directory, fp32 or dynamic-int8 (None = bundled MiniLM)."""
    from ..quant.dynamic import open_encoder
    return open_encoder(path)


def quantize_dynamic(model, output, quantize_embeddings: bool = False, kernel: str = "auto") -> dict:
    """Dynamic INT8 for a BERT-family encoder: int8 linear weights per output channel
    (optionally int8 embeddings), activations quantized per row at run time. Writes `output`
    (a directory: safetensors + quantkit.json + tokenizer) atomically; returns a summary."""
    from ..quant import int8_kernels
    from ..quant.dynamic import DynamicInt8Config, open_encoder, quantize_encoder_, state_dict_bytes
    from ..models.encoder import save_encoder
    from ..util.atomic import check_output
    from ..util.errors import QuantkitError
    import torch

    check_output(output, [model], directory=True)
    enc = open_encoder(model)
    if enc.meta.quantization:
        raise QuantkitError("model is already quantized", model, "start from the fp32 model")
    before = state_dict_bytes(enc)
    lin_before = sum(m.weight.numel() * m.weight.element_size() for n, m in enc.named_modules()
                     if isinstance(m, torch.nn.Linear) and not n.startswith("head"))
    quantize_encoder_(enc, DynamicInt8Config(quantize_embeddings=quantize_embeddings, kernel=kernel))
    mods = enc.meta.quantization["modules"]
    lin_after = sum(m.weight_int8.numel() + m.weight_scale.numel() * 4 for n, m in enc.named_modules()
                    if n in mods and mods[n] == "linear")
    save_encoder(enc, output)
    return {"output": str(output), "modules": len(mods),
            "linear": sum(v == "linear" for v in mods.values()),
            "embedding": sum(v == "embedding" for v in mods.values()),
            "bytes_before": before, "bytes_after": state_dict_bytes(enc),
            "linear_bytes_before": lin_before, "linear_bytes_after": lin_after,
            "kernel": int8_kernels.resolve_kernel(kernel)}


def plan(model, **options):
    """Memory, fit and speed of MODEL (a .gguf, .safetensors, HF directory or built-in name);
    options are quantkit.plan.planner.PlanOptions fields (devices=["rtx-3060"], n_ctx=4096, ...);
    runtime="llama-cpp-python" or "llama-server" plans that front end's resident memory (its
    defaults: the server's 4 slots, unified cache, flash attention and context checkpoint)."""
    from ..plan.planner import PlanOptions, plan as _plan
    return _plan(model, PlanOptions(**options))


def explain(name: str):
    """What a model name says: method, bits, group size, file format, runtime, sizes."""
    from ..plan.names import explain as _explain
    return _explain(name)


def distill(**options) -> dict:
    """Fine-tune or distil a BERT-family encoder. Options are the fields of
    quantkit.distill.trainer.DistillConfig: objective ("finetune" | "kd" | "embed"), teacher,
    train, output, dev, num_layers / layers / hidden / student, temperature, alpha,
    relation_weight, augment, epochs / max_steps, ... Returns a summary dict (losses, dev
    accuracy or cosine, sizes); the model is written to `output` atomically."""
    from ..distill.trainer import DistillConfig, distill as _distill
    from ..util.errors import QuantkitError

    unknown = sorted(set(options) - set(DistillConfig.__dataclass_fields__))
    if unknown:
        raise QuantkitError(f"unknown distill option(s): {', '.join(unknown)}")
    from ..util.atomic import check_output
    inputs = [options.get(k) for k in ("teacher", "train", "dev", "student")]
    for key, flag in (("output", "-o"), ("checkpoint_dir", "--checkpoint-dir")):
        if options.get(key):
            check_output(options[key], inputs, directory=True, flag=flag)
    return _distill(DistillConfig(**options))


@pickle_opt_in
def evaluate(models=None, ray=None, workers=None, **options):
    """Score MODELS (paths; None = the bundled model) on the same token ids against one
    reference: perplexity (llama.cpp's protocol), KL divergence, top-1 agreement, size, bits per
    weight, load time, tokens/s, peak RSS. Options are quantkit.eval.options.EvalOptions fields
    (ref, text, n_chunks, n_ctx, n_threads, speed, speed_runs, cache, ...). The reference's
    log-probabilities are cached on disk, capped by `cache_max` (bytes or "4G"; CLI --cache-max;
    default $QUANTKIT_EVAL_CACHE_MAX or 4 GiB; least recently used deleted first). Encoder
    classifiers (BERT-family directories with a classification head) are scored by task accuracy
    instead: `task_data` (label<TAB>text file; CLI --task-data; default SST-2 dev), `task_limit`,
    `batch_size`. To quantize a model to a ladder of rungs (RTN types and GPTQ rungs such as
    "q4_0+gptq") and score them all, use eval_ladder(). Returns an EvalResult (.rows: typed rows, .meta,
    .to_json()); quantkit.eval.report.write_report(result, "out.html") renders it.
    `ray`: "local" (a local Ray runtime of `workers` CPUs) or a cluster's HOST:PORT runs every
    model as a Ray task (quantkit.eval.ray_eval); None runs here and never imports Ray."""
    from ..eval.evaluate import EvalOptions, evaluate as _evaluate
    from ..util.errors import QuantkitError

    unknown = sorted(set(options) - set(EvalOptions.__dataclass_fields__))
    if unknown:
        raise QuantkitError(f"unknown eval option(s): {', '.join(unknown)}")
    if models is None or isinstance(models, (str, os.PathLike)):
        models = [models]
    if ray is not None:
        from ..eval.ray_eval import Job, evaluate_on_ray
        return evaluate_on_ray([Job(_specs(models))], EvalOptions(**options), ray, workers)[0]
    return _evaluate(list(models), EvalOptions(**options))


def _specs(models) -> list[str]:
    """Model arguments (None: the bundled model) as normalized specs, each checked to exist."""
    from ..models.bundled import bundled_path
    from ..runtimes import normalize_spec, split_spec
    from ..util.errors import QuantkitError
    out = [normalize_spec(m) if m is not None else bundled_path() for m in models]
    for p in out:
        if not os.path.exists(split_spec(p)[0]):
            raise QuantkitError("no such file or directory", p, "give a .gguf file or a Hugging Face model directory")
    return out


def _ladder_calibration(calib, nsamples, seqlen, imatrix=None):
    """The ladder's calibration: the options given, the rest from recipe.LADDER_CALIBRATION;
    `imatrix`: an importance matrix file for the IQ rungs (None: computed from the calibration)."""
    from ..eval.ladder import GPTQCalibration
    from ..recipe import LADDER_CALIBRATION, Calibration
    c = Calibration(os.fspath(calib) if calib is not None else None,
                    LADDER_CALIBRATION.nsamples if nsamples is None else nsamples,
                    LADDER_CALIBRATION.seqlen if seqlen is None else seqlen)
    from ..util.validate import as_path
    return GPTQCalibration(c.file, c.nsamples, c.seqlen, None if imatrix is None else as_path(imatrix, "--imatrix"))


@pickle_opt_in
def eval_ladder(model=None, types=None, out_dir=None, calib=None, nsamples=None, seqlen=None, ray=None,
                workers=None, imatrix=None, **options):
    """Quantize MODEL to a ladder of GGUF rungs and evaluate the model and every rung against its
    F32 reference. Rungs are file types, quantized by llama.cpp's round-to-nearest ("q4_0"), or
    with GPTQ onto the same type ("q4_0+gptq"; recipe strings, see quantkit.recipe); default F16,
    Q8_0, Q5_0, Q4_1, Q4_0 RTN, Q4_0 GPTQ, the K-quants and IQ4_XS, IQ3_S, IQ2_M. GPTQ rungs calibrate
    on `calib` (any UTF-8 text; default: the WikiText-2 *valid* excerpt shipped with quantkit),
    `nsamples` x `seqlen` tokens (default: recipe.LADDER_CALIBRATION, 16 x 256); the
    calibration text must not be the scored one. IQ rungs ("iq4_xs") are round-to-nearest with
    an importance matrix: `imatrix` (an imatrix file), else one computed from that calibration.
    Rungs are cached in quantkit's cache (keyed by source, type, method and calibration) unless
    `out_dir` is given. Each row carries its rung ("Q4_0 GPTQ") and method. `ray` and `workers`:
    each rung built and scored as a Ray task, as in evaluate()."""
    from ..eval.ladder import build_rungs, label_ladder, ladder_types, parse_rung, uses_imatrix
    from ..quant.budget import split_budget_rung
    from ..eval.lm import default_text
    from ..util.errors import QuantkitError

    names = ladder_types(types)
    cal = _ladder_calibration(calib, nsamples, seqlen, imatrix)
    if out_dir is not None:
        from ..util.atomic import check_output
        check_output(out_dir, directory=True, flag="--ladder-dir")
    iq = any(uses_imatrix(parse_rung(n)[0]) for n in names)
    if iq:
        cal.check_imatrix()
    if any(parse_rung(n)[1] == "gptq" for n in names) or (iq and cal.imatrix is None):
        cal.check()
        scored = options.get("text") or default_text()
        if os.path.isfile(scored) and os.path.samefile(scored, cal.path):
            raise QuantkitError("the ladder's calibration text (GPTQ rungs, IQ rungs' importance matrix) is the "
                                "scored text", cal.path,
                                "calibrate on other text (--calib FILE), e.g. wikitext-2 valid for a test-split eval")
    first = os.fspath(model) if model is not None else None
    if ray is not None:
        from ..eval.evaluate import EvalOptions
        from ..eval.ray_eval import Job, evaluate_on_ray
        job = Job(_specs([first]), names, options.get("text"), os.path.abspath(out_dir) if out_dir else None, cal)
        return evaluate_on_ray([job], EvalOptions(**options), ray, workers)[0]
    rungs = build_rungs(model, names, out_dir, show_progress=options.get("show_progress", True), calibration=cal)
    result = label_ladder(evaluate([first, *[r.path for r in rungs]], **options), rungs)
    if out_dir is not None and any(split_budget_rung(r.file_type) for r in rungs):
        _provided_files(out_dir, rungs, result)
    return result


def _provided_files(out_dir, rungs, result) -> str:
    """README.md in a ladder's folder: the provided-files table (file, method, bits, size, the
    planner's peak RSS for llama.cpp on a CPU at its default context, KL divergence)."""
    from ..eval.model_card import MARK, provided_files, write_text
    kld = {os.path.abspath(r.path): r.kld_mean for r in result.rows}
    rows = []
    for r in rungs:
        from ..plan.model import load
        m = load(r.path)
        p = plan(m, formats=[m.stored_format] if m.stored_format else None)    # the file's own header bytes
        row = p.rows[0]
        rows.append({"file": os.path.basename(r.path), "method": r.label, "bytes": os.path.getsize(r.path),
                     "bpw": row.memory.weights * 8 / max(1, m.n_params), "max_ram": row.cpu_resident,
                     "kld": kld.get(os.path.abspath(r.path))})
    text = f"{MARK}\n\n## Provided files\n\nMax RAM: quantkit plan's peak resident memory for llama.cpp on a CPU " \
           f"at context {p.n_ctx}.\n\n" + provided_files(rows)
    return write_text(os.path.join(out_dir, "README.md"), text)


def eval_sweep(sweep, calib=None, nsamples=None, seqlen=None, ray=None, workers=None, imatrix=None, **options):
    """A grid of models x recipes x texts from a sweep file (YAML/JSON: models, recipes, texts;
    quantkit.eval.sweep) or a loaded Sweep: one section per model and text, each the result of
    eval_ladder(model, recipes, text=...). With `ray` every cell is a Ray task (the reference of
    each model and text passed once), else the sections run here one after another. Returns a
    SweepResult (.sections, .to_json(); quantkit.eval.sweep.write_sweep_report renders it)."""
    from ..eval.sweep import Sweep, SweepResult, load_sweep
    sw = sweep if isinstance(sweep, Sweep) else load_sweep(sweep)
    meta = {"sweep": sw.path, "models": sw.models, "recipes": sw.recipes, "texts": sw.texts}
    if ray is not None:
        from ..eval.evaluate import EvalOptions
        from ..eval.ray_eval import Job, evaluate_on_ray
        from ..eval.ladder import ladder_types
        names = ladder_types(sw.recipes)
        cal = _ladder_calibration(calib, nsamples, seqlen, imatrix)
        jobs = [Job(_specs([m]), names, t, None, cal) for m in sw.models for t in sw.texts]
        return SweepResult(evaluate_on_ray(jobs, EvalOptions(**options), ray, workers), meta)
    sections = [eval_ladder(m, sw.recipes, calib=calib, nsamples=nsamples, seqlen=seqlen, imatrix=imatrix, **{**options, "text": t or options.get("text")})
                for m in sw.models for t in sw.texts]
    return SweepResult(sections, meta)
