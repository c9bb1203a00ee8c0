"""The tensor shapes a config.json implies, checked against the weights before anything is read.

llama.cpp checks every tensor's dimensions when it loads a file (llama-model.cpp's
check_tensor_dims); the same is done here on the way in, by GGUF tensor kind, from the sizes
config.json gives (hidden size, FFN width, heads, KV heads, head dimension), so a checkpoint
whose tensors disagree with its config is refused naming the tensor, the shape the config
implies and the shape found, instead of producing a file llama.cpp refuses.
"""

from __future__ import annotations

import os

from ..util.errors import QuantkitError


def _allowed(kind: str, is_bias: bool, E: int, F: int, q: int, kv: int, hd: int) -> list[tuple[int, ...]] | None:
    """Shapes a tensor of this GGUF kind may have (weights [out, in], biases [out]); None: not checked."""
    rows = {"attn_q": [q], "attn_k": [kv], "attn_v": [kv], "attn_qkv": [q + 2 * kv], "attn_output": [E],
            "ffn_gate": [F], "ffn_up": [F, 2 * F], "ffn_down": [E]}
    cols = {"attn_output": q, "ffn_down": F}
    if kind in rows:
        if is_bias:
            return [(r,) for r in rows[kind]]
        return [(r, cols.get(kind, E)) for r in rows[kind]]
    if kind in ("attn_norm", "ffn_norm", "post_attention_norm", "post_ffw_norm", "output_norm", "attn_norm_2"):
        return [(E,)]
    if kind in ("attn_q_norm", "attn_k_norm"):
        return [(hd,), (q if kind == "attn_q_norm" else kv,)]
    return None


def check_shapes(path: str, entries: dict[str, tuple[str, tuple[int, ...]]], hp: dict, head_dim: int) -> None:
    """`entries`: GGUF name -> (HF name, shape as stored); `hp`: config.json (text_config merged)."""
    E = int(hp["hidden_size"])
    F = int(hp["intermediate_size"])
    n_head = int(hp["num_attention_heads"])
    n_kv = int(hp.get("num_key_value_heads") or n_head)
    q, kv = n_head * head_dim, n_kv * head_dim
    for name, (hf_name, shape) in entries.items():
        if name in ("token_embd.weight", "output.weight"):
            ok = len(shape) == 2 and shape[1] == E
            want = f"[rows, {E}]"
        else:
            base = name.split(".")
            kind = base[2] if name.startswith("blk.") else base[0]
            allowed = _allowed(kind, name.endswith(".bias"), E, F, q, kv, head_dim)
            if allowed is None:
                continue
            ok = tuple(shape) in allowed
            want = " or ".join(str(list(a)) for a in allowed)
        if not ok:
            raise QuantkitError(f"tensor {hf_name} has shape {list(shape)} but config.json implies {want}",
                                os.path.join(path, "config.json"), "the config does not match the weights")
