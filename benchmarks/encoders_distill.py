"""Knowledge distillation on SST-2: teacher, distilled 3-layer student, hard-label baseline.

    HF_HUB_OFFLINE=1 PYTHONPATH=src python benchmarks/encoders_distill.py \
        [--limit 4000] [--epochs 1] [--augment 0] [--relation-weight 0] [--work out/distill]

Stages (each skipped if its output exists, so an interrupted run continues; every stage also
checkpoints and can be resumed with the CLI's --resume):
  1. teacher:  all-MiniLM-L6-v2 + head fine-tuned on SST-2 train          (distill finetune)
  2. student:  3 layers (teacher layers 0, 2, 4), KD from the teacher      (distill kd)
  3. baseline: the same 3-layer student, gold labels only                   (distill finetune --num-layers 3)
  4. embed:    3-layer sentence encoder matching MiniLM embeddings on WikiText-2 valid (distill embed)
Then SST-2 dev accuracy, size and batch-32 latency of each.

Time on 2 cores (forward+backward of MiniLM at batch 32 x ~30 tokens is ~0.9 s at load 1.5):
the default --limit 4000 took 470 s in all (teacher 108 s, KD student 121 s, hard-label
student 54 s, embedding student 111 s, evaluation ~75 s); --limit 8000 about 13 minutes
(estimated: the three SST-2 stages scale with it);
the full train set (67k, 1 epoch, ~2,100 teacher steps) about 2 hours.
Writes benchmarks/results/encoders_distill.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoders_common import ROOT, SHARED, environment, latency_interleaved, write_json  # noqa: E402

from quantkit.api import distill, load_encoder  # noqa: E402
from quantkit.distill.scoring import accuracy  # noqa: E402
from quantkit.util.textdata import read_labelled  # noqa: E402
from quantkit.models.encoder import dir_size  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=4000)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--augment", type=int, default=0)
    ap.add_argument("--relation-weight", type=float, default=0.0)
    ap.add_argument("--embed-limit", type=int, default=4000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=str(ROOT / "out" / "distill"))   # /out/ is git-ignored
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train, dev = str(SHARED / "sst2" / "train.tsv"), str(SHARED / "sst2" / "dev.tsv")
    common = dict(train=train, dev=dev, limit=args.limit, epochs=args.epochs, batch_size=32,
                  max_length=64, save_every=100)
    res: dict = {"environment": environment(), "args": vars(args), "stages": {}}
    t0 = time.time()

    def stage(name, **kw):
        out = work / name
        if not out.exists():
            s = distill(output=str(out), **{**common, **kw})
            s.pop("losses", None)
            res["stages"][name] = s
            print(name, s, flush=True)
        return out

    teacher = stage("teacher", objective="finetune", lr=5e-5)
    student = stage("student_kd3", objective="kd", teacher=str(teacher), num_layers=3, temperature=2.0,
                    alpha=0.5, augment=args.augment, relation_weight=args.relation_weight, lr=1e-4)
    baseline = stage("student_hard3", objective="finetune", teacher=str(teacher), num_layers=3, lr=1e-4)
    embed = stage("embed3", objective="embed", train=str(SHARED / "wikitext-2" / "valid.txt"),
                  dev=str(SHARED / "wikitext-2" / "test.txt"), dev_limit=1000, num_layers=3,
                  limit=args.embed_limit, lr=2e-4)
    texts, labels = read_labelled(dev, ["0", "1"])
    lat = texts[:64]
    models = {name: load_encoder(path) for name, path in
              (("teacher", teacher), ("student_kd3", student), ("student_hard3", baseline))}
    # latency: the models take turns within every run, so load bursts hit them alike
    b32 = latency_interleaved(models, lat, 32, 5)
    b1 = latency_interleaved(models, lat[:16], 1, 3)
    for name, m in models.items():
        path = {"teacher": teacher, "student_kd3": student, "student_hard3": baseline}[name]
        res[name] = {"dev_accuracy": accuracy(m, texts, labels), "layers": m.num_layers,
                     "parameters": sum(p.numel() for p in m.parameters()), "file_bytes": dir_size(path),
                     "latency_ms_b32": b32[name], "latency_ms_b1": b1[name]}
        print(name, res[name], flush=True)
    res["load_avg_1m_end"] = os.getloadavg()[0]
    t, s = res["teacher"], res["student_kd3"]
    res["student_keeps"] = s["dev_accuracy"] / t["dev_accuracy"]
    res["student_speedup_b32"] = t["latency_ms_b32"] / s["latency_ms_b32"]
    res["seconds"] = round(time.time() - t0, 1)
    print(write_json("encoders_distill", res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
