"""How fast: decoding is bound by memory bandwidth, prompt processing by compute [speed].

decode tokens/s <= bandwidth / bytes read per token. Each generated token reads every weight
once (a mixture of experts reads only the experts its router picks) and the KV cache of the
tokens so far. Example from first principles: 4-channel DDR4-3600 moves 3600e6 x 8 B x 4 =
115.2 GB/s; a 13 GB model then decodes at most 115.2 / 13 = 8.9 tokens/s.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass

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


# ---------------------------------------------------------------- calibrated CPU decode model

_CPU_SPEED = os.path.join(os.path.dirname(__file__), "cpu_speed.yaml")


def _repacked(t: Tensor) -> bool:
    from .memory import CPU_REPACK_TYPES
    return (t.type in CPU_REPACK_TYPES and len(t.shape) == 2 and t.shape[0] % 8 == 0
            and t.name != "token_embd.weight")


def cpu_decode_terms(m: ModelShape, tensors: list[Tensor], n_past: int, kv_type: str = "f16") -> dict:
    """What one decoded token costs on a CPU, as counts: layers, bytes read (weights + KV so far),
    and the matrix weights multiplied, by kind (GGUF type, '+repack' where ggml-cpu repacks it).
    The token embedding is read one row at a time unless it doubles as the output head."""
    from .memory import kv_row_bytes
    frac = (m.n_expert_used / m.n_expert) if m.n_expert else 1.0
    by_kind: dict[str, float] = {}
    for t in tensors:
        if len(t.shape) < 2 or (t.name == "token_embd.weight" and not m.tied_embeddings):
            continue
        k = t.type + ("+repack" if _repacked(t) else "")
        by_kind[k] = by_kind.get(k, 0.0) + t.n_elements * (frac if _EXPERT.search(t.name) else 1.0)
    kv = kv_bytes_per_token(kv_row_bytes(m, kv_type), n_past, m.swa_layers(), m.sliding_window)
    return {"n_layer": m.n_layer, "bytes": weight_bytes_per_token(m, tensors) + kv, "kv_bytes": kv,
            "weights_by_kind": by_kind}


@dataclass(frozen=True)
class CpuDecodeModel:
    """seconds/token = o_token + o_layer n_layer + bytes read / bandwidth + sum n_weights c[kind]
    (cpu_speed.yaml: constants fitted on calibration models by benchmarks/plan_speed_calibrate.py)."""
    machine: str
    threads: int
    bandwidth: float
    o_token: float
    o_layer: float
    c_per_weight: dict
    source: str

    def has(self, kind: str) -> bool:
        return kind in self.c_per_weight or kind.split("+")[0] in self.c_per_weight

    def c(self, kind: str) -> float:
        if kind in self.c_per_weight:
            return self.c_per_weight[kind]
        base = kind.split("+")[0]
        if base in self.c_per_weight:       # a repackable type never measured repacked
            return self.c_per_weight[base]
        raise QuantkitError(f"no calibrated CPU cost for tensor type {kind}",
                            hint="run benchmarks/plan_speed_calibrate.py with that type")

    def seconds_from_terms(self, terms: dict) -> float:
        return (self.o_token + self.o_layer * terms["n_layer"] + terms["bytes"] / self.bandwidth
                + sum(n * self.c(k) for k, n in terms["weights_by_kind"].items()))

    def seconds(self, m: ModelShape, tensors: list[Tensor], n_past: int, kv_type: str = "f16") -> float:
        return self.seconds_from_terms(cpu_decode_terms(m, tensors, n_past, kv_type))

    def covers(self, m: ModelShape, tensors: list[Tensor]) -> bool:
        return all(self.has(k) for k in cpu_decode_terms(m, tensors, 1)["weights_by_kind"])


@functools.lru_cache(maxsize=1)
def cpu_model() -> CpuDecodeModel | None:
    if not os.path.exists(_CPU_SPEED):
        return None
    import yaml
    with open(_CPU_SPEED, encoding="utf-8") as f:
        r = yaml.safe_load(f)
    return CpuDecodeModel(r["machine"], int(r["threads"]), float(r["bandwidth"]), float(r["o_token"]),
                          float(r["o_layer"]), {k: float(v) for k, v in r["c_per_weight"].items()}, r["source"])
