"""config.json of a GGUF model: the inverse of models.hf_meta.

Which transformers class a llama.cpp architecture becomes is read from arch.HF_ARCHS (the row
whose gguf architecture it is; among the rows sharing "llama", the one whose config class has
experts when the file has experts: Mixtral, else Llama); each GGUF key goes back to the
config.json key the forward direction reads it from (gguf-py's `Keys` templates, the row's
`MetaRow`s such as Granite's multipliers and Gemma-2's soft-capping). What the file stores in
a tensor comes back as a config value: llama-3's rope_freqs.weight as the llama3 rope
parameters that give the same factors, Phi-3's rope_factors_long/short as LongRoPE's factor
lists. What llama.cpp assumes without a key (Gemma-2's odd-global layer layout, SmolLM3's
rotary-free every 4th layer, Qwen3-MoE's normalised top-k weights, Gemma's attention scale) is
written out, so transformers computes what llama.cpp computes. Keys the config class does not
have are dropped; a setting transformers cannot express is refused naming the key.
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import numpy as np
from gguf import Keys

from ..util.errors import QuantkitError
from .arch import HF_ARCHS, HFArch, block_layout
from .gguf import GGUFSource
from .hf_meta import longrope_attention_factor


def transformers_class(name: str):
    import transformers
    return getattr(transformers, name, None)


def config_fields(hf_class: str) -> set[str]:
    cls = transformers_class(hf_class).config_class
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    return set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}


def _has_experts(a: HFArch) -> bool:
    cls = transformers_class(a.hf_classes[0])
    return cls is not None and bool(config_fields(a.hf_classes[0]) & {"num_local_experts", "num_experts"})


def export_archs() -> dict[str, list[HFArch]]:
    """llama.cpp architecture -> the HF_ARCHS rows a GGUF of it can become (transformers has
    the class)."""
    out: dict[str, list[HFArch]] = {}
    for a in HF_ARCHS.values():
        if transformers_class(a.hf_classes[0]) is not None:
            out.setdefault(a.gguf_arch, []).append(a)
    return out


def export_row(src: GGUFSource) -> HFArch:
    """The HF_ARCHS row a GGUF becomes; QuantkitError naming the architecture otherwise."""
    rows = export_archs().get(src.spec.arch, [])
    rows = [a for a in rows if _has_experts(a) == bool(src.spec.n_expert)]
    if not rows:
        what = f"architecture '{src.spec.arch}'" + (" with experts" if src.spec.n_expert and
                                                      src.spec.arch in export_archs() else "")
        raise QuantkitError(f"{what} is not written back to Hugging Face", src.path,
                            "supported: " + ", ".join(sorted(export_archs())))
    return rows[0]


def _f32(v) -> float:
    """A GGUF float32 as the shortest decimal that reads back as the same float32 (1e-05, not
    9.999999747378752e-06)."""
    return float(str(np.float32(v)))


class _Meta:
    def __init__(self, src: GGUFSource):
        self.src, self.arch = src, src.spec.arch

    def __call__(self, key: str, default=None):
        v = self.src.metadata.get(key.format(arch=self.arch))
        return default if v is None else v.value


def _llama3_factors(theta: float, dim: int, factor: float, low: float, high: float, old: float) -> list[float]:
    """The llama3 rope frequency factors (models.hf's rule)."""
    out = []
    for k in range(0, dim, 2):
        wavelen = 2 * math.pi * theta ** (k / dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(float(factor))
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return out


def llama3_rope(factors: list[float], theta: float, dim: int, path: str) -> dict:
    """Llama-3 rope parameters reproducing rope_freqs.weight. The factors depend on the two
    wavelengths where the interpolation starts and ends (original context / low_freq_factor,
    / high_freq_factor); with low_freq_factor 1 (every Llama 3.x) each interpolated factor
    gives one linear equation in the original context and high_freq_factor."""
    f = np.asarray(factors, dtype=np.float64)
    factor = float(_f32(f.max()))
    wl = 2 * math.pi * theta ** (np.arange(0, dim, 2) / dim)
    mid = (f > 1 + 1e-6) & (f < factor * (1 - 1e-6))
    fail = QuantkitError("rope_freqs.weight does not hold Llama-3 RoPE scaling factors", path,
                         "only llama3-style rope_freqs are written back to Hugging Face")
    if factor <= 1 or mid.sum() < 2:
        raise fail
    s = (1 / f[mid] - 1 / factor) / (1 - 1 / factor)
    # s = (old / wl - 1) / (high - 1)  <=>  old / wl - s * high = 1 - s
    a = np.stack([1 / wl[mid], -s], axis=1)
    (old, high), *_ = np.linalg.lstsq(a, 1 - s, rcond=None)
    old = float(round(old)) if abs(old - round(old)) < 1e-3 * old else float(old)
    high = float(round(high, 6))
    got = _llama3_factors(theta, dim, factor, 1.0, high, old)
    if not np.allclose(np.float32(got), np.float32(f), rtol=1e-5, atol=0):
        raise fail
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": high,
            "original_max_position_embeddings": int(old) if old == int(old) else old}


def _rope(src: GGUFSource, arch: HFArch, m: _Meta, tensors: dict) -> dict:
    s = src.spec
    theta = _f32(s.rope_theta or 10000.0)        # llama.cpp's default when the file has none
    rp: dict = {"rope_type": "default", "rope_theta": theta}
    if arch.rope_dims == "partial" and m(Keys.Rope.DIMENSION_COUNT) is not None:
        rp["partial_rotary_factor"] = int(m(Keys.Rope.DIMENSION_COUNT)) / s.head_dim
    kind = m(Keys.Rope.SCALING_TYPE)
    # llama.cpp scales positions by 1 / factor whenever a factor is given, typed or not
    factor = m(Keys.Rope.SCALING_FACTOR)
    if kind == "linear" or (kind is None and factor not in (None, 0.0, 1.0)):
        rp.update(rope_type="linear", factor=_f32(factor))
    elif kind == "yarn":
        rp.update(rope_type="yarn", factor=_f32(m(Keys.Rope.SCALING_FACTOR)),
                  original_max_position_embeddings=int(m(Keys.Rope.SCALING_ORIG_CTX_LEN)))
        for cfg_key, key in (("extrapolation_factor", Keys.Rope.SCALING_YARN_EXT_FACTOR),
                             ("attention_factor", Keys.Rope.SCALING_YARN_ATTN_FACTOR),
                             ("beta_fast", Keys.Rope.SCALING_YARN_BETA_FAST),
                             ("beta_slow", Keys.Rope.SCALING_YARN_BETA_SLOW)):
            if m(key) is not None:
                rp[cfg_key] = _f32(m(key))
    elif kind not in (None, "none"):
        raise QuantkitError(f"RoPE scaling '{kind}' ({s.arch}.rope.scaling.type) is not written back to "
                            "Hugging Face", src.path, "supported: none, linear, yarn, llama3, longrope")
    if "rope_freqs.weight" in tensors:
        rp.update(llama3_rope(src.load("rope_freqs.weight").tolist(), theta,
                              int(m(Keys.Rope.DIMENSION_COUNT, s.head_dim)), src.path))
    if "rope_factors_long.weight" in tensors:
        orig = int(m(Keys.Rope.SCALING_ORIG_CTX_LEN, s.n_ctx_train))
        rp.update(rope_type="longrope", original_max_position_embeddings=orig,
                  long_factor=[_f32(x) for x in src.load("rope_factors_long.weight").tolist()],
                  short_factor=[_f32(x) for x in src.load("rope_factors_short.weight").tolist()])
        stored = m(Keys.Rope.SCALING_ATTN_FACTOR)
        implied = longrope_attention_factor({"max_position_embeddings": s.n_ctx_train}, rp)
        if stored is not None and np.float32(stored) != np.float32(implied):
            rp["attention_factor"] = _f32(stored)
    if arch.key == "gemma3":                  # per layer kind: global layers scaled, local ones not
        local = _f32(m(Keys.Rope.FREQ_BASE_SWA, 10000.0))
        return {"full_attention": rp, "sliding_attention": {"rope_type": "default", "rope_theta": local}}
    return rp


# llama.cpp architectures that run a sliding window when the file gives one, beyond those with a
# default layer pattern in arch.BLOCK_LAYOUTS (models/olmo2.cpp: every 4th layer global)
SWA_WITHOUT_DEFAULT_PATTERN = ("olmo2",)


def _layer_types(src: GGUFSource) -> list[str] | None:
    """Per-layer attention kind as llama.cpp runs the file: the stored pattern, else the
    architecture's (arch.BLOCK_LAYOUTS swa_pattern: every n-th layer global, or odd-global)."""
    s = src.spec
    if not s.sliding_window:
        return None
    stored = src.metadata.get(f"{s.arch}.attention.sliding_window_pattern")
    if stored is not None and isinstance(stored.value, list):
        pattern = [bool(p) for p in stored.value]
    else:
        n = block_layout(s.arch).swa_pattern
        if n is None:
            return None
        pattern = [i % 2 == 0 if n == "odd-global" else (i + 1) % int(n) != 0 for i in range(s.n_layer)]
    return ["sliding_attention" if p else "full_attention" for p in pattern]


def config_kwargs(src: GGUFSource, arch: HFArch, hf_class: str) -> dict:
    """config.json keys (those the config class has) for a GGUF of `arch`."""
    s, m = src.spec, _Meta(src)
    fields = config_fields(hf_class)
    tensors = {t.name: t for t in src.tensors()}
    kw: dict = dict(vocab_size=tensors["token_embd.weight"].shape[0], hidden_size=s.n_embd,
                    intermediate_size=s.n_ff, num_hidden_layers=s.n_layer, num_attention_heads=s.n_head,
                    num_key_value_heads=s.n_head_kv, max_position_embeddings=s.n_ctx_train,
                    tie_word_embeddings="output.weight" not in tensors, rope_parameters=_rope(src, arch, m, tensors))
    if arch.head_dim_from_config and m(Keys.Attention.KEY_LENGTH) is not None:
        kw["head_dim"] = s.head_dim               # (every class reads it, a config field or not)
    elif s.head_dim != s.n_embd // s.n_head:
        raise QuantkitError(f"head width {s.head_dim} is not hidden / heads, which {hf_class} assumes", src.path)
    if (eps := m(Keys.Attention.LAYERNORM_RMS_EPS)) is not None:
        kw["rms_norm_eps"] = _f32(eps)
    if (eps := m(Keys.Attention.LAYERNORM_EPS)) is not None:
        kw["layer_norm_eps"] = _f32(eps)
    for k, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                   ("pad_token_id", "padding_token_id")):
        v = src.metadata.get(f"tokenizer.ggml.{key}")
        kw[k] = int(v.value) if v is not None else None
    if s.n_expert:
        kw["num_local_experts" if "num_local_experts" in fields else "num_experts"] = s.n_expert
        kw["num_experts_per_tok"] = s.n_expert_used
        # llama.cpp renormalises the chosen experts' softmax weights (build_moe_ffn norm_w)
        kw.update(norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
        if m(Keys.LLM.EXPERT_WEIGHTS_SCALE, 1.0) != 1.0:
            raise QuantkitError(f"{s.arch}.expert_weights_scale is not written back to Hugging Face", src.path)
    for row in arch.meta:
        v = m(row.key)
        if v is not None:
            kw[row.config[0]] = _f32(v) if row.kind == "f32" else int(v)
    blk = {n.split(".", 2)[2] for n in tensors if n.startswith("blk.0.")}
    kw["attention_bias"] = "attn_q.bias" in blk or "attn_qkv.bias" in blk
    kw["mlp_bias"] = "ffn_up.bias" in blk or "ffn_down.bias" in blk
    window = s.sliding_window
    if block_layout(s.arch).swa_pattern is None and s.arch not in SWA_WITHOUT_DEFAULT_PATTERN:
        window = None               # llama.cpp does not read the key for this architecture (Phi-3: disabled)
    if arch.key in ("gemma2", "gemma3"):
        # llama.cpp scales attention by 1/sqrt(head_dim), the 27B models by 1/sqrt(hidden / heads)
        big = s.n_layer == (46 if arch.key == "gemma2" else 62)
        kw["query_pre_attn_scalar"] = s.n_embd // s.n_head if big else s.head_dim
        if arch.key == "gemma2":
            # llama.cpp's defaults for Gemma-2 (llama-hparams.h, models/gemma2.cpp)
            window = window or 4096
            kw.setdefault("attn_logit_softcapping", 50.0)
            kw.setdefault("final_logit_softcapping", 30.0)
        else:
            kw.setdefault("final_logit_softcapping", None)
            kw["attn_logit_softcapping"] = None
        kw["sliding_window"] = window or s.n_ctx_train
        kw["layer_types"] = _layer_types(src) or ["full_attention"] * s.n_layer
    elif window:
        if "sliding_window" not in fields:
            raise QuantkitError(f"{s.arch}.attention.sliding_window = {window}: {hf_class} has no sliding "
                                "window", src.path, "this file cannot be written back to Hugging Face")
        kw.update(sliding_window=window, use_sliding_window=True)
        if _layer_types(src) and "layer_types" in fields:
            kw["layer_types"] = _layer_types(src)
    else:
        kw.update(sliding_window=None, use_sliding_window=False)
    if arch.key == "smollm3":                      # llama.cpp: no rotary on every 4th layer
        kw.update(no_rope_layer_interval=4, no_rope_layers=[int((i + 1) % 4 != 0) for i in range(s.n_layer)])
    if "original_max_position_embeddings" in fields and m(Keys.Rope.SCALING_ORIG_CTX_LEN) is not None:
        kw["original_max_position_embeddings"] = int(m(Keys.Rope.SCALING_ORIG_CTX_LEN))
    if arch.key == "granite" and m(Keys.Attention.SCALE) is None:
        kw["attention_multiplier"] = 1 / math.sqrt(s.head_dim)     # models/granite.cpp's default
    if arch.key == "phi2":
        kw["qk_layernorm"] = False
    return {k: v for k, v in kw.items() if k in fields or k == "head_dim"}


def hf_config(src: GGUFSource, arch: HFArch):
    """The transformers config object of a GGUF of `arch`."""
    hf_class = arch.hf_classes[0]
    try:
        cfg = transformers_class(hf_class).config_class(**config_kwargs(src, arch, hf_class))
    except (ValueError, TypeError, KeyError) as e:     # transformers' own validation of the values
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise QuantkitError(f"transformers refuses the {hf_class} config this file implies ({msg})", src.path,
                            "the file's metadata is not a configuration transformers can run") from None
    cfg.architectures = [hf_class]
    return cfg
