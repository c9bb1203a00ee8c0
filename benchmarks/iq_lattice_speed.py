"""Lattice IQ types (IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M): encode speed of
quantkit (numpy) against llama.cpp's own quantizer, same input and importance weights, side by
side in one process, one thread each.

    PYTHONPATH=src nice .venv/bin/python benchmarks/iq_lattice_speed.py [--types iq3_xxs,...]
        [--rows 2048] [--cols 2048] [--repeats 3] [--no-real] [--unweighted] [--f32 FILE]
        [--before SRC]

Inputs: (1) a rows x cols float32 N(0, 1) tensor with random positive importance weights (one
per column, as an imatrix gives them); (2) unless --no-real, a real tensor: blk.0.ffn_down of
the bundled Gemma-3-270M (F32 reference, 640 x 2048) with its column weights from llama-imatrix's
16-chunk file of benchmarks/imatrix_exact.py when present (random weights otherwise).
llama.cpp's side is `ggml_quantize_chunk` (libggml-base.so of llama-cpp-python, what
llama-quantize runs per tensor) after `ggml_quantize_init`; quantkit's is
`qtype(t).quantize_rows(x, imatrix=w, threads=1)` after a warm-up call that builds its neighbour
tables. Both sides alternate, best of --repeats by CPU seconds (the machine is shared: CPU
seconds are the comparison; wall seconds are recorded too). --unweighted adds the encode without
importance weights where llama.cpp allows it. --before SRC (another source tree of quantkit, e.g.
`git archive COMMIT src | tar -x -C DIR` and DIR/src) also times that tree's encoder on the same
input in a child process, before each pair, best of --repeats by CPU seconds: before/after in one
run. --f32 FILE reads the real tensor from that F32 GGUF instead of quantkit's F32 reference.
Writes benchmarks/results/iq_lattice_speed.json and prints a Markdown table.
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
from quantkit.codecs.registry import qtype  # noqa: E402

TYPES = "iq3_xxs,iq3_s,iq2_xxs,iq2_xs,iq2_s,iq1_s,iq1_m"
IMATRIX = os.path.expanduser("~/.cache/quantkit/bench-imatrix/imatrix-llama-16.gguf")
REAL = "blk.0.ffn_down.weight"


def _timed(fn):
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def _pair(ours, theirs, repeats):
    """Alternate the two sides `repeats` times; each side's run with the least CPU seconds."""
    best = {}
    for _ in range(repeats):
        for side, fn in (("llama", theirs), ("quantkit", ours)):
            out, wall, cpu = _timed(fn)
            if side not in best or cpu < best[side][2]:
                best[side] = (out, wall, cpu)
    return best["quantkit"], best["llama"]


BEFORE = """
import sys, time, numpy as np, torch
torch.set_num_threads(1)
from quantkit.codecs.registry import qtype
x, w = np.load(sys.argv[1]), np.load(sys.argv[2])
q, xt, wt = qtype(sys.argv[3]), torch.from_numpy(x), torch.from_numpy(w)
q.quantize_rows(xt[:1], imatrix=wt, threads=1)
best = None
for _ in range(int(sys.argv[4])):
    c0 = time.process_time(); q.quantize_rows(xt, imatrix=wt, threads=1); c = time.process_time() - c0
    best = c if best is None else min(best, c)
print(best)
"""


def before_cpu(src: str, qt: str, x: np.ndarray, w: np.ndarray, repeats: int) -> float:
    """CPU seconds of the encoder of the source tree `src` (a child process), best of repeats."""
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        np.save(os.path.join(d, "x.npy"), x)
        np.save(os.path.join(d, "w.npy"), w)
        env = dict(os.environ, PYTHONPATH=os.path.abspath(src))
        out = subprocess.run([sys.executable, "-c", BEFORE, os.path.join(d, "x.npy"), os.path.join(d, "w.npy"), qt,
                              str(repeats)], env=env, check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1])


