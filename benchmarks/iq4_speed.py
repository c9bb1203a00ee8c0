"""IQ4 / ternary / FP4 encoding speed: quantkit (torch) vs llama.cpp's quantizer, same input, one thread each.

    nice .venv/bin/python benchmarks/iq4_speed.py [--types iq4_nl,iq4_xs,...] [--rows 2048] [--cols 8192]
                                                  [--repeats 3] [--imatrix]

Default input: a 2048 x 8192 float32 tensor of N(0, 1) values (16.8M values). llama.cpp's side
is `ggml_quantize_chunk` (the function llama-quantize runs per tensor) through ctypes in
llama-cpp-python's libggml-base.so, one call over the whole tensor on one thread; quantkit's is
`qtype(t).quantize_rows(x, threads=1)`. Each side runs `--repeats` times, alternating, and the
fastest of each is kept; times are this process's CPU seconds (the work done, which a shared
machine's load does not inflate as it does the wall time, also reported). --imatrix: both sides also given random
importance weights (only IQ4_NL / IQ4_XS read them). Writes benchmarks/results/iq4_speed.json
and prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from quantkit.codecs.registry import qtype  # noqa: E402

TYPES = "iq4_nl,iq4_xs,tq1_0,tq2_0,mxfp4,nvfp4,q1_0"


def _cpu() -> dict:
    info = {"cpus": os.cpu_count(), "platform": platform.platform(), "load": os.getloadavg()}
    try:
        text = open("/proc/cpuinfo").read()
        info["model"] = next(ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name"))
        flags = set(next(ln for ln in text.splitlines() if ln.startswith("flags")).split())
        info["flags"] = sorted(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16") if f in flags)
    except (OSError, StopIteration):
        pass
    return info


def _timed(fn) -> tuple[float, float, object]:
    """(wall seconds, this process's CPU seconds, result): on a shared machine the CPU time is
    the work done, the wall time also the waiting for a core."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default=TYPES)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--imatrix", action="store_true")
    args = ap.parse_args(argv)

    import helpers.ggml_reference as ref

    torch.manual_seed(0)
    torch.set_num_threads(1)
    x = torch.randn(args.rows, args.cols)
    xn = x.numpy()
    w = torch.rand(args.cols) * 4 if args.imatrix else None
    wn = None if w is None else w.numpy()
    rows = []
    for qt in args.types.split(","):
        ours, theirs = [], []
        for _ in range(args.repeats):             # alternate, so both see the same load
            wall, cpu, q = _timed(lambda: qtype(qt).quantize_rows(x, threads=1, imatrix=w))
            ours.append((cpu, wall))
            wall, cpu, r = _timed(lambda: ref.ggml_quantize(qt, xn, imatrix=wn))
            theirs.append((cpu, wall))
        (oc, ow), (tc, tw) = min(ours), min(theirs)
        row = {"type": qt, "values": x.numel(), "imatrix": w is not None,
               "quantkit_cpu_s": round(oc, 3), "llama_cpp_cpu_s": round(tc, 3), "ratio_cpu": round(oc / tc, 2),
               "quantkit_wall_s": round(ow, 3), "llama_cpp_wall_s": round(tw, 3),
               "bytes_equal": bool(np.array_equal(r, q.numpy()))}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"machine": _cpu(), "shape": [args.rows, args.cols], "threads": 1, "repeats": args.repeats,
              "rows": rows}
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    name = "iq4_speed_imatrix.json" if args.imatrix else "iq4_speed.json"
    with open(os.path.join(HERE, "results", name), "w") as f:
        json.dump(result, f, indent=1)
    print("\n| type | quantkit CPU s (wall) | llama.cpp CPU s (wall) | ratio (CPU) | bytes equal |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['type']} | {r['quantkit_cpu_s']} ({r['quantkit_wall_s']}) | {r['llama_cpp_cpu_s']} "
              f"({r['llama_cpp_wall_s']}) | {r['ratio_cpu']} | {r['bytes_equal']} |")
    return 0 if all(r["bytes_equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
