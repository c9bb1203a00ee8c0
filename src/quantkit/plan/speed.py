"""How fast: decoding is bound by memory bandwidth, prompt processing by compute [speed].

decode tokens/s <= bandwidth / bytes read per token. Each generated token reads every weight
once (a mixture of experts reads only the experts its router picks) and the KV cache of the
tokens so far. Example from first principles: 4-channel DDR4-3600 moves 3600e6 x 8 B x 4 =
115.2 GB/s; a 13 GB model then decodes at most 115.2 / 13 = 8.9 tokens/s.
"""

from __future__ import annotations

import re

from ..util.errors import QuantkitError
from .model import ModelShape, Tensor

_EXPERT = re.compile(r"_exps\.|\.ffn_(gate|up|down)\.\d+\.|experts\.\d+\.")


def weight_bytes_per_token(m: ModelShape, tensors: list[Tensor]) -> float:
    """Weight bytes a decoding step reads: all of them, except that the token embedding is read
    one row at a time (unless it doubles as the output head) and only the active experts."""
    total = 0.0
    frac = (m.n_expert_used / m.n_expert) if m.n_expert else 1.0
    for t in tensors:
        if t.name == "token_embd.weight" and not m.tied_embeddings:
            total += t.nbytes / max(1, t.shape[0])
        elif _EXPERT.search(t.name):
            total += t.nbytes * frac
        else:
            total += t.nbytes
    return total


def kv_bytes_per_token(kv_bytes_per_cell_layer: int, n_past: int, swa: list[bool], window: int | None,
                       batch: int = 1) -> float:
    """KV bytes one decoding step reads at context position n_past (per sequence x batch)."""
    cells = [min(n_past, window) if (s and window) else n_past for s in swa]
    return kv_bytes_per_cell_layer * sum(cells) * batch


def decode_upper_bound(bandwidth: float, bytes_per_token: float) -> float:
    """tokens/s for one sequence; bandwidth in bytes/s."""
    if bandwidth <= 0 or bytes_per_token <= 0:
        raise QuantkitError("bandwidth and bytes per token must be positive")
    return bandwidth / bytes_per_token


def split_decode(parts: list[tuple[float, float]]) -> float:
    """tokens/s when the bytes of one token live in several memories read one after another:
    parts = [(bytes, bandwidth), ...] (e.g. GPU layers and CPU layers with partial offload)."""
    t = sum(b / bw for b, bw in parts if b > 0)
    return 1.0 / t if t > 0 else float("inf")


def flops_per_token(m: ModelShape, tensors: list[Tensor], n_ctx: int) -> float:
    """Forward FLOPs per token: 2 per active weight of the matmuls + 2 n_layer n_ctx d_attn."""
    frac = (m.n_expert_used / m.n_expert) if m.n_expert else 1.0
    n = 0.0
    for t in tensors:
        if len(t.shape) < 2 or t.name == "token_embd.weight" and not m.tied_embeddings:
            continue
        n += t.n_elements * (frac if _EXPERT.search(t.name) else 1.0)
    return 2 * n + 2 * m.n_layer * n_ctx * m.n_head * m.head_dim


def prompt_tokens_per_s(tflops: float | None, flops: float, efficiency: float) -> float | None:
    if not tflops:
        return None
    return tflops * 1e12 * efficiency / flops