def real_tensor(f32: str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    from quantkit.eval.lm import f32_reference
    from quantkit.models.bundled import bundled_path
    from quantkit.models.gguf import GGUFSource
    src = GGUFSource(f32 or f32_reference(bundled_path(), 2, show_progress=False))
    try:
        x = np.ascontiguousarray(src.load(REAL).numpy(), dtype=np.float32)
    finally:
        src.close()
    if os.path.exists(IMATRIX):
        from quantkit.models.imatrix_file import read_imatrix
        return x, read_imatrix(IMATRIX).weights(REAL).astype(np.float32), "llama-imatrix 16 chunks"
    return x, (np.random.default_rng(1).random(x.shape[1]) * 3 + 0.05).astype(np.float32), "random"


def bench(qt: str, x: np.ndarray, w: np.ndarray, repeats: int, unweighted: bool, before: str | None = None) -> dict:
    q = qtype(qt)
    before_s = before_cpu(before, qt, x, w, repeats) if before else None
    xt, wt = torch.from_numpy(x), torch.from_numpy(w)
    _, init_ref, _ = _timed(lambda: ref.libggml().ggml_quantize_init(int(q.ggml)))
    _, init_ours, _ = _timed(lambda: q.quantize_rows(xt[:1], imatrix=wt, threads=1))
    (o, wall, cpu), (r, rwall, rcpu) = _pair(lambda: q.quantize_rows(xt, imatrix=wt, threads=1),
                                             lambda: ref.ggml_quantize(qt, x, w), repeats)
    row = {"type": qt, "shape": list(x.shape), "load_1min": round(os.getloadavg()[0], 2),
           "llama_cpp_s": round(rwall, 3), "llama_cpp_cpu_s": round(rcpu, 3),
           "quantkit_s": round(wall, 3), "quantkit_cpu_s": round(cpu, 3),
           "ratio_cpu": round(cpu / rcpu, 2), "ratio_wall": round(wall / rwall, 2),
           "bytes_equal": bool(np.array_equal(r, o.numpy())),
           "init_llama_cpp_s": round(init_ref, 2), "init_quantkit_s": round(init_ours, 2)}
    if before_s is not None:
        row.update(before_quantkit_cpu_s=round(before_s, 3), after_over_before=round(cpu / before_s, 2))
    if unweighted and not q.needs_imatrix:
        (o0, _, c0), (r0, _, rc0) = _pair(lambda: q.quantize_rows(xt, threads=1), lambda: ref.ggml_quantize(qt, x),
                                          repeats)
        row.update(unweighted_llama_cpp_cpu_s=round(rc0, 3), unweighted_quantkit_cpu_s=round(c0, 3),
                   unweighted_ratio_cpu=round(c0 / rc0, 2), unweighted_bytes_equal=bool(np.array_equal(r0, o0.numpy())))
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default=TYPES)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-real", action="store_true", help="only the random tensor")
    ap.add_argument("--unweighted", action="store_true", help="also time the encode without importance weights")
    ap.add_argument("--f32", default=None, help="read the real tensor from this F32 GGUF")
    ap.add_argument("--before", default=None, help="another quantkit source tree to time alongside (its src/)")
    ap.add_argument("--results", default=os.path.join(HERE, "results", "iq_lattice_speed.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    g = np.random.default_rng(0)
    inputs = [("random N(0,1)", g.standard_normal((args.rows, args.cols)).astype(np.float32),
               (g.random(args.cols) * 2 + 0.01).astype(np.float32), "random")]
    if not args.no_real:
        x, w, wsrc = real_tensor(args.f32)
        inputs.append((REAL, x, w, wsrc))
    rows = []
    for label, x, w, wsrc in inputs:
        for qt in args.types.split(","):
            row = {"input": label, "weights": wsrc, **bench(qt, x, w, args.repeats, args.unweighted, args.before)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    flags = open("/proc/cpuinfo").read().split("flags", 1)[1].split("\n", 1)[0]
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "flags": [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16") if f in flags.split()]},
              "repeats": args.repeats, "rows": rows,
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(args.results + ".tmp", args.results)
    print("\n| input | type | llama.cpp CPU s (wall) | quantkit CPU s (wall) | before CPU s | ratio CPU | ratio wall "
          "| bytes equal | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['input']} {r['shape'][0]}x{r['shape'][1]} | {r['type'].upper()} | {r['llama_cpp_cpu_s']} "
              f"({r['llama_cpp_s']}) | {r['quantkit_cpu_s']} ({r['quantkit_s']}) | "
              f"{r.get('before_quantkit_cpu_s', '-')} | "
              f"{r['ratio_cpu']} | {r['ratio_wall']} | {r['bytes_equal']} | {r['load_1min']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
