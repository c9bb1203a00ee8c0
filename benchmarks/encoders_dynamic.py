"""Dynamic INT8 on all-MiniLM-L6-v2: size, latency (batch 1 and 32), fidelity, retrieval, SST-2.

    HF_HUB_OFFLINE=1 PYTHONPATH=src python benchmarks/encoders_dynamic.py \
        [--sentences 2000] [--classifier out/distill/teacher] [--threads 2,1]

--classifier: a MiniLM classifier fine-tuned on SST-2 (benchmarks/encoders_distill.py writes
one); its SST-2 dev accuracy is measured in fp32 and int8 (head kept float).
Time: about 5 minutes on 2 cores (2,000 sentences encoded twice; latency runs).
Writes benchmarks/results/encoders_dynamic.json.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import os  # noqa: E402

from encoders_common import (SHARED, environment, latency_interleaved, latency_per_sentence,  # noqa: E402
                             wikitext_sentences, write_json)

from quantkit.api import load_encoder, quantize_dynamic  # noqa: E402
from quantkit.distill.scoring import accuracy  # noqa: E402
from quantkit.util.textdata import read_labelled  # noqa: E402
from quantkit.eval.metrics import recall_at_k  # noqa: E402
from quantkit.models.encoder import dir_size, save_encoder  # noqa: E402
from quantkit.quant.dynamic import DynamicInt8Config, quantize_encoder_  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sentences", type=int, default=2000)
    ap.add_argument("--classifier", default=None)
    ap.add_argument("--threads", default="2,1",
                    help="torch intra-op threads to time with, comma-separated (first = the main columns)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--reference-kernel", action="store_true",
                    help="also time the plain-torch reference kernel (slow: minutes)")
    args = ap.parse_args()
    threads = [int(t) for t in str(args.threads).split(",")]
    torch.set_num_threads(threads[0])
    t0 = time.time()
    res: dict = {"environment": environment(), "model": "all-MiniLM-L6-v2"}
    fp32 = load_encoder()
    sents = wikitext_sentences(args.sentences)
    lat_sents = sents[:64]
    with tempfile.TemporaryDirectory() as d:
        for emb in (False, True):
            name = "int8" + ("+emb" if emb else "")
            out = Path(d) / name
            s = quantize_dynamic(None, out, quantize_embeddings=emb)
            q = load_encoder(out)
            row = {"file_bytes": dir_size(out), "linear_bytes": s["linear_bytes_after"], "kernel": s["kernel"]}
            res.setdefault("fp32", {"file_bytes": dir_size(fp32.source_dir), "linear_bytes": s["linear_bytes_before"]})
            res[name] = row
            if not emb:
                # fp32 and int8 timed in alternation, at each thread count; load recorded per batch size
                res["latency"] = []
                for nt in threads:
                    torch.set_num_threads(nt)
                    for bs in (1, 32):
                        load0 = os.getloadavg()[0]
                        ms = latency_interleaved({"fp32": fp32, "int8": q}, lat_sents, bs, args.runs)
                        res["latency"].append({"threads": nt, "batch": bs, "fp32_ms": ms["fp32"], "int8_ms": ms["int8"],
                                               "speedup": ms["fp32"] / ms["int8"],
                                               "load_avg_1m": [load0, os.getloadavg()[0]]})
                        print(res["latency"][-1], flush=True)
                        if nt == threads[0]:
                            res["fp32"][f"latency_ms_b{bs}"] = ms["fp32"]
                            row[f"latency_ms_b{bs}"] = ms["int8"]
                torch.set_num_threads(threads[0])
                ref = fp32.encode(sents)
            got = q.encode(sents)
            cos = (ref * got).sum(1)
            row.update(mean_cosine=float(cos.mean()), min_cosine=float(cos.min()),
                       recall_at_10=recall_at_k(ref, got, 10))
            print("fp32", res["fp32"], flush=True)
            print(name, row, flush=True)
        if args.reference_kernel:   # the plain-torch kernel, for the record: same numbers, slower
            ref_q = quantize_encoder_(copy.deepcopy(fp32), DynamicInt8Config(kernel="reference"))
            res["int8_reference_kernel"] = {f"latency_ms_b{bs}": 1e3 * latency_per_sentence(ref_q, lat_sents, bs, 1)
                                            for bs in (1, 32)}
    if args.classifier:
        clf = load_encoder(args.classifier)
        texts, labels = read_labelled(str(SHARED / "sst2" / "dev.tsv"), clf.meta.labels)
        res["sst2_dev_accuracy_fp32"] = accuracy(clf, texts, labels)
        with tempfile.TemporaryDirectory() as d:
            quantize_dynamic(args.classifier, Path(d) / "c8")
            res["sst2_dev_accuracy_int8"] = accuracy(load_encoder(Path(d) / "c8"), texts, labels)
    res["seconds"] = round(time.time() - t0, 1)
    print(write_json("encoders_dynamic", res))
    print({k: v for k, v in res.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
