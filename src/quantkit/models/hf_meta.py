"""GGUF metadata of a Hugging Face model, as llama.cpp's convert_hf_to_gguf.py writes it.

The generic keys (block count, widths, heads, rope, norm epsilons, experts) follow the
converter's TextModel.set_gguf_parameters, the keys spelled by gguf-py's `Keys` templates; what
an architecture adds is the data of its `arch.HFArch` row (rope dimension count, vocab size,
sliding window, the `MetaRow`s such as Granite's multipliers and Gemma-2's soft-capping).
Configurations llama.cpp would run differently from transformers are refused or warned about
here, naming config.json and the key.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

from gguf import GGUFValueType, Keys

from .arch import HFArch
from .source import ArchSpec, MetaValue
from ..util.errors import QuantkitError


def _u32(v: int) -> MetaValue:
    return MetaValue(int(v), GGUFValueType.UINT32)


def _f32(v: float) -> MetaValue:
    return MetaValue(float(v), GGUFValueType.FLOAT32)


def _str(v: str) -> MetaValue:
    return MetaValue(str(v), GGUFValueType.STRING)


def first(hp: dict, keys: tuple[str, ...], default=None):
    """The first of `keys` present and not null in `hp`."""
    return next((hp[k] for k in keys if hp.get(k) is not None), default)


def rope_parameters(hp: dict) -> dict[str, Any]:
    """rope_parameters (transformers 5) or rope_scaling plus rope_theta, one dict; Gemma-3's
    per-layer-type parameters stay under full_attention / sliding_attention."""
    rp = dict(hp.get("rope_parameters") or hp.get("rope_scaling") or {})
    if "full_attention" not in rp and "sliding_attention" not in rp:
        if (local := hp.get("rope_local_base_freq")) is not None:
            rp["sliding_attention"] = {"rope_theta": local}
        if "rope_theta" not in rp and hp.get("rope_theta") is not None:
            rp["rope_theta"] = hp["rope_theta"]
        if "rope_type" not in rp and rp.get("type") is not None:
            rp["rope_type"] = rp["type"]
        if "partial_rotary_factor" not in rp and hp.get("partial_rotary_factor") is not None:
            rp["partial_rotary_factor"] = hp["partial_rotary_factor"]
    return rp


def rope_dimension_count(hp: dict, arch: HFArch, head_dim: int) -> int:
    rp = rope_parameters(hp)
    if arch.rope_dims == "partial":
        return int(head_dim * float(rp.get("partial_rotary_factor", arch.partial_rotary)))
    return head_dim


def _orig_ctx(hp: dict, rp: dict) -> int:
    return int(first(rp, ("original_max_position_embeddings",), hp.get("original_max_position_embeddings"))
               or hp.get("max_position_embeddings") or 1)


def longrope_attention_factor(hp: dict, rp: dict) -> float:
    """LongRoPE's cos/sin scale: the config's attention_factor, else sqrt(1 + ln s / ln orig)
    for the context extension s = max_position_embeddings / original (transformers' and
    convert_hf_to_gguf's rule)."""
    if rp.get("attention_factor") is not None:
        return float(rp["attention_factor"])
    orig = _orig_ctx(hp, rp)
    scale = int(hp.get("max_position_embeddings") or orig) / orig
    return math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0


def longrope_factors(hp: dict, arch: HFArch, head_dim: int, path: str) -> dict[str, list[float]]:
    """Phi-3's LongRoPE frequency factors as the two generated tensors llama.cpp reads
    (rope_factors_long / rope_factors_short, rope dimensions / 2 each); empty without LongRoPE."""
    rp = rope_parameters(hp)
    long_f, short_f = rp.get("long_factor"), rp.get("short_factor")
    if not long_f or arch.key != "phi3":
        return {}
    half = rope_dimension_count(hp, arch, head_dim) // 2
    for key, f in (("long_factor", long_f), ("short_factor", short_f)):
        if not isinstance(f, list) or len(f) != half or not all(isinstance(x, (int, float)) for x in f):
            raise QuantkitError(f"rope_scaling.{key} must be {half} numbers (rope dimensions / 2)",
                                os.path.join(path, "config.json"), "the config is damaged")
    return {"rope_factors_long.weight": [float(x) for x in long_f],
            "rope_factors_short.weight": [float(x) for x in short_f]}


def _rope_scaling(m: dict, a: str, full: dict, cfg_path: str) -> None:
    rope_type = str(full.get("rope_type", "default") or "default").lower()
    factor = full.get("factor")
    if rope_type == "linear" and factor is not None:
        m[Keys.Rope.SCALING_TYPE.format(arch=a)] = _str("linear")
        m[Keys.Rope.SCALING_FACTOR.format(arch=a)] = _f32(factor)
    elif rope_type == "yarn" and factor is not None:
        m[Keys.Rope.SCALING_TYPE.format(arch=a)] = _str("yarn")
        m[Keys.Rope.SCALING_FACTOR.format(arch=a)] = _f32(factor)
        m[Keys.Rope.SCALING_ORIG_CTX_LEN.format(arch=a)] = _u32(full["original_max_position_embeddings"])
        for cfg_key, key in (("extrapolation_factor", Keys.Rope.SCALING_YARN_EXT_FACTOR),
                             ("attention_factor", Keys.Rope.SCALING_YARN_ATTN_FACTOR),
                             ("beta_fast", Keys.Rope.SCALING_YARN_BETA_FAST),
                             ("beta_slow", Keys.Rope.SCALING_YARN_BETA_SLOW)):
            if full.get(cfg_key) is not None:
                m[key.format(arch=a)] = _f32(full[cfg_key])
    elif rope_type in ("longrope", "su"):
        pass        # Phi-3's factor tensors and attention factor carry it (longrope_factors); no type key
    elif rope_type not in ("default", "llama3", "none"):
        raise QuantkitError(f"RoPE scaling type {rope_type!r} is not supported", cfg_path,
                            "supported: linear, yarn, llama3, longrope (Phi-3)")


def _check_runs_alike(hp: dict, arch: HFArch, spec: ArchSpec, path: str, cfg_path: str) -> None:
    """Refuse (or warn about) configurations llama.cpp computes differently from transformers."""
    if arch.key == "gemma3" and hp.get("attn_logit_softcapping") is not None:
        raise QuantkitError("gemma3 with attn_logit_softcapping is not supported by llama.cpp", cfg_path)
    if arch.key in ("gemma2", "gemma3"):
        # llama.cpp scales attention by 1/sqrt(head_dim) (1/sqrt(n_embd/n_head) for the 27B
        # models); HF by query_pre_attn_scalar**-0.5. They agree for every released Gemma.
        qpas = hp.get("query_pre_attn_scalar")
        big = spec.n_layer == (62 if arch.key == "gemma3" else 46)
        expect = spec.n_embd / spec.n_head if big else spec.head_dim
        if qpas is not None and abs(float(qpas) - expect) > 1e-6:
            warnings.warn(f"{path}: query_pre_attn_scalar={qpas} but llama.cpp will scale "
                          f"attention by 1/sqrt({expect:g}); outputs will differ", stacklevel=3)
    if arch.key == "smollm3" and isinstance(hp.get("no_rope_layers"), list):
        # llama.cpp skips rotary embeddings on every 4th layer (n_no_rope_layer_step = 4)
        want = [int((i + 1) % 4 != 0) for i in range(spec.n_layer)]
        if [int(x) for x in hp["no_rope_layers"]] != want:
            raise QuantkitError("no_rope_layers is not SmolLM3's every-4th-layer layout llama.cpp assumes",
                                cfg_path, "llama.cpp cannot run this layout")
    rp = rope_parameters(hp)
    if rp.get("long_factor") and arch.key != "phi3":
        raise QuantkitError(f"LongRoPE scaling is supported for Phi-3 only, not {arch.key}", cfg_path)


def gguf_metadata(hp: dict, arch: HFArch, spec: ArchSpec, path: str, head_dim_given: bool) -> dict[str, MetaValue]:
    """`hp`: config.json (text_config merged in); `spec` the model's shape."""
    cfg_path = os.path.join(path, "config.json")
    a = arch.gguf_arch
    d = arch.defaults
    m: dict[str, MetaValue] = {
        "general.architecture": _str(a),
        "general.name": _str(os.path.basename(os.path.normpath(path)) or "model"),
        Keys.LLM.BLOCK_COUNT.format(arch=a): _u32(spec.n_layer),
        Keys.LLM.CONTEXT_LENGTH.format(arch=a): _u32(spec.n_ctx_train),
        Keys.LLM.EMBEDDING_LENGTH.format(arch=a): _u32(spec.n_embd),
        Keys.LLM.FEED_FORWARD_LENGTH.format(arch=a): _u32(spec.n_ff),
        Keys.Attention.HEAD_COUNT.format(arch=a): _u32(spec.n_head),
        Keys.Attention.HEAD_COUNT_KV.format(arch=a): _u32(spec.n_head_kv),
    }
    rp = rope_parameters(hp)
    full = rp.get("full_attention", rp)
    if spec.rope_theta is not None:
        m[Keys.Rope.FREQ_BASE.format(arch=a)] = _f32(spec.rope_theta)
    local_theta = rp.get("sliding_attention", {}).get("rope_theta")
    if local_theta is not None:
        m[Keys.Rope.FREQ_BASE_SWA.format(arch=a)] = _f32(local_theta)
    _rope_scaling(m, a, full, cfg_path)
    if (eps := first(hp, ("rms_norm_eps", "norm_eps"), d.get("rms_norm_eps"))) is not None and arch.norm == "rms":
        m[Keys.Attention.LAYERNORM_RMS_EPS.format(arch=a)] = _f32(eps)
    if (eps := first(hp, ("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"))) is not None:
        m[Keys.Attention.LAYERNORM_EPS.format(arch=a)] = _f32(eps)
    if spec.n_expert:
        m[Keys.LLM.EXPERT_COUNT.format(arch=a)] = _u32(spec.n_expert)
        m[Keys.LLM.EXPERT_USED_COUNT.format(arch=a)] = _u32(spec.n_expert_used)
    if head_dim_given and arch.head_dim_from_config:
        m[Keys.Attention.KEY_LENGTH.format(arch=a)] = _u32(spec.head_dim)
        m[Keys.Attention.VALUE_LENGTH.format(arch=a)] = _u32(spec.head_dim)
    if arch.write_vocab_size:
        m[Keys.LLM.VOCAB_SIZE.format(arch=a)] = _u32(spec.n_vocab)
    if arch.rope_dims:
        m[Keys.Rope.DIMENSION_COUNT.format(arch=a)] = _u32(rope_dimension_count(hp, arch, spec.head_dim))
    if arch.key == "phi3":
        orig = first(rp, ("original_max_position_embeddings",), hp.get("original_max_position_embeddings"))
        if orig is not None:
            m[Keys.Rope.SCALING_ORIG_CTX_LEN.format(arch=a)] = _u32(orig)
        if rp.get("long_factor"):
            m[Keys.Rope.SCALING_ATTN_FACTOR.format(arch=a)] = _f32(longrope_attention_factor(hp, rp))
    if arch.swa == "always" or (arch.swa == "pattern" and spec.sliding_window):
        m[Keys.Attention.SLIDING_WINDOW.format(arch=a)] = _u32(spec.sliding_window or 0)
    if arch.swa == "pattern" and spec.sliding_window and spec.sliding_window_pattern:
        # llama.cpp assumes Gemma-3's 5 local : 1 global layout unless told; say it
        m[Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=a)] = MetaValue(
            list(spec.sliding_window_pattern), GGUFValueType.ARRAY, GGUFValueType.BOOL)
    for row in arch.meta:
        v = first(hp, row.config, row.default)
        if v is not None:
            m[row.key.format(arch=a)] = _f32(v) if row.kind == "f32" else _u32(v)
    _check_runs_alike(hp, arch, spec, path, cfg_path)
    return m
