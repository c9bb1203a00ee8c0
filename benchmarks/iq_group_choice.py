"""Does choosing each IQ3_S lattice group by its FULL within-group Hessian-weighted error (block
LDLQ, as QuIP#) beat the diagonal-only choice GPTQ uses (codecs.iq3.IQ3Grid)?

GPTQ (quant.gptq) rounds a group of 4 columns at once from x, the group's columns updated by
every column solved before them. Left to the later columns' compensation the group's error
e = x - q costs eᵀ A e, A = (U_bᵀ U_b)^-1 with U_b the group's [4, 4] block of the inverse
Hessian's upper Cholesky factor. IQ3Grid scores grid points with diag(A) (signs from x). Here:
  full   all of A, signs from x: cost(m) = db² (s ⊙ m)ᵀ A (s ⊙ m) - 2 db (A x ⊙ s)ᵀ m
  free   all of A, every sign pattern too (16 x 512 candidates)
measured as tr(ΔW H ΔWᵀ) of a 48 x 512 weight on correlated synthetic inputs (the
test_iq_lattice_gptq setup, two input ranks), against RTN with diag(H) as importance matrix.
Results: benchmarks/results/iq_group_choice.json.

    python benchmarks/iq_group_choice.py
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

from quantkit.codecs import registry
from quantkit.codecs.iq3 import IQ3Grid
from quantkit.codecs.lattice import F32
from quantkit.quant.gptq import GPTQConfig, accumulate_hessian, new_hessian, quantize_weight

HERE = os.path.dirname(os.path.abspath(__file__))
SIGNS4 = torch.tensor([[-1.0 if (p >> i) & 1 else 1.0 for i in range(4)] for p in range(16)])   # [16, 4]


def group_form(hinv: torch.Tensor) -> torch.Tensor:
    """A = (U_bᵀ U_b)^-1, float32, symmetric."""
    ub = hinv.double()
    A = torch.linalg.inv(ub.t() @ ub)
    return (0.5 * (A + A.t())).float()


class FullGrid(IQ3Grid):
    """IQ3_S, each group of 4 scored by its full within-group error (free=True: any signs)."""

    def __init__(self, in_features: int, search: bool = False, free: bool = False):
        super().__init__(False, in_features, search)
        self.m, self.free = torch.from_numpy(np.ascontiguousarray(self.values, dtype=F32)), free

    def round_group(self, w, p, j0, hinv):
        if not self.search:
            return super().round_group(w, p, j0, hinv)
        x, db = w.float(), p.db[:, j0 // 32]
        dead = ~(db > 0)
        A, m = group_form(hinv), self.m
        quad = torch.stack([((m @ (A * torch.outer(s, s))) * m).sum(dim=1) for s in SIGNS4])   # [16, 512]
        d = torch.from_numpy(np.where(dead, F32(0), db))[:, None]
        xa = x @ A
        if self.free:
            lin = torch.einsum("ri,pi,ei->rpe", xa, SIGNS4, m).reshape(x.shape[0], -1)
            best = (d * d * quad.reshape(1, -1) - 2 * d * lin).argmin(dim=1).numpy()
            pat, gi = best // m.shape[0], best % m.shape[0]
        else:
            pat = ((x < 0).long() << torch.arange(4)).sum(dim=1)
            gi = (d * d * quad[pat] - 2 * d * ((xa * SIGNS4[pat]) @ m.t())).argmin(dim=1).numpy()
            pat = pat.numpy()
        gi = gi.astype(np.int64)
        gi[dead] = 0
        neg = (SIGNS4[pat].numpy() < 0).astype(np.int64)
        neg[dead] = 0
        vals = (db[:, None] * self.values[gi]) * np.where(neg > 0, F32(-1), F32(1))
        codes = (2 * np.repeat(gi[:, None], 4, axis=1) + neg).astype(F32)
        return torch.from_numpy(codes), torch.from_numpy(vals.astype(F32))


def correlated(in_f: int, n: int, seed: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(in_f, in_f // rank, generator=g)
    X = A @ torch.randn(in_f // rank, n, generator=g) + 0.1 * torch.randn(in_f, n, generator=g)
    X[:4] *= 10
    return X.t().contiguous()


def main() -> None:
    torch.set_num_threads(1)
    W = torch.randn(48, 512, generator=torch.Generator().manual_seed(3)) * 0.05
    q = registry.qtype("iq3_s")
    cls = type(q)
    original = cls.gptq_grid
    out = {"loadavg": open("/proc/loadavg").read().split()[:3], "runs": []}
    for seed, rank in [(0, 8), (1, 2), (2, 32)]:
        X = correlated(512, 4096, seed, rank)
        H = new_hessian(512)
        n = 0
        for c in X.split(1000):
            n = accumulate_hessian(c, H, n)
        tr = lambda Wq: float(((W - Wq) @ H * (W - Wq)).sum())  # noqa: E731
        row = {"seed": seed, "input_rank": 512 // rank,
               "rtn": tr(q.dequantize_rows(q.quantize_rows(W, imatrix=torch.diagonal(H)), 512))}
        for label, make in [("diag", None), ("full", lambda f, s: FullGrid(f, s)),
                            ("free", lambda f, s: FullGrid(f, s, free=True))]:
            if make is not None:
                cls.gptq_grid = lambda self, f, search=False, make=make: make(f, search)
            try:
                t0 = time.process_time()
                row[label] = tr(quantize_weight(W, H, "iq3_s", GPTQConfig()).dequantized)
                row[f"{label}_cpu_s"] = round(time.process_time() - t0, 2)
            finally:
                cls.gptq_grid = original
        print(row, flush=True)
        out["runs"].append(row)
    with open(os.path.join(HERE, "results", "iq_group_choice.json"), "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
