"""GPTQ's inverse of the Cholesky factor: one triangular solve against the identity (LAPACK trsm,
n³ flops; what quantkit used for every size before) against quantkit's blockwise inverse by
halves (quant.gptq.invert_upper: matrix products, 2n³/3 flops), side by side in one run, at
the Hessian widths of 7B-13B models. Each is timed on the same factor of a random
positive-definite matrix (best of `--repeat`), and up to 5120 columns its error is measured
against a float64 solve (largest entry error relative to the largest entry).

    python benchmarks/tri_inverse.py [--sizes 4096,5120,13824] [--threads 2] [--repeat 2]
Results: benchmarks/results/tri_inverse.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def factor(n: int) -> torch.Tensor:
    """An upper-triangular Cholesky factor of a random Hessian from 4096 tokens (8 x 512, the
    scale benchmark's calibration) with GPTQ's 1% dampening, as its flipped factorisation
    produces it."""
    g = torch.Generator().manual_seed(n)
    X = torch.randn(n, 4096, generator=g)
    H = X @ X.t() / 4096
    H.diagonal().add_(0.01 * float(H.diagonal().mean()))
    return torch.linalg.cholesky(H.flip(0, 1)).flip(0, 1).contiguous()


def main() -> None:
    from quantkit.quant.gptq import invert_upper
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4096,5120,13824")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = {}
    for n in (int(s) for s in args.sizes.split(",")):
        R = factor(n)

        def trsm():
            return torch.linalg.solve_triangular(R, torch.eye(n), upper=True)

        def halves():
            out = torch.empty_like(R)
            # quantkit splits only past 4096 columns; at or below it the split is forced here,
            # once, to show what it would cost there
            invert_upper(R, out, leaf=4096 if n > 4096 else n // 2)
            return out

        row = {}
        ref = None
        for name, fn in (("trsm", trsm), ("halves", halves)):
            best, res = float("inf"), None
            for _ in range(args.repeat):
                t = time.perf_counter()
                res = fn()
                best = min(best, time.perf_counter() - t)
            if ref is None and n <= 5120:
                ref = torch.linalg.solve_triangular(R.double(), torch.eye(n, dtype=torch.float64), upper=True)
            err = None if ref is None else float((res.double() - ref).abs().max() / ref.abs().max())
            row[name] = {"seconds": round(best, 3), "rel_err": err}
            del res
        row["speedup"] = round(row["trsm"]["seconds"] / max(row["halves"]["seconds"], 1e-3), 2)
        rows[str(n)] = row
        print(n, row, flush=True)
    out = os.path.join(HERE, "results", "tri_inverse.json")
    with open(out, "w") as f:
        json.dump({"threads": args.threads, "sizes": rows}, f, indent=2)


if __name__ == "__main__":
    main()
