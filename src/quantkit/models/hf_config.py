"""config.json of a Hugging Face model, checked before anything reads a size from it.

Both readers of config.json, models.hf (conversion, quantization) and plan.model (memory
arithmetic), call `check_config` first, so a string where a float belongs, a negative context
length or a head count that does not divide are one line naming config.json and the key, the
same on either path, never a traceback or a silently wrong plan. Only keys that are present
are checked; what a key's absence means stays with each reader. A multimodal config's
text_config is checked the same way, its keys named `text_config.KEY`.
"""

from __future__ import annotations

import os
from typing import Any

from ..util import validate as v
from ..util.errors import QuantkitError

MAX_LAYERS = 100_000
MAX_WIDTH = 1 << 24           # hidden size, FFN width, head dimension
MAX_HEADS = 1 << 16
MAX_VOCAB = 1 << 26
MAX_CTX = (1 << 32) - 1       # GGUF's context_length is a uint32

# key -> (lo, hi) of a positive (or non-negative) integer
_INTS: dict[str, tuple[int, int]] = {
    **{k: (1, MAX_LAYERS) for k in ("num_hidden_layers", "n_layer", "num_layers")},
    **{k: (1, MAX_WIDTH) for k in ("hidden_size", "n_embd", "d_model", "intermediate_size", "ffn_hidden_size",
                                    "n_inner", "head_dim", "kv_channels")},
    **{k: (1, MAX_HEADS) for k in ("num_attention_heads", "n_head", "num_key_value_heads", "multi_query_group_num")},
    **{k: (1, MAX_VOCAB) for k in ("vocab_size", "padded_vocab_size")},
    **{k: (1, MAX_CTX) for k in ("max_position_embeddings", "seq_length", "n_positions")},
    "sliding_window": (0, MAX_CTX),                # 0 or null: none
    "sliding_window_pattern": (1, MAX_LAYERS),
    "_sliding_window_pattern": (1, MAX_LAYERS),
    "num_local_experts": (0, 1 << 20),
    "num_experts": (0, 1 << 20),
    "num_experts_per_tok": (1, 1 << 20),
}
# key -> (lo, hi): a finite number above lo, at most hi
_FLOATS: dict[str, tuple[float, float | None]] = {
    "rope_theta": (0.0, None),
    "rope_local_base_freq": (0.0, None),
    "rms_norm_eps": (0.0, 1.0),
    "layer_norm_eps": (0.0, 1.0),
    "layer_norm_epsilon": (0.0, 1.0),
    "final_logit_softcapping": (0.0, None),
    "attn_logit_softcapping": (0.0, None),
    "query_pre_attn_scalar": (0.0, None),
    "partial_rotary_factor": (0.0, 1.0),
}
_BOOLS = ("tie_word_embeddings", "use_sliding_window", "multi_query_attention", "add_qkv_bias")
_STRINGS = ("model_type", "torch_dtype", "hidden_act")
# inside rope_scaling / rope_parameters
_ROPE_FLOATS = ("factor", "low_freq_factor", "high_freq_factor", "rope_theta", "attention_factor", "beta_fast",
                "beta_slow")


def check_config(cfg: Any, path: str | os.PathLike | None) -> None:
    """Raise QuantkitError naming `path` (config.json) and the key for the first value of the
    wrong type, out of range or inconsistent with another."""
    where = os.fspath(path) if path is not None else "config.json"
    if not isinstance(cfg, dict):
        raise QuantkitError(f"config.json holds {v.kind(cfg)}, not a JSON object", where,
                            "a Hugging Face config.json is one object of key: value")
    _check_keys(cfg, where, "")
    text = cfg.get("text_config")
    if text is not None:
        if not isinstance(text, dict):
            v.fail("text_config", text, f"is {v.kind(text)}, not an object", "the text model's own config",
                   where)
        _check_keys(text, where, "text_config.")
        _check_heads({**cfg, **text}, where, "text_config.")
    else:
        _check_heads(cfg, where, "")


