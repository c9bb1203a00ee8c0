"""Speed and memory of one model, measured in a fresh process: load time, prompt processing
(n_prompt tokens in one batch) and greedy generation (n_gen tokens) over a few runs (median
reported, threads stated, llama.cpp's own perf counters alongside), and the process's peak RSS
(VmHWM, with the RSS before loading stated so the model's share is visible)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any

from ..runtimes import open_runtime
from ..util.errors import QuantkitError
from ..util.machine import vm_kib


def probe(path: str, tokens: list[int], n_gen: int, runs: int, n_threads: int) -> dict[str, Any]:
    """Load, prompt processing and generation speed, peak RSS. Meant for a fresh process
    (`python -m quantkit.eval.probe ARGS.json`): peak RSS is this process's VmHWM."""
    rss0 = vm_kib("VmRSS") * 1024
    n_ctx = len(tokens) + n_gen + 8
    n_ctx += n_ctx % 2
    sc = open_runtime(path, n_ctx, n_threads)
    try:
        pp, tg, lpp, ltg = [], [], [], []
        for r in range(runs + 1):  # run 0 warms caches (first touch of memory-mapped weights)
            if sc.kind == "llama.cpp":
                sc.perf_reset()
            dt = sc.timed_prompt(tokens)
            if sc.kind == "llama.cpp":
                p = sc.perf()
                sc.perf_reset()
            gt = sc.timed_generate(tokens, n_gen)
            if sc.kind == "llama.cpp":
                g = sc.perf()
            if r == 0:
                continue
            pp.append(len(tokens) / dt)
            tg.append(n_gen / gt)
            if sc.kind == "llama.cpp":
                if p["t_p_eval_ms"] > 0:
                    lpp.append(p["n_p_eval"] / p["t_p_eval_ms"] * 1e3)
                if g["t_eval_ms"] > 0:
                    # generate's prompt pass is counted under p_eval; single-token steps under eval
                    ltg.append(g["n_eval"] / g["t_eval_ms"] * 1e3)
        out = {"runtime": sc.kind, "threads": sc.n_threads, "load_s": sc.load_s, "runs": runs,
               "n_prompt": len(tokens), "n_gen": n_gen,
               "pp_tok_s": statistics.median(pp), "tg_tok_s": statistics.median(tg),
               "pp_tok_s_runs": pp, "tg_tok_s_runs": tg,
               "llama_pp_tok_s": statistics.median(lpp) if lpp else None,
               "llama_tg_tok_s": statistics.median(ltg) if ltg else None}
    finally:
        sc.close()
    out["rss_before_load_bytes"] = rss0
    out["peak_rss_bytes"] = vm_kib("VmHWM") * 1024
    return out


def run_probe(path: str, tokens: list, n_gen: int, runs: int, n_threads: int, kind: str = "lm") -> dict[str, Any]:
    """`probe` (kind "lm": token ids) or `classify.probe_classifier` (kind "classifier": sentences)
    in a fresh Python process (eval.probe), so that peak RSS belongs to that model alone."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"path": path, "tokens": tokens, "n_gen": n_gen, "runs": runs, "n_threads": n_threads,
                   "kind": kind}, f)
        args_path = f.name
    try:
        env = dict(os.environ, QUANTKIT_QUIET="1")
        proc = subprocess.run([sys.executable, "-m", "quantkit.eval.probe", args_path],
                              capture_output=True, text=True, env=env)
    finally:
        os.unlink(args_path)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise QuantkitError(f"speed probe failed: {last}", path)
    return json.loads(proc.stdout.strip().splitlines()[-1])
