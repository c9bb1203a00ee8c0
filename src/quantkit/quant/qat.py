"""Float weights trained for Q4_0 (quantization-aware training) -> Q4_0 with the scale that
reproduces them.

A QAT checkpoint's weights lie on (or, stored in bf16, within rounding of) a Q4_0 grid: each
block of 32 is c * d with integer codes c in -8..7 and one fp16 scale d, but d need not be
llama.cpp's max-based d = x_max / -8 (training can leave the largest weight at code 7, or at 5).
llama-quantize then re-rounds every such block onto its own scale. Here each block tries the
scales that put its largest magnitude on code +-1 .. +-8 (d = fp16(|x|max / k), both signs),
each also refined once by least squares, rounds onto each, and keeps the one that reproduces
the block best; a block is taken from it when that is within `tol` (relative to the block's
largest magnitude; 0: bit for bit) and closer than llama.cpp's own rounding, otherwise
llama.cpp's bytes are written. The report counts the blocks reproduced exactly by each.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..codecs import legacy
from ..codecs.registry import qtype
from ..models.source import ModelSource
from .gguf_export import export_gguf, plan_gguf

CHUNK = 1 << 14                 # blocks per step: 32 candidate scales x 32 values x 4 bytes each
DEFAULT_TOL = 2.0 ** -7         # bf16 stores c*d within 2**-9 |x|; the fp16 scale adds up to 8 * 2**-11 d


@dataclass
class QATStats:
    blocks: int = 0
    exact: int = 0              # blocks whose Q4_0 decodes to the input bit for bit (this scale)
    near: int = 0               # blocks taken from a reproducing scale within tol, not bit for bit
    llama_exact: int = 0        # blocks llama.cpp's max-based rounding reproduces bit for bit

    def add(self, o: "QATStats") -> None:
        self.blocks += o.blocks
        self.exact += o.exact
        self.near += o.near
        self.llama_exact += o.llama_exact


def _round(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Codes of blocks x [n, 32] on each scale d [n, c]: [n, c, 32]."""
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    return torch.round(x[:, None, :] * inv[..., None])


def qat_blocks(x: torch.Tensor, tol: float = DEFAULT_TOL) -> tuple[torch.Tensor, QATStats]:
    """Blocks float32 [n, 32] -> (Q4_0 bytes uint8 [n, 18], stats)."""
    fmt = legacy.Q4_0
    rtn = qtype("q4_0").encode_blocks(x)
    rtn_err = (legacy.decode(fmt, rtn) - x).abs().amax(1)
    amax = x.abs().amax(1)
    k = torch.arange(1, 9, dtype=torch.float32)
    dabs = (amax[:, None] / k).half().float()
    d = torch.cat([dabs, -dabs], 1)                                        # [n, 16]
    codes = _round(x, d)
    # each candidate refined once by least squares on its codes (a bf16-stored block's largest
    # value is itself rounded, so amax / k misses the trained scale by up to 2**-9)
    cc = (codes * codes).sum(-1)
    d_ls = torch.where(cc > 0, (codes * x[:, None, :]).sum(-1) / cc.clamp(min=1), d).half().float()
    d = torch.cat([d, d_ls], 1)                                            # [n, 32]
    codes = torch.cat([codes, _round(x, d_ls)], 1)
    ok = ((codes >= -8) & (codes <= 7)).all(-1)
    err = (codes * d[..., None] - x[:, None, :]).abs().amax(-1)
    err = torch.where(ok & (d != 0), err, torch.full_like(err, float("inf")))
    best_err, best = err.min(1)
    take = (best_err <= tol * amax) & (best_err < rtn_err)
    out = rtn.clone()
    if take.any():
        idx = take.nonzero().squeeze(1)
        db = d[idx, best[idx]]
        cb = codes[idx, best[idx]].to(torch.int32) + fmt.offset
        out[idx] = legacy.encode_from_codes(fmt, cb, db)
    exact = torch.where(take, best_err == 0, rtn_err == 0)
    stats = QATStats(x.shape[0], int(exact.sum()), int((take & (best_err > 0)).sum()), int((rtn_err == 0).sum()))
    return out, stats


def qat_q4_0(x: torch.Tensor, tol: float = DEFAULT_TOL) -> tuple[np.ndarray, QATStats]:
    """A tensor [rows, n] (n a multiple of 32) -> its Q4_0 bytes (flat uint8) and stats."""
    blocks = x.reshape(-1, legacy.BLOCK).float()
    pieces, total = [], QATStats()
    for b0 in range(0, blocks.shape[0], CHUNK):
        data, st = qat_blocks(blocks[b0:b0 + CHUNK], tol)
        pieces.append(data)
        total.add(st)
    return torch.cat(pieces).numpy().reshape(-1), total


@dataclass
class QATReport:
    path: str
    file_type: str
    seconds: float
    n_bytes: int
    types: dict[str, str] = field(default_factory=dict)
    stats: dict[str, QATStats] = field(default_factory=dict)     # per Q4_0 tensor

    def total(self) -> QATStats:
        t = QATStats()
        for s in self.stats.values():
            t.add(s)
        return t

    def to_dict(self) -> dict:
        t = self.total()
        share = (lambda n: n / t.blocks if t.blocks else 0.0)
        return {"output": self.path, "file_type": self.file_type, "seconds": self.seconds, "file_bytes": self.n_bytes,
                "paths": {"qat": len(self.stats), "rtn": len(self.types) - len(self.stats)},
                "blocks": t.blocks, "blocks_exact_share": share(t.exact), "blocks_near_share": share(t.near),
                "llama_cpp_exact_share": share(t.llama_exact),
                "tensors": {n: {"path": "qat" if n in self.stats else "rtn", "type": ty,
                                **({"note": f"{s.exact}/{s.blocks} blocks exact, {s.near} near; llama.cpp's "
                                            f"scale: {s.llama_exact}"} if (s := self.stats.get(n)) else {})}
                            for n, ty in self.types.items()}}


def export_qat(src: ModelSource, out: str | os.PathLike, file_type: str = "q4_0", *, tol: float = DEFAULT_TOL,
               pure: bool = False, token_embedding_type: str | None = None, output_tensor_type: str | None = None,
               show_progress: bool = True) -> QATReport:
    """GGUF of `file_type` where every Q4_0 tensor keeps the scales that reproduce its blocks;
    every other tensor as llama-quantize writes it."""
    t0 = time.perf_counter()
    _, plan = plan_gguf(src, file_type, pure=pure, token_embedding_type=token_embedding_type,
                        output_tensor_type=output_tensor_type)
    stats: dict[str, QATStats] = {}
    targets = {n: t for n, _, t in plan}

    def pre(name: str):
        if targets[name] != "q4_0":
            return None
        data, stats[name] = qat_q4_0(src.load(name), tol)
        return data

    rep = export_gguf(src, out, file_type, plan=plan, precomputed=pre, show_progress=show_progress)
    return QATReport(rep.path, rep.file_type, time.perf_counter() - t0, rep.n_bytes, rep.types, stats)
