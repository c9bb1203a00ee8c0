"""GPTQ of a mixture of experts on Ray against the single-process run, side by side in one run:
GPTQ Q4_0 of a small random Qwen3-MoE (tests/helpers/tiny_models.build_arch_model's qwen3moe,
hidden 256, its config re-drawn with --layers layers, --experts experts of --inter, --topk per
token), calibrated on --nsamples x 128 tokens of wikitext-2 valid, five ways (--runs):

  local2    the single-process pipeline, 2 threads
  local1    the single-process pipeline, 1 thread
  x1        a local Ray runtime, 1 worker with 2 CPUs
  x1c1      a local Ray runtime, 1 worker with 1 CPU
  x2        a local Ray runtime, 2 workers with 1 CPU each

Each run is a child process (its own Ray runtime). Per run: wall time, CPU seconds of the
driver (getrusage) and of every worker (their own getrusage, PipelineReport.workers; Ray's
raylet and GCS are not counted), the load average before and after, the file's sha256 against
the single-process run on as many threads (local2 for x1, local1 for x1c1 and x2), and the
largest per-expert token count difference from that run's report.

    nice .venv/bin/python benchmarks/ray_moe_gptq.py [--layers 2] [--experts 32] [--inter 512] [--topk 4]
                                                     [--nsamples 32] [--runs local2,local1,x1,x1c1,x2]

Results: benchmarks/results/ray_moe_gptq.json (rows of an earlier call with the same shape are
kept: --runs reruns only those named; the model is re-drawn identically, seed 0).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "ray_moe_gptq.json"
SEQLEN = 128


def _model(root: Path, layers: int, experts: int, inter: int, topk: int) -> Path:
    """build_arch_model's qwen3moe re-drawn (seed 0) at the given shape."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    import torch
    import transformers as tf
    from helpers.tiny_models import build_arch_model
    d = build_arch_model("qwen3moe", root, layers=layers)
    cfg = tf.AutoConfig.from_pretrained(str(d))
    cfg.num_experts, cfg.moe_intermediate_size, cfg.num_experts_per_tok = experts, inter, topk
    torch.manual_seed(0)
    tf.Qwen3MoeForCausalLM(cfg).to(torch.float32).save_pretrained(str(d))
    return d


RUNS = {"local2": (0, 2), "local1": (0, 1), "x1": (1, 2), "x1c1": (1, 1), "x2": (2, 1)}   # (workers, threads each)


def run_one(model: str, out: str, workers: int, threads: int, nsamples: int) -> dict:
    """In the child: one GPTQ Q4_0 run; its report as a dict."""
    import torch

    from quantkit.quant.gguf_gptq import export_gguf_gptq
    torch.set_num_threads(threads)
    ray = None
    if workers:
        from quantkit.quant.distributed import RayOptions
        ray = RayOptions(workers=workers, cpus_per_worker=threads)
    t0 = time.perf_counter()
    rep = export_gguf_gptq(model, out, "q4_0", nsamples=nsamples, seqlen=SEQLEN, show_progress=False, ray=ray)
    wall = time.perf_counter() - t0
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"wall_s": round(wall, 2), "driver_cpu_s": round(r.ru_utime + r.ru_stime, 2),
            "workers_cpu_s": [round(w.get("cpu_s", 0.0), 2) for w in rep.workers],
            "phases": {k: round(v, 2) for k, v in rep.phases.items()},
            "driver_peak_rss_mb": round(r.ru_maxrss / 1024),
            "workers_peak_rss_mb": [round(w["peak_rss_mb"]) for w in rep.workers],
            "experts": rep.experts, "sha256": hashlib.sha256(Path(out).read_bytes()).hexdigest()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--inter", type=int, default=512)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "OUT", "RUN"))
    a = ap.parse_args()
    if a.child:
        print(json.dumps(run_one(a.child[0], a.child[1], *RUNS[a.child[2]], a.nsamples)))
        return
    shape = {"arch": "qwen3moe", "hidden": 256, "layers": a.layers, "experts": a.experts, "moe_intermediate": a.inter,
             "topk": a.topk, "nsamples": a.nsamples}
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    rows = old.get("runs", {}) if old.get("model") == shape else {}
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src"), "QUANTKIT_QUIET": "1"}
    with tempfile.TemporaryDirectory(prefix="ray-moe-bench-") as tmp:
        d = _model(Path(tmp), a.layers, a.experts, a.inter, a.topk)
        for label in a.runs.split(","):
            load0 = os.getloadavg()
            p = subprocess.run([sys.executable, __file__, "--nsamples", str(a.nsamples), "--child", str(d),
                                str(Path(tmp) / f"{label}.gguf"), label],
                               env=env, capture_output=True, text=True, check=True)
            row = json.loads(p.stdout.strip().splitlines()[-1])
            row["load_before"], row["load_after"] = [round(x, 2) for x in load0], [round(x, 2) for x in os.getloadavg()]
            row["cpu_s"] = round(row["driver_cpu_s"] + sum(row["workers_cpu_s"]), 2)
            rows[label] = row
            print(label, json.dumps(row), flush=True)
    for label, row in rows.items():
        local = rows["local2" if RUNS.get(label, (0, 2))[1] == 2 else "local1"]
        row["bytes_equal_local"] = row["sha256"] == local["sha256"]
        row["max_tokens_moved"] = max(abs(x - y) for lp, r in row["experts"].items()
                                      for x, y in zip(r["tokens"], local["experts"][lp]["tokens"]))
        row["safeguarded"] = {lp: r["safeguarded"] for lp, r in row["experts"].items()}
    out = {"model": shape, "calibration": f"{a.nsamples} x {SEQLEN} tokens of wikitext-2 valid", "type": "q4_0",
           "machine": "AMD EPYC, 2 cores (avx2 avx512f avx512_vnni avx512_bf16), shared", "runs": rows}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    print("| run | wall s | CPU s (driver + workers) | wall vs local1 | bytes = local, same threads "
          "| max tokens moved | load before / after |")
    print("|---|---|---|---|---|---|---|")
    for label in RUNS:
        if label not in rows:
            continue
        r = rows[label]
        cpu = " + ".join(map(str, [r["driver_cpu_s"], *r["workers_cpu_s"]]))
        ratio = r["wall_s"] / rows["local1"]["wall_s"]
        same = "yes" if r["bytes_equal_local"] else "no"
        print(f"| {label} | {r['wall_s']} | {r['cpu_s']} ({cpu}) | {ratio:.2f}x | {same} | {r['max_tokens_moved']} "
              f"| {r['load_before'][0]} / {r['load_after'][0]} |")


if __name__ == "__main__":
    main()
