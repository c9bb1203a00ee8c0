"""quantkit eval's perplexity against llama.cpp's own `llama-perplexity`, same file, same text.

    PYTHONPATH=src python benchmarks/eval_vs_llama_perplexity.py [--bin PATH] [--chunks 8] [--ctx 512]
        [--threads 2] [--model FILE.gguf] [--text FILE]

The binary: benchmarks/build_llama_tools.sh builds it from the llama.cpp sources vendored in the
llama-cpp-python sdist (the version quantkit runs), into $QUANTKIT_CACHE/llama-tools/bin.
Model: by default the F32 dequantization of the bundled Gemma-3-270M Q4_K_M (quantkit eval's
default reference). Both sides read the whole text file; llama-perplexity tokenizes it in one
call (BOS added, special tokens not parsed), quantkit tokenizes a prefix cut at a line end (the
same ids, checked in tests/test_eval.py). Writes benchmarks/results/eval_vs_llama_perplexity.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def llama_perplexity(binary: str, model: str, text: str, n_ctx: int, n_chunks: int, n_threads: int,
                     n_batch: int) -> dict:
    cmd = [binary, "-m", model, "-f", text, "-c", str(n_ctx), "--chunks", str(n_chunks), "-t", str(n_threads),
           "-b", str(n_batch)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"llama-perplexity failed ({proc.returncode}):\n{log[-3000:]}")
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", log)
    running = [float(x) for x in re.findall(r"\[\d+\]([0-9.]+)", log)]
    return {"command": " ".join(cmd), "ppl": float(m.group(1)), "ppl_stderr": float(m.group(2)),
            "running_ppl": running, "wall_s": wall,
            "log_tail": log[-1500:]}


def main() -> int:
    from quantkit.models.bundled import cache_dir
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default=os.path.join(cache_dir(), "llama-tools", "bin", "llama-perplexity"))
    ap.add_argument("--model")
    ap.add_argument("--text", default=os.path.join(os.path.dirname(HERE), "src", "quantkit", "data",
                                                   "wikitext-2", "test.txt"))
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "eval_vs_llama_perplexity.json"))
    args = ap.parse_args()
    if not os.access(args.bin, os.X_OK):
        print(f"{args.bin}: no llama-perplexity binary; run benchmarks/build_llama_tools.sh", file=sys.stderr)
        return 2
    os.environ.setdefault("QUANTKIT_QUIET", "1")
    from quantkit.eval.evaluate import EvalOptions, evaluate
    from quantkit.eval.lm import f32_reference
    from quantkit.models.bundled import bundled_path
    model = args.model or f32_reference(bundled_path(), args.threads, show_progress=False)

    load0 = os.getloadavg()
    ours = evaluate([model], EvalOptions(text=args.text, n_chunks=args.chunks, n_ctx=args.ctx, n_threads=args.threads,
                                         speed=False, cache=False, show_progress=False))
    r = ours.rows[0].to_dict()
    theirs = {f"n_batch={b}": llama_perplexity(args.bin, model, args.text, args.ctx, args.chunks, args.threads, b)
              for b in (args.ctx, 4 * args.ctx)}  # one chunk per batch, and llama-perplexity's default 4 per batch
    result = {"model": model, "text": args.text, "chunks": args.chunks, "n_ctx": args.ctx, "threads": args.threads,
              "quantkit": {"ppl": r["ppl"], "ppl_stderr": r["ppl_stderr"], "n_scored": r["n_scored"],
                           "protocol": ours.meta["protocol"]},
              "llama_perplexity": theirs,
              "relative_difference": {k: r["ppl"] / v["ppl"] - 1 for k, v in theirs.items()},
              "load_average_before": load0, "load_average_after": os.getloadavg()}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"| | PPL (8 chunks of {args.ctx}) | ± |\n|---|---|---|")
    print(f"| quantkit eval | {r['ppl']:.4f} | {r['ppl_stderr']:.4f} |")
    for k, v in theirs.items():
        print(f"| llama-perplexity -b {k.split('=')[1]} | {v['ppl']:.4f} | {v['ppl_stderr']:.4f} |")
    print(f"relative differences: {result['relative_difference']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
