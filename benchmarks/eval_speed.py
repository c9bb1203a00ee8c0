"""Eval speed: the reference + 6 GGUF models scored together, against 7 single-model passes.

    python benchmarks/eval_speed.py [--chunks 8] [--ctx 512] [--threads N] [--logits-all-baseline]

Models: the bundled Gemma-3-270M Q4_K_M, its F32 dequantization (the reference) and F16, Q8_0,
Q5_0, Q4_1, Q4_0 made from that F32 by llama.cpp's quantizer (setup, not timed; about a minute).
The five derived files (1.5 GB) go to a temporary folder removed at the end (--work DIR keeps
them there for another run instead); the F32 reference stays in quantkit's eval cache, under
its size cap.

A: `quantkit.eval.evaluate` of the 6 models against the F32 reference, with no log-probability
   cache (so the reference pass is included: 7 forward passes per chunk), in a fresh process
   whose wall time and peak RSS (VmHWM) are reported.
B: 7 single-model passes: each model loaded and run over the same chunks, perplexity only (the
   scored rows' log-softmax), the least any one-model perplexity run does; tokenization excluded.
Target: A <= 1.1 x B; A's peak RSS <= the largest model + 1.5 GB.
--logits-all-baseline adds one model through llama-cpp-python's Llama(logits_all=True) (the
plain way, every position's full-vocabulary logits copied) for comparison.

Writes benchmarks/results/eval_speed.json and prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
LADDER = ["f16", "q8_0", "q5_0", "q4_1", "q4_0"]


def _quantize(inp: str, out: str, ftype: int, n_threads: int) -> None:
    import ctypes

    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = n_threads
    from quantkit.runtimes.llama_cpp import quiet_stderr
    with quiet_stderr():
        assert llama_cpp.llama_model_quantize(inp.encode(), out.encode(), ctypes.byref(params)) == 0


def setup(n_threads: int, d: str) -> tuple[str, list[str]]:
    from quantkit.eval.lm import f32_reference
    from quantkit.models.bundled import bundled_path
    from quantkit.quant.gguf_policy import FILE_TYPES
    from quantkit.util.atomic import atomic_output
    src = bundled_path()
    ref = f32_reference(src, n_threads, show_progress=False)
    os.makedirs(d, exist_ok=True)
    models = [src]
    for ft in LADDER:
        out = os.path.join(d, f"gemma-3-270m-{ft}.gguf")
        if not os.path.exists(out):
            with atomic_output(out) as tmp:
                _quantize(ref, tmp, int(FILE_TYPES[ft][0]), n_threads)
        models.append(out)
    return ref, models


def chunks_for(ref: str, text: str, n_chunks: int, n_ctx: int) -> list[list[int]]:
    from quantkit.eval.lm import make_chunks
    from quantkit.runtimes.llama_cpp import LlamaCppScorer
    tok = LlamaCppScorer(ref, n_ctx, 1, vocab_only=True)
    try:
        with open(text, encoding="utf-8") as f:
            return make_chunks(tok.tokenize, f.read(), n_ctx, n_chunks, tok.add_bos(), tok.bos_id(), text)
    finally:
        tok.close()


def single_pass(path: str, chunks: list[list[int]], n_ctx: int, n_threads: int) -> tuple[float, float]:
    """One model alone: load, every chunk's scored logits, perplexity. (seconds, ppl)"""
    from quantkit.runtimes.llama_cpp import LlamaCppScorer
    from quantkit.eval.metrics import logsumexp
    first = n_ctx // 2
    t0 = time.perf_counter()
    sc = LlamaCppScorer(path, n_ctx, n_threads)
    nll = []
    try:
        for c in chunks:
            x = sc.scored_logits(c, first)
            t = np.asarray(c[first + 1:])
            for i in range(0, x.shape[0], 16):
                xb = x[i:i + 16]
                nll.append(logsumexp(xb)[:, 0] - xb[np.arange(xb.shape[0]), t[i:i + 16]])
    finally:
        sc.close()
    return time.perf_counter() - t0, float(np.exp(np.concatenate(nll).mean()))


def logits_all_pass(path: str, chunks: list[list[int]], n_ctx: int, n_threads: int) -> tuple[float, float]:
    """The plain way: Llama(logits_all=True), llm.eval(chunk), llm.scores (every position)."""
    import llama_cpp
    first = n_ctx // 2
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=n_threads,
                          n_threads_batch=n_threads, verbose=False)
    nll = []
    try:
        for c in chunks:
            llm.reset()
            llm.eval(c)
            x = np.asarray(llm.scores[:n_ctx], dtype=np.float32)
            for j in range(first, n_ctx - 1):
                row = x[j].astype(np.float64)
                m = row.max()
                nll.append(m + np.log(np.exp(row - m).sum()) - row[c[j + 1]])
    finally:
        llm.close()
    return time.perf_counter() - t0, float(np.exp(np.mean(nll)))


