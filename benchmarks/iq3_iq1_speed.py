"""IQ3_XXS / IQ3_S / IQ1_S / IQ1_M encode speed: quantkit (numpy) vs llama.cpp's own quantizer.

    .venv/bin/python benchmarks/iq3_iq1_speed.py [--types iq3_xxs,iq3_s,iq1_s,iq1_m] [--rows 1024]
                                                 [--cols 4096] [--repeats 1]

Input: a rows x cols float32 tensor of N(0, 1) values with random positive importance weights
(one per column, as an imatrix gives them; the RTN encode llama-quantize --imatrix runs per
tensor). Both sides run on one thread: llama.cpp's `ggml_quantize_chunk` over the whole tensor,
quantkit's `quantize_rows(x, imatrix=w, threads=1)` (torch's intra-op threads off too). The
one-time set-up (llama.cpp's ggml_quantize_init, quantkit's neighbour lists) is timed apart.
Also times the unweighted encode where llama.cpp allows it, and decoding. Writes
benchmarks/results/iq3_iq1_speed.json and prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import helpers.ggml_reference as ref  # noqa: E402
from quantkit.codecs import lattice  # noqa: E402
from quantkit.codecs.registry import qtype  # noqa: E402

LATTICE = {"iq3_xxs": "iq3xxs", "iq3_s": "iq3s", "iq1_s": "iq1s", "iq1_m": "iq1s"}


def _timed(fn):
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def _best(fn, repeats):
    best = None
    for _ in range(repeats):
        out, wall, cpu = _timed(fn)
        best = (out, wall, cpu) if best is None or wall < best[1] else best
    return best


def _load() -> str:
    try:
        return os.getloadavg()[0].__format__(".2f")
    except OSError:
        return "?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="iq3_xxs,iq3_s,iq1_s,iq1_m")
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    g = np.random.default_rng(0)
    x = g.standard_normal((args.rows, args.cols)).astype(np.float32)
    w = (g.random(args.cols) * 2 + 0.01).astype(np.float32)
    xt, wt = torch.from_numpy(x), torch.from_numpy(w)
    lib = ref.libggml()
    rows = []
    for qt in args.types.split(","):
        q = qtype(qt)
        _, init_ref, _ = _timed(lambda: lib.ggml_quantize_init(int(q.ggml)))
        _, init_ours, _ = _timed(lambda: lattice.lattice(LATTICE[qt]))
        r, ref_wall, ref_cpu = _best(lambda: ref.ggml_quantize(qt, x, w), args.repeats)
        o, wall, cpu = _best(lambda: q.quantize_rows(xt, imatrix=wt, threads=1), args.repeats)
        row = {"type": qt, "shape": [args.rows, args.cols], "load_1min": _load(),
               "llama_cpp_s": round(ref_wall, 2), "llama_cpp_cpu_s": round(ref_cpu, 2),
               "quantkit_s": round(wall, 2), "quantkit_cpu_s": round(cpu, 2),
               "ratio_cpu": round(cpu / ref_cpu, 2), "bytes_equal": bool(np.array_equal(r, o.numpy())),
               "init_llama_cpp_s": round(init_ref, 2), "init_quantkit_s": round(init_ours, 2)}
        if not q.needs_imatrix:
            r0, ref0, ref0_cpu = _best(lambda: ref.ggml_quantize(qt, x), args.repeats)
            o0, w0, c0 = _best(lambda: q.quantize_rows(xt, threads=1), args.repeats)
            row.update(unweighted_llama_cpp_cpu_s=round(ref0_cpu, 2), unweighted_quantkit_cpu_s=round(c0, 2),
                       unweighted_bytes_equal=bool(np.array_equal(r0, o0.numpy())))
        _, dq, _ = _timed(lambda: q.dequantize(o, x.shape, threads=1))
        _, dq_ref, _ = _timed(lambda: ref.ggml_dequantize(qt, r, args.cols))
        row.update(dequantize_s=round(dq, 2), dequantize_llama_cpp_s=round(dq_ref, 2))
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "rows": rows,
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "iq3_iq1_speed.json"), "w") as f:
        json.dump(result, f, indent=1)
    print("\n| type | llama.cpp CPU (s) | quantkit CPU (s) | ratio | bytes equal | unweighted: llama.cpp / quantkit CPU (s) "
          "| decode quantkit / llama.cpp (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        unw = (f"{r['unweighted_llama_cpp_cpu_s']} / {r['unweighted_quantkit_cpu_s']}"
               if "unweighted_quantkit_cpu_s" in r else "needs weights")
        print(f"| {r['type']} | {r['llama_cpp_cpu_s']} | {r['quantkit_cpu_s']} | {r['ratio_cpu']}x | {r['bytes_equal']} "
              f"| {unw} | {r['dequantize_s']} / {r['dequantize_llama_cpp_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
