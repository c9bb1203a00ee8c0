"""The peer for budgeted GGUFs: llama.cpp's published `--target-bpw` / `--target-size` rule
(pull request #15550, not in the vendored llama.cpp), implemented here from its description:

  1. error estimate: for every quantizable tensor and every candidate type, the importance-
     weighted squared error of the tensor quantized *with the importance matrix* and
     dequantized, sum_rows sum_j imatrix_j (w_ij - q_ij)^2, on a sample of rows (scaled to the
     whole tensor); tensors without an importance entry (the token embedding) weigh 1;
  2. per tensor the Pareto frontier (lower convex hull) of (bytes, error);
  3. Lagrangian relaxation: each tensor takes argmin error + lambda x bytes on its frontier,
     lambda bisected to the least value whose total fits the budget; the bytes left are spent
     greedily on the frontier step with the best error drop per byte that still fits.

The chosen types are written by llama-quantize itself (--imatrix, --token-embedding-type and a
--tensor-type-file naming every tensor), so the file is what llama.cpp's rule would produce.
Candidate types: the same set quantkit's allocation chooses from (quant.sensitivity), so the
two differ only in the rule.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from helpers.ggml_reference import ggml_dequantize, ggml_quantize  # noqa: E402  (llama.cpp's quantizer, ctypes)

SAMPLE_ROWS = 256


def _tensors(f32_path: str):
    from gguf import GGUFReader
    from quantkit.quant.gguf_policy import allows_quantization
    r = GGUFReader(f32_path)
    for t in r.tensors:
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))       # rows, cols
        if allows_quantization(t.name, len(shape)):
            yield t.name, shape, t.data.reshape(shape)          # a view of the mapped file: rows read on use


def tensor_errors(f32_path: str, imatrix_path: str) -> dict[str, dict[str, tuple[int, float]]]:
    """name -> type -> (bytes, importance-weighted squared error)."""
    from quantkit.models.imatrix_file import read_imatrix
    from quantkit.quant.budget import tensor_bytes
    from quantkit.quant.sensitivity import candidate_types
    imx = read_imatrix(imatrix_path)
    out = {}
    for name, shape, w in _tensors(f32_path):
        qw = imx.weights(name)
        rows = shape[0]
        idx = np.linspace(0, rows - 1, min(rows, SAMPLE_ROWS)).round().astype(np.int64)
        x = np.ascontiguousarray(w[idx], dtype=np.float32)
        imp = np.ones(shape[1], np.float32) if qw is None else qw
        errs = {}
        for t in candidate_types(shape):
            if t == "f16":
                d = x.astype(np.float16).astype(np.float32)
            else:
                d = ggml_dequantize(t, ggml_quantize(t, x, qw), shape[1]).reshape(x.shape)
            e = float((((x - d) ** 2) * imp).sum(dtype=np.float64)) * rows / len(idx)
            errs[t] = (tensor_bytes(t, shape), e)
        out[name] = errs
    return out


def _frontier(opts: dict[str, tuple[int, float]]) -> list[tuple[str, int, float]]:
    """The lower convex hull of (bytes, error), smallest first."""
    pts = sorted(((b, e, t) for t, (b, e) in opts.items()), key=lambda p: (p[0], p[1]))
    keep = []
    for b, e, t in pts:
        if keep and e >= keep[-1][2]:
            continue                                   # larger and no better
        while len(keep) >= 2:
            (t1, b1, e1), (t2, b2, e2) = keep[-2], keep[-1]
            if (e2 - e1) * (b - b1) >= (e - e1) * (b2 - b1):  # keep[-1] above the chord
                keep.pop()
            else:
                break
        keep.append((t, b, e))
    return keep


def allocate_lagrangian(errors: dict[str, dict[str, tuple[int, float]]], room: int) -> dict[str, str]:
    """One type per tensor, total bytes <= room, by the Lagrangian sweep plus greedy fill."""
    fronts = {n: _frontier(o) for n, o in errors.items()}

    def pick(lam):
        return {n: min(range(len(f)), key=lambda i: f[i][2] + lam * f[i][1]) for n, f in fronts.items()}

    def total(ch):
        return sum(fronts[n][i][1] for n, i in ch.items())

    lo, hi = 0.0, 1.0
    while total(pick(hi)) > room:
        hi *= 4
        if hi > 1e30:
            raise ValueError(f"no mix fits {room} bytes")
    if total(pick(lo)) <= room:
        hi = lo
    for _ in range(100):
        mid = (lo + hi) / 2
        if total(pick(mid)) <= room:
            hi = mid
        else:
            lo = mid
    ch = pick(hi)
    used = total(ch)
    while True:                                        # spend what is left: best error drop per byte
        best, rate = None, 0.0
        for n, i in ch.items():
            f = fronts[n]
            if i + 1 < len(f):
                grow = f[i + 1][1] - f[i][1]
                r = (f[i][2] - f[i + 1][2]) / max(grow, 1)
                if used + grow <= room and r > rate:
                    best, rate = n, r
        if best is None:
            break
        used += fronts[best][ch[best] + 1][1] - fronts[best][ch[best]][1]
        ch[best] += 1
    return {n: fronts[n][i][0] for n, i in ch.items()}


def quantizable_bytes(stock_path: str, names) -> int:
    """The bytes the stock file spends on `names` (the room the peer allocates)."""
    from gguf import GGUFReader
    r = GGUFReader(stock_path)
    names = set(names)
    return sum(int(t.n_bytes) for t in r.tensors if t.name in names)


def make_peer(f32_path: str, imatrix_path: str, stock_path: str, out: str, tools: str, threads: int,
              errors: dict | None = None) -> dict:
    """The peer's file at the stock file's size; returns its choice and the errors (reusable)."""
    errors = errors or tensor_errors(f32_path, imatrix_path)
    room = quantizable_bytes(stock_path, errors)
    choice = allocate_lagrangian(errors, room)
    types_file = out + ".types.txt"
    with open(types_file, "w") as f:
        for n, t in choice.items():
            if n != "token_embd.weight":
                f.write("^" + n.replace(".", r"\.") + "$=" + t + "\n")
    cmd = [os.path.join(tools, "llama-quantize"), "--imatrix", imatrix_path, "--tensor-type-file", types_file]
    if "token_embd.weight" in choice:
        cmd += ["--token-embedding-type", choice["token_embd.weight"]]
    cmd += [f32_path, out, "Q8_0", str(threads)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return {"choice": choice, "room": room, "command": " ".join(cmd)}
