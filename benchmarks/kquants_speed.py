"""K-quant encode/decode speed: quantkit (torch) vs llama.cpp's reference quantizer, same input.

    .venv/bin/python benchmarks/kquants_speed.py [--types q6_k,q4_k] [--rows 640] [--cols 262144]
                                                 [--threads 2] [--repeats 1]

Default input: a 640 x 262144 float32 tensor of N(0, 1) values (168M values: the size of
Gemma-3-270M's token embedding). llama.cpp's side is `ggml_quantize_chunk` without an importance
matrix (the function llama-quantize runs per tensor), called once over the whole tensor on one
thread (llama-quantize splits a tensor over its threads itself). gguf-py has no K-quant encoder.
Writes benchmarks/results/kquants_speed.json and prints a Markdown table for BENCHMARKS.md.
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

from quantkit.codecs import kquants  # noqa: E402
from quantkit.codecs.registry import qtype  # noqa: E402


def _timed(fn):
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default=",".join(f.name for f in kquants.FORMATS))
    ap.add_argument("--rows", type=int, default=640)
    ap.add_argument("--cols", type=int, default=262144)
    ap.add_argument("--threads", type=int, default=None, help="quantkit worker threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--no-reference", action="store_true", help="skip llama.cpp (no llama-cpp-python)")
    args = ap.parse_args(argv)

    ref = None
    if not args.no_reference:
        try:
            import helpers.ggml_reference as ref
        except ImportError:
            ref = None
    torch.manual_seed(0)
    x = torch.randn(args.rows, args.cols)
    rows = []
    for qt in args.types.split(","):
        best = None
        for _ in range(args.repeats):
            q, wall, cpu = _timed(lambda: qtype(qt).quantize_rows(x, threads=args.threads))
            best = (wall, cpu) if best is None or wall < best[0] else best
        _, dq_wall, _ = _timed(lambda: qtype(qt).dequantize(q, x.shape, threads=args.threads))
        row = {"type": qt, "values": x.numel(), "quantkit_s": round(best[0], 2), "quantkit_cpu_s": round(best[1], 2),
               "quantkit_dequantize_s": round(dq_wall, 2)}
        if ref is not None:
            r, wall, _ = _timed(lambda: ref.ggml_quantize(qt, x.numpy()))
            row["llama_cpp_1thread_s"] = round(wall, 2)
            row["bytes_equal"] = bool(np.array_equal(r, q.numpy()))
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "torch_threads": torch.get_num_threads()},
              "shape": [args.rows, args.cols], "rows": rows,
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "kquants_speed.json"), "w") as f:
        json.dump(result, f, indent=1)
    print("\n| type | quantkit (s) | CPU (s) | llama.cpp 1 thread (s) | bytes equal | dequantize (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['type']} | {r['quantkit_s']} | {r['quantkit_cpu_s']} | {r.get('llama_cpp_1thread_s', '-')} | "
              f"{r.get('bytes_equal', '-')} | {r['quantkit_dequantize_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
