"""Data-parallel GPTQ on Ray against the single-process run, side by side in one run: GPTQ Q4_0
of the bundled Gemma-3-270M (from its F32 dequantization, as benchmarks/gguf_gptq.py does),
calibrated on N x 512 tokens of wikitext-2 valid (default 64, gguf_gptq.py's), three ways:

  local     the single-process pipeline, --threads T
  ray x1    a local Ray runtime, 1 worker with T CPUs
  ray x2    a local Ray runtime, 2 workers with T/2 CPUs each

Each run is a child process (its own Ray runtime); it reports its wall time, the pipeline's
phases, the driver's peak RSS and every worker's (getrusage in each process). The files are then
scored by quantkit's evaluation (llama.cpp runtime, 8 chunks of BOS + 511 tokens of wikitext-2
test, KL divergence to the F32 file). Results: benchmarks/results/ray_gptq.json.

    python benchmarks/ray_gptq.py [--chunks 64] [--threads 2] [--runs local,1,2] [--markdown]
    python benchmarks/ray_gptq.py --paper      # the 70B model on paper (see `paper`)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DATA = os.path.join(REPO, "src", "quantkit", "data")
WORK = os.path.join(os.environ.get("QUANTKIT_CACHE", os.path.expanduser("~/.cache/quantkit")), "bench-ray-gptq")
RESULTS = os.path.join(HERE, "results", "ray_gptq.json")


def run_one(f32: str, out: str, workers: int, threads: int, chunks: int) -> dict:
    """In the child: one GPTQ Q4_0 run; its report as a dict."""
    import resource

    import torch

    from quantkit.quant.gguf_gptq import export_gguf_gptq
    from quantkit.quant.gptq import GPTQConfig
    from quantkit.recipe import DEFAULT_SHRINK
    torch.set_num_threads(threads)
    ray = None
    if workers:
        from quantkit.quant.distributed import RayOptions
        ray = RayOptions(workers=workers, cpus_per_worker=max(1, threads // workers))
    t0 = time.perf_counter()
    rep = export_gguf_gptq(f32, out, "q4_0", calib=os.path.join(DATA, "wikitext-2", "valid.txt"), nsamples=chunks,
                           seqlen=512, gptq=GPTQConfig(shrink=DEFAULT_SHRINK["gguf"]), show_progress=False, ray=ray)
    wall = time.perf_counter() - t0
    return {"wall_s": round(wall, 2), "gptq_s": round(rep.gptq_seconds, 2),
            "phases": {k: round(v, 2) for k, v in rep.phases.items()},
            "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "workers": getattr(rep, "workers", []), "bytes": os.path.getsize(out),
            "sha256": hashlib.sha256(open(out, "rb").read()).hexdigest()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=64, help="calibration chunks of 512 tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", default="local,1,2", help="local and/or worker counts")
    ap.add_argument("--eval-chunks", type=int, default=8)
    ap.add_argument("--skip-eval", action="store_true", help="keep the KL divergences already in the results")
    ap.add_argument("--fresh", action="store_true", help="re-run every run named in --runs")
    ap.add_argument("--markdown", action="store_true", help="print the BENCHMARKS.md table of the last results")
    ap.add_argument("--paper", action="store_true", help="print the 70B cost model's table")
    ap.add_argument("--child", nargs=3, metavar=("F32", "OUT", "WORKERS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        f32, out, w = args.child
        print("RESULT " + json.dumps(run_one(f32, out, int(w), args.threads, args.chunks)), flush=True)
        return
    if args.markdown:
        print(markdown(json.load(open(RESULTS))))
        return
    if args.paper:
        overhead = 0.0
        if os.path.exists(RESULTS):
            overhead = ray_overhead_per_block(json.load(open(RESULTS)))
        print(paper_table(overhead))
        return
    os.makedirs(WORK, exist_ok=True)
    from quantkit.eval.lm import f32_reference
    from quantkit.models.bundled import bundled_path
    f32 = f32_reference(bundled_path(), args.threads, show_progress=False)
    res = {"runs": {}, "eval": {}}
    if os.path.exists(RESULTS):                 # runs already made with the same settings are kept
        old = json.load(open(RESULTS))
        if (old.get("chunks"), old.get("threads")) == (args.chunks, args.threads):
            res = old
    res.update({"command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]), "chunks": args.chunks,
                "threads": args.threads, "machine": machine()})
    files = {}
    for r in args.runs.split(","):
        workers = 0 if r == "local" else int(r)
        label = "local" if not workers else f"ray x{workers}"
        out = os.path.join(WORK, f"q4_0-gptq-{args.chunks}-{'local' if not workers else f'ray{workers}'}.gguf")
        files[label] = out
        if label in res["runs"] and os.path.exists(out) and not args.fresh:
            continue
        log = os.path.join(WORK, f"{label.replace(' ', '')}.log")
        t0 = time.perf_counter()
        with open(log, "w") as f:
            p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", f32, out, str(workers),
                                "--threads", str(args.threads), "--chunks", str(args.chunks)],
                               stdout=subprocess.PIPE, stderr=f, text=True)
        if p.returncode != 0:
            raise SystemExit(f"{label} failed ({p.returncode}); see {log}")
        row = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
        row["process_wall_s"] = round(time.perf_counter() - t0, 2)
        res["runs"][label] = row
        print(label, json.dumps(row), flush=True)
        save(res)
    if args.skip_eval:
        save(res)
        print(markdown(res))
        return
    from quantkit import api
    files = {k: p for k, p in files.items() if k in res["runs"]}
    ev = api.evaluate([f32, *files.values()], ref=f32, text=os.path.join(DATA, "wikitext-2", "test.txt"),
                      n_chunks=args.eval_chunks, speed=False, n_threads=args.threads, show_progress=False)
    names = {os.path.realpath(p): k for k, p in files.items()}
    for row in ev.rows:
        key = names.get(os.path.realpath(row.path))
        if key:
            res["eval"][key] = {k: getattr(row, k) for k in ("ppl", "kld_mean", "kld_median", "kld_p99",
                                                             "top1_agreement")}
    print(json.dumps(res["eval"], indent=1))
    save(res)
    print(markdown(res))


def save(res: dict) -> None:
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS + ".tmp", "w") as f:
        json.dump(res, f, indent=2)
    os.replace(RESULTS + ".tmp", RESULTS)


def machine() -> dict:
    name = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    flags = open("/proc/cpuinfo").read().split("flags", 2)[1].split("\n", 1)[0].split()
    return {"cpu": name.split(":", 1)[-1].strip(), "nproc": os.cpu_count(),
            "flags": [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16") if f in flags]}


def markdown(r: dict) -> str:
    local = r["runs"].get("local")
    lines = ["| run | wall s | GPTQ blocks s | per block s | vs local | driver peak RSS MB | worker peak RSS MB "
             "| KLD wikitext-2 test | PPL | bytes equal local | Ray overhead s/block |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, row in r["runs"].items():
        blocks = sum(v for k, v in row["phases"].items() if k in ("load", "hessians", "solve", "propagate", "write"))
        ev = r["eval"].get(label, {})
        wk = ", ".join(f"{w['peak_rss_mb']:.0f}" for w in row.get("workers", [])) or "-"
        ratio = f"{row['wall_s'] / local['wall_s']:.2f}x" if local else ""
        same = "yes" if local and row["sha256"] == local["sha256"] else ("-" if label == "local" else "no")
        # the driver's block time less the busiest worker's own compute: calls, transfers, waiting
        busy = max((sum(w["seconds"].values()) for w in row.get("workers", [])), default=None)
        over = f"{(blocks - busy) / 18:.2f}" if busy is not None else "-"
        lines.append(f"| {label} | {row['wall_s']:.1f} | {blocks:.1f} | {blocks / 18:.2f} | {ratio} | "
                     f"{row['driver_peak_rss_mb']} | {wk} | {ev.get('kld_mean', float('nan')):.4f} | "
                     f"{ev.get('ppl', float('nan')):.3f} | {same} | {over} |")
    return "\n".join(lines)


# ---- GPTQ of a 70B llama on paper --------------------------------------------------------------
# Shapes: 80 blocks, hidden 8192, MLP 28672, 64 heads of 128, 8 kv heads; calibration 128 x 2048.
# Machines: 32 cores, 10 Gb/s (1.25 GB/s each way). Rates measured on this 2-core AVX2 box and
# scaled by 16 for 32 cores (same per-core speed, perfect threading: optimistic for the solves):
CALIB_GFLOPS_2CORE = 140.0   # block forward + X^T X, Gemma-3-270M (BENCHMARKS.md, "Where the 134-139 s go")
SOLVE_GFLOPS_2CORE = 62.0    # GPTQ solve incl. Q4_0 scale search: 13B-shaped block, 121 s for 7.5 TFLOP
CORES_SCALE = 32 / 2
LINK_GBS = 1.25              # 10 Gb/s
H, F, HEADS, KV, HD, BLOCKS, TOKENS, SEQ = 8192, 28672, 64, 8, 128, 80, 128 * 2048, 2048


def _block_costs() -> dict:
    q, kv = HEADS * HD, KV * HD
    params = H * q + 2 * H * kv + q * H + 3 * H * F
    forward = 2 * TOKENS * params + 128 * 4 * SEQ * SEQ * q       # linears + attention scores and values
    widths = [H, q, H, F]                                        # the four stages' input widths
    hessian = sum(TOKENS * d * d for d in widths)                # upper tiles: half of 2 T d^2
    # per matrix: 2 rows d^2 (updates) + d^3 (inverse); units are solved in parallel (q, k, v; gate,
    # up each a task with >1 worker), so a stage costs its largest unit
    units = [[(q, H), (kv, H), (kv, H)], [(H, q)], [(F, H), (F, H)], [(H, F)]]
    solve_path = sum(max(2 * r * d * d + d ** 3 for r, d in st) for st in units)
    solve_all = sum(2 * r * d * d + d ** 3 for st in units for r, d in st)
    return {"params": params, "forward": forward, "hessian": hessian, "solve_path": solve_path,
            "solve_all": solve_all, "hessian_bytes": sum(4 * d * d for d in widths), "weights_bytes": 4 * params,
            "block_bf16_bytes": 2 * params, "acts_bytes": 4 * TOKENS * (3 * H + q + F)}


def paper_time(machines: int, overhead_s: float = 0.0, tree: bool = False) -> dict:
    """Seconds per block and hours in all for data-parallel GPTQ on `machines` machines (one
    worker each; the driver on the first). The driver's link carries, per block, every worker's
    partial Hessians in (P x 4.1 GB) and the solved float32 weights out (P x 3.4 GB), the matrices
    and Hessians to the solving workers (once); each worker reads its block (bf16) from shared
    storage. tree: the Hessians reduced and the weights broadcast along a binary tree (log2 P
    hops) instead of all through the driver's link."""
    c = _block_costs()
    calib = (c["forward"] + c["hessian"]) / (CALIB_GFLOPS_2CORE * 1e9 * CORES_SCALE) / machines
    rate = SOLVE_GFLOPS_2CORE * 1e9 * CORES_SCALE
    solve = (c["solve_all"] if machines == 1 else c["solve_path"]) / rate
    hops = max(1.0, math.log2(machines)) if tree else machines
    gather = 0.0 if machines == 1 else (c["hessian_bytes"] + c["weights_bytes"]) * hops / 1e9 / LINK_GBS
    to_solvers = 0.0 if machines == 1 else (c["weights_bytes"] + c["hessian_bytes"]) / 1e9 / LINK_GBS
    load = c["block_bf16_bytes"] / 1e9 / LINK_GBS
    per_block = calib + solve + gather + to_solvers + load + overhead_s
    return {"machines": machines, "calib_s": calib, "solve_s": solve, "network_s": gather + to_solvers, "load_s": load,
            "per_block_s": per_block, "hours": per_block * BLOCKS / 3600,
            "worker_gb": (c["weights_bytes"] + c["acts_bytes"] / machines + 4 * F * F * 2) / 1e9}


