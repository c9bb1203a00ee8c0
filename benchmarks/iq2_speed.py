"""IQ2_XXS / IQ2_XS / IQ2_S encode speed: quantkit (numpy + torch) vs llama.cpp's quantizer, same
input and importance weights, side by side, one thread each.

    .venv/bin/python benchmarks/iq2_speed.py [--types iq2_xxs,iq2_xs,iq2_s] [--rows 1024]
                                             [--cols 4096] [--repeats 1] [--threads 1]

Input: a rows x cols float32 tensor of N(0, 1) values and random positive importance weights
(one per column, as an imatrix gives). llama.cpp's side is `ggml_quantize_chunk` with those
weights (what llama-quantize runs per tensor), once over the whole tensor on one thread, after
`ggml_quantize_init` (its neighbour tables are built before the clock starts; quantkit's are
built by a warm-up call too). Both wall and CPU seconds are recorded (the machine is shared:
CPU seconds are the steadier comparison). Writes benchmarks/results/iq2_speed.json and prints
a Markdown table for BENCHMARKS.md.
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

from quantkit.codecs.registry import qtype  # noqa: E402


def _timed(fn):
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def _best(fn, repeats):
    best = None
    for _ in range(repeats):
        out, wall, cpu = _timed(fn)
        best = (out, wall, cpu) if best is None or cpu < best[2] else best
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="iq2_xxs,iq2_xs,iq2_s")
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="quantkit worker threads (llama.cpp: always 1)")
    args = ap.parse_args(argv)

    import helpers.ggml_reference as ref

    torch.set_num_threads(1)
    g = np.random.default_rng(0)
    x = g.standard_normal((args.rows, args.cols)).astype(np.float32)
    imp = (g.random(args.cols) * 4 + 0.05).astype(np.float32)
    xt, it = torch.from_numpy(x), torch.from_numpy(imp)
    rows = []
    for qt in args.types.split(","):
        q = qtype(qt)
        q.quantize_rows(xt[:1], imatrix=it, threads=1)          # warm-up: tables, neighbour lists
        ref.ggml_quantize(qt, x[:1], imp)
        ours, wall, cpu = _best(lambda: q.quantize_rows(xt, imatrix=it, threads=args.threads), args.repeats)
        theirs, c_wall, c_cpu = _best(lambda: ref.ggml_quantize(qt, x, imp), args.repeats)
        row = {"type": qt, "values": x.size, "quantkit_s": round(wall, 2), "quantkit_cpu_s": round(cpu, 2),
               "llama_cpp_1thread_s": round(c_wall, 2), "llama_cpp_cpu_s": round(c_cpu, 2),
               "ratio_cpu": round(cpu / c_cpu, 2), "ratio_wall": round(wall / c_wall, 2),
               "bytes_equal": bool(np.array_equal(ours.numpy(), theirs))}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load": os.getloadavg()},
              "shape": [args.rows, args.cols], "threads": args.threads, "rows": rows,
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "iq2_speed.json"), "w") as f:
        json.dump(result, f, indent=1)
    print("\n| type | quantkit wall (s) | quantkit CPU (s) | llama.cpp wall (s) | llama.cpp CPU (s) | ratio (CPU) | bytes equal |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['type'].upper()} | {r['quantkit_s']} | {r['quantkit_cpu_s']} | {r['llama_cpp_1thread_s']} | "
              f"{r['llama_cpp_cpu_s']} | {r['ratio_cpu']} | {r['bytes_equal']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