def child_eval(args) -> None:
    from quantkit.eval.evaluate import EvalOptions, evaluate
    t0 = time.perf_counter()
    res = evaluate(args.models, EvalOptions(ref=args.ref, text=args.text, n_chunks=args.chunks, n_ctx=args.ctx,
                                            n_threads=args.threads, speed=False, cache=False, show_progress=False))
    wall = time.perf_counter() - t0
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"wall_s": wall, "peak_rss_bytes": hwm, "rows": [r.to_dict() for r in res.rows], "meta": res.meta}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--text", default=os.path.join(os.path.dirname(HERE), "src", "quantkit", "data",
                                                   "wikitext-2", "test.txt"))
    ap.add_argument("--logits-all-baseline", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "eval_speed.json"))
    ap.add_argument("--work", help="keep the derived GGUF files in this folder (default: a temporary one, removed)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ref", help=argparse.SUPPRESS)
    ap.add_argument("--models", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("QUANTKIT_QUIET", "1")
    if args.child:
        child_eval(args)
        return

    work = args.work or tempfile.mkdtemp(prefix="quantkit-bench-eval-")
    try:
        run(args, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def run(args, work: str) -> None:
    ref, models = setup(args.threads, work)
    chunks = chunks_for(ref, args.text, args.chunks, args.ctx)
    load0 = os.getloadavg()

    proc = subprocess.run([sys.executable, __file__, "--child", "--ref", ref, "--models", *models,
                           "--chunks", str(args.chunks), "--ctx", str(args.ctx), "--threads", str(args.threads),
                           "--text", args.text], capture_output=True, text=True, check=True)
    a = json.loads(proc.stdout.strip().splitlines()[-1])

    singles = {}
    for p in [ref, *models]:
        s, ppl = single_pass(p, chunks, args.ctx, args.threads)
        singles[os.path.basename(p)] = {"seconds": s, "ppl": ppl}
    b_total = sum(v["seconds"] for v in singles.values())
    result = {
        "command": " ".join(["python", "benchmarks/eval_speed.py", *sys.argv[1:]]),
        "chunks": args.chunks, "n_ctx": args.ctx, "threads": args.threads,
        "eval_all_s": a["wall_s"], "single_passes_s": b_total, "ratio": a["wall_s"] / b_total,
        "eval_peak_rss_bytes": a["peak_rss_bytes"],
        "largest_model_bytes": max(os.path.getsize(p) for p in [ref, *models]),
        "singles": singles,
        "eval_rows": [{k: r[k] for k in ("name", "ppl", "kld_mean", "kld_median", "kld_p99", "top1_agreement", "eval_s",
                                         "file_bytes")} for r in a["rows"]],
        "machine": a["meta"]["machine"], "load_average_before": load0, "load_average_after": os.getloadavg(),
        "platform": platform.platform(),
    }
    # the ppl each way must agree: same ids, same runtime
    for r in a["rows"]:
        single = singles[os.path.basename(r["path"])]["ppl"]
        assert abs(r["ppl"] / single - 1) < 1e-4, (r["name"], r["ppl"], single)
    if args.logits_all_baseline:
        s, ppl = logits_all_pass(models[2], chunks, args.ctx, args.threads)
        result["logits_all_baseline"] = {"model": os.path.basename(models[2]), "seconds": s, "ppl": ppl,
                                         "low_level_seconds": singles[os.path.basename(models[2])]["seconds"]}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)

    gb = 1e9
    print(f"| chunks x n_ctx | threads | eval: ref + {len(models)} models | {len(models) + 1} single passes | ratio "
          f"| peak RSS | largest model + 1.5 GB |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.chunks} x {args.ctx} | {args.threads} | {a['wall_s']:.1f} s | {b_total:.1f} s | "
          f"{result['ratio']:.3f} | {a['peak_rss_bytes'] / gb:.2f} GB | {(result['largest_model_bytes'] + 1.5e9) / gb:.2f} GB |")
    print()
    print("| model | size MB | PPL | KLD mean | KLD median | KLD p99 | top-1 | eval s | single pass s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in a["rows"]:
        print(f"| {r['name']} | {r['file_bytes'] / 1e6:,.1f} | {r['ppl']:.4f} | {r['kld_mean']:.5f} | "
              f"{r['kld_median']:.5f} | {r['kld_p99']:.4f} | {100 * r['top1_agreement']:.2f} % | {r['eval_s']:.1f} | "
              f"{singles[os.path.basename(r['path'])]['seconds']:.1f} |")
    if args.logits_all_baseline:
        bl = result["logits_all_baseline"]
        print(f"\nLlama(logits_all=True) on {bl['model']}: {bl['seconds']:.1f} s vs {bl['low_level_seconds']:.1f} s "
              f"(scored rows only, zero-copy); ppl {bl['ppl']:.4f}")
    print(f"\nmachine: {result['machine']['cpu']}, {result['machine']['cores']} cores; load average before "
          f"{load0[0]:.2f}, after {result['load_average_after'][0]:.2f}")


if __name__ == "__main__":
    main()