def _blocks_s(row: dict) -> float:
    return sum(v for k, v in row["phases"].items() if k in ("load", "hessians", "solve", "propagate", "write"))


def ray_overhead_per_block(r: dict) -> float:
    """Seconds Ray adds per block: a Ray run's block time on the driver less its busiest
    worker's own compute (calls, transfers and waiting), per block; the smallest over the runs."""
    got = []
    for row in r.get("runs", {}).values():
        busy = max((sum(w["seconds"].values()) for w in row.get("workers", [])), default=None)
        if busy is not None:
            got.append(max(0.0, (_blocks_s(row) - busy) / 18))
    return min(got, default=0.0)


def paper_table(overhead_s: float) -> str:
    c = _block_costs()
    lines = [f"block: {c['params'] / 1e6:.0f} M parameters; per block {c['forward'] / 1e12:.0f} TFLOP forward + "
             f"{c['hessian'] / 1e12:.0f} TFLOP X^T X over {TOKENS} tokens; solves {c['solve_all'] / 1e12:.0f} TFLOP "
             f"({c['solve_path'] / 1e12:.0f} on the critical path); moves {c['hessian_bytes'] / 1e9:.1f} GB of "
             f"Hessians per worker, {c['weights_bytes'] / 1e9:.1f} GB of float32 weights; activations "
             f"{c['acts_bytes'] / 1e9:.1f} GB in all (stay on their workers); Ray overhead {overhead_s:.2f} s/block",
             "", "| machines | calibration s/block | solve s/block | network s/block | load s/block | total s/block "
             "| hours (80 blocks) | with tree reduce: hours | memory per worker GB |", "|---|---|---|---|---|---|---|---|---|"]
    for m in (1, 2, 4, 8, 16, 32, 64):
        t, tt = paper_time(m, overhead_s), paper_time(m, overhead_s, tree=True)
        lines.append(f"| {m} | {t['calib_s']:.0f} | {t['solve_s']:.0f} | {t['network_s']:.0f} | {t['load_s']:.1f} | "
                     f"{t['per_block_s']:.0f} | {t['hours']:.2f} | {tt['hours']:.2f} | {t['worker_gb']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
