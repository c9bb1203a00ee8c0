"""Eval on encoder classifiers: SST-2 dev accuracy beside size, latency and memory.

    HF_HUB_OFFLINE=1 PYTHONPATH=src python benchmarks/eval_classifier.py \
        [--teacher out/distill/teacher] [--student out/distill/student_kd3] [--threads 2] [--runs 3]

Models: the MiniLM-L6 SST-2 classifier and the distilled 3-layer student that
benchmarks/encoders_distill.py writes (run it first, or point --teacher / --student at any
quantkit classifier directories), and the dynamic-int8 of each (made here by
quantkit.api.quantize_dynamic into a temporary folder, removed at the end). One
`quantkit.api.evaluate` call scores all four on the 872 SST-2 dev sentences against the fp32
teacher, with a fresh process per model for load time, latency and peak RSS; the accuracies are
checked against distill's own `accuracy()` of each model.

Writes benchmarks/results/eval_classifier.json and prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoders_common import ROOT, SHARED  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default=str(ROOT / "out" / "distill" / "teacher"))
    ap.add_argument("--student", default=str(ROOT / "out" / "distill" / "student_kd3"))
    ap.add_argument("--data", default=str(SHARED / "sst2" / "dev.tsv"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "eval_classifier.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for p in (args.teacher, args.student):
        if not os.path.isdir(p):
            print(f"{p}: no such classifier; run benchmarks/encoders_distill.py first or pass --teacher/--student",
                  file=sys.stderr)
            return 2

    from quantkit.api import evaluate, load_encoder, quantize_dynamic
    from quantkit.distill.scoring import accuracy
    from quantkit.util.textdata import read_labelled
    work = tempfile.mkdtemp(prefix="quantkit-bench-cls-")
    try:
        models = []
        for p in (args.teacher, args.student):
            q = os.path.join(work, os.path.basename(os.path.normpath(p)) + "-int8")
            quantize_dynamic(p, q)
            models += [os.path.abspath(p), q]
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        res = evaluate(models, task_data=args.data, n_threads=args.threads, speed_runs=args.runs, show_progress=False)
        wall = time.perf_counter() - t0
        texts, labels = read_labelled(args.data, res.meta["labels"])
        acc64 = {}
        for r in res.rows:   # the same number by distill's own path, same batches; and at its default batch 64
            enc = load_encoder(r.path)
            acc = accuracy(enc, texts, labels, batch_size=32)
            assert abs(acc - r.accuracy) < 1e-9, (r.name, acc, r.accuracy)
            acc64[r.path] = accuracy(enc, texts, labels, batch_size=64)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    out = {"command": " ".join(["python", "benchmarks/eval_classifier.py", *sys.argv[1:]]), "wall_s": wall,
           "load_average_before": load0, "load_average_after": os.getloadavg(), **res.to_dict()}
    rows = [dict(r, accuracy_batch64=acc64[r["path"]]) for r in out["models"]]
    out["models"] = rows
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2, default=str)

    print(f"| model | size MB | bits/weight (linear) | {res.meta['task']} accuracy | (batches of 64) | "
          f"agreement with teacher | KLD mean | load s | ms/sentence (batch 1) | sentences/s (batch 32) | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        sp = r["speed"]
        name = {os.path.abspath(args.teacher): "teacher (MiniLM-L6)",
                os.path.abspath(args.student): "student (3 layers, KD)"}.get(r["path"], r["name"])
        print(f"| {name} | {r['file_bytes'] / 1e6:.1f} | {r['bits_per_weight_linear']:.2f} | "
              f"{100 * r['accuracy']:.2f} % | {100 * r['accuracy_batch64']:.2f} % | "
              f"{100 * r['top1_agreement']:.2f} % | {r['kld_mean']:.5f} | "
              f"{sp['load_s']:.2f} | {sp['latency_ms']:.1f} | {sp['sent_s']:.0f} | {sp['peak_rss_bytes'] / 1e6:.0f} |")
    print(f"\n{res.meta['protocol']}\nspeed: {res.meta['speed']}\nwall {wall:.0f} s; load average before "
          f"{load0[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