def _check_keys(cfg: dict, where: str, prefix: str) -> None:
    for key, (lo, hi) in _INTS.items():
        if cfg.get(key) is not None and not (key == "sliding_window" and cfg[key] is False):
            _int(cfg[key], prefix + key, lo, hi, where)
    for key, (lo, hi) in _FLOATS.items():
        if cfg.get(key) is not None:
            _float(cfg[key], prefix + key, lo, hi, where)
    for key in _BOOLS:
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            v.fail(prefix + key, cfg[key], "is not true or false", "JSON true or false", where)
    for key in _STRINGS:
        if cfg.get(key) is not None:
            v.as_str(cfg[key], prefix + key, max_len=200, path=where)
    archs = cfg.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)):
        v.fail(prefix + "architectures", archs, "is not a list of class names",
               'e.g. ["LlamaForCausalLM"]', where)
    types = cfg.get("layer_types")
    if types is not None and (not isinstance(types, list) or not all(isinstance(t, str) for t in types)):
        v.fail(prefix + "layer_types", types, "is not a list of layer kinds",
               'e.g. ["sliding_attention", "full_attention"]', where)
    for key in ("rope_scaling", "rope_parameters"):
        if cfg.get(key) is not None:
            _check_rope(cfg[key], prefix + key, where)
    q = cfg.get("quantization_config")
    if q is not None:
        if not isinstance(q, dict):
            v.fail(prefix + "quantization_config", q, f"is {v.kind(q)}, not an object", None, where)
        if q.get("bits") is not None:
            _int(q["bits"], prefix + "quantization_config.bits", 1, 16, where)
        if q.get("group_size") is not None:
            _int(q["group_size"], prefix + "quantization_config.group_size", -1, MAX_WIDTH, where)


def _int(value: Any, key: str, lo: int, hi: int, where: str) -> int:
    """An integer of JSON (not 4.0, not "4", not true)."""
    if isinstance(value, bool) or not isinstance(value, int):
        v.fail(key, value, f"is {v.kind(value)}, not an integer", f"give an integer from {lo:,} to {hi:,}", where)
    return v.as_int(value, key, lo, hi, path=where)


def _float(value: Any, key: str, lo: float, hi: float | None, where: str) -> float:
    """A finite number of JSON above `lo` (not "1e-6", not true)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        v.fail(key, value, f"is {v.kind(value)}, not a number", f"give a number above {lo:g}", where)
    return v.as_float(value, key, lo, hi, lo_open=True, path=where)


def _check_rope(rp: Any, key: str, where: str) -> None:
    if not isinstance(rp, dict):
        v.fail(key, rp, f"is {v.kind(rp)}, not an object", 'e.g. {"rope_type": "linear", "factor": 2.0}', where)
    inner = [(f"{key}.{k}", rp[k]) for k in ("full_attention", "sliding_attention") if isinstance(rp.get(k), dict)]
    for name, d in [(key, rp), *inner]:
        for f in _ROPE_FLOATS:
            if d.get(f) is not None:
                _float(d[f], f"{name}.{f}", 0.0, None, where)
        if d.get("original_max_position_embeddings") is not None:
            _int(d["original_max_position_embeddings"], f"{name}.original_max_position_embeddings", 1, MAX_CTX,
                 where)
        for f in ("rope_type", "type"):
            if d.get(f) is not None:
                v.as_str(d[f], f"{name}.{f}", max_len=100, path=where)
        kind_ = str(d.get("rope_type") or d.get("type") or "").lower()
        if kind_ == "yarn" and d.get("factor") is not None and d.get("original_max_position_embeddings") is None:
            v.fail(f"{name}.original_max_position_embeddings", None, "is missing",
                   "YaRN scales from the context the model was trained on; give it", where)
        low, high = d.get("low_freq_factor", 1.0), d.get("high_freq_factor", 4.0)
        if kind_ == "llama3" and high <= low:
            v.fail(f"{name}.high_freq_factor", high, f"is not above low_freq_factor {low}",
                   "Llama-3 RoPE scaling interpolates between the two", where)


def _check_heads(cfg: dict, where: str, prefix: str) -> None:
    """KV heads that group the attention heads evenly, and a head dimension that is whole."""
    heads = next((cfg[k] for k in ("num_attention_heads", "n_head") if cfg.get(k)), None)
    kv = cfg.get("num_key_value_heads")
    if heads and kv and heads % kv:
        v.fail(prefix + "num_key_value_heads", kv, f"does not divide num_attention_heads {heads}",
               "each KV head serves a whole group of attention heads", where)
    if heads and kv and kv > heads:
        v.fail(prefix + "num_key_value_heads", kv, f"is more than num_attention_heads {heads}", None, where)
    hidden = next((cfg[k] for k in ("hidden_size", "n_embd", "d_model") if cfg.get(k)), None)
    if cfg.get("head_dim") is None and cfg.get("kv_channels") is None and heads and hidden and hidden % heads:
        v.fail(prefix + "hidden_size", hidden, f"is not a multiple of num_attention_heads {heads}",
               "without head_dim, each head is hidden_size / num_attention_heads wide; give head_dim", where)
    hd = cfg.get("head_dim")
    if hd and hd % 2:
        v.fail(prefix + "head_dim", hd, "is odd", "rotary embeddings rotate pairs of dimensions", where)
    n_exp = next((cfg[k] for k in ("num_local_experts", "num_experts") if cfg.get(k)), 0)
    used = cfg.get("num_experts_per_tok")
    if n_exp and used and used > n_exp:
        v.fail(prefix + "num_experts_per_tok", used, f"is more than the {n_exp} experts", None, where)


__all__ = ["check_config"]
