"""GPTQ onto llama.cpp's IQ types against llama-quantize with an importance matrix, side by side
in one run, on the bundled Gemma-3-270M (llama-quantize's per-tensor mix of the file type for
both: tensors whose rows are not a multiple of 256, e.g. Gemma-3-270M's 640 inputs, fall back
to the type llama.cpp picks, which GPTQ solves too where it has a grid).

Per file type (default IQ4_XS, IQ2_M, IQ3_S, IQ2_XS, in that order):
  llama.cpp RTN       llama-quantize F32 -> TYPE (only with --methods rtn,...)
  llama.cpp imatrix   llama-imatrix -c 512 --chunks N on wikitext-2 valid (or --imatrix FILE, an
                      existing one made that way), then llama-quantize --imatrix
  quantkit GPTQ       quantkit quantize --method gptq, the same N x 512 tokens of wikitext-2 valid
Scored by quantkit eval against the F32 reference (KL divergence, top-1 agreement) on
wikitext-2 test and SST-2 dev sentences, each type as soon as its files exist. Results:
benchmarks/results/iq_gptq_quality.json (64 chunks) or iq_gptq_quality-N.json, merged into
what an earlier run of the same N left there (one type per run is fine).

    python benchmarks/iq_gptq_quality.py [--types iq4_xs,iq2_m] [--chunks 64] [--eval-chunks 4]
        [--imatrix ~/.cache/quantkit/bench-budget/imatrix-64.dat] [--gptq-threads 1] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from gguf_gptq import DATA, TOOLS, sst2_text, timed  # noqa: E402

WORK = os.path.join(os.environ.get("QUANTKIT_CACHE", os.path.expanduser("~/.cache/quantkit")), "bench-iq-gptq")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default="iq4_xs,iq2_m,iq3_s,iq2_xs")
    ap.add_argument("--imatrix", help="an existing llama-imatrix file for the same N x 512 tokens (not recomputed)")
    ap.add_argument("--chunks", type=int, default=64, help="calibration chunks of 512 tokens (both methods)")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp's tools and the eval")
    ap.add_argument("--gptq-threads", type=int, default=1,
                    help="quantkit GPTQ's torch threads (on a shared 2-core box, 2 threads took 2.7x the CPU "
                         "seconds of 1 for the same block at the same wall time)")
    ap.add_argument("--gptq-args", default="",
                    help="extra quantkit quantize flags for a GPTQ variant, e.g. '--shrink 0.3'; its rows are "
                         "labelled gptq[FLAGS]")
    ap.add_argument("--texts", default="wikitext-2 test,sst-2 dev",
                    help="eval texts: wikitext-2 test, sst-2 dev, sst-2 train (the last for choosing settings, "
                         "so that dev is never tuned on)")
    ap.add_argument("--reuse", action="store_true",
                    help="keep a llama.cpp file (rtn, imatrix) this script already made for the same type and N")
    ap.add_argument("--eval-chunks", type=int, default=8)
    ap.add_argument("--methods", default="imatrix,gptq")
    args = ap.parse_args()
    os.makedirs(WORK, exist_ok=True)
    valid = os.path.join(DATA, "wikitext-2", "valid.txt")
    name = "iq_gptq_quality.json" if args.chunks == 64 else f"iq_gptq_quality-{args.chunks}.json"
    res_path = os.path.join(HERE, "results", name)
    results = {"runs": {}, "eval": {}}
    if os.path.exists(res_path):
        with open(res_path) as f:
            results.update(json.load(f))
    results.setdefault("args_per_run", []).append(vars(args))

    def save():
        tmp = f"{res_path}.tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2)
        os.replace(tmp, res_path)

    from quantkit.eval.lm import f32_reference
    from quantkit.models.bundled import bundled_path
    f32 = f32_reference(bundled_path(), args.threads, show_progress=False)
    methods = args.methods.split(",")
    imatrix = args.imatrix or os.path.join(WORK, f"imatrix-{args.chunks}.gguf")
    if "imatrix" in methods and not os.path.exists(imatrix):
        results["runs"]["imatrix"] = timed([os.path.join(TOOLS, "llama-imatrix"), "-m", f32, "-f", valid, "-c", "512",
                                            "--chunks", str(args.chunks), "-t", str(args.threads), "-o", imatrix],
                                           os.path.join(WORK, "imatrix.log"))
        save()
    from quantkit import api
    all_texts = {"wikitext-2 test": os.path.join(DATA, "wikitext-2", "test.txt"), "sst-2 dev": sst2_text("dev"),
                 "sst-2 train": sst2_text("train")}
    texts = {label: all_texts[label] for label in args.texts.split(",")}
    extra = args.gptq_args.split()
    for ft in args.types.split(","):
        files = {}
        for method in methods:
            if method == "gptq" and extra:
                method = f"gptq[{' '.join(extra)}]"
            out = os.path.join(WORK, f"{ft}-{method.replace(' ', '_')}-{args.chunks}.gguf")
            files[(ft, method)] = out
            if method.startswith("gptq"):
                cmd = [sys.executable, "-m", "quantkit.cli", "quantize", f32, "--method", "gptq", "--format",
                       f"gguf:{ft}", "--calib", valid, "--nsamples", str(args.chunks), "--seqlen", "512",
                       "--threads", str(args.gptq_threads), *extra, "-o", out]
            else:
                cmd = [os.path.join(TOOLS, "llama-quantize")] + (["--imatrix", imatrix] if method == "imatrix" else []) \
                      + [f32, out, ft.upper(), str(args.threads)]
            key = f"{ft}/{method}"
            if args.reuse and not method.startswith("gptq") and os.path.exists(out) and key in results["runs"] \
                    and results["runs"][key].get("bytes") == os.path.getsize(out):
                continue
            results["runs"][key] = dict(timed(cmd, os.path.join(WORK, f"{ft}-{method.replace(' ', '_')}.log")), bytes=os.path.getsize(out),
                                        loadavg=open("/proc/loadavg").read().split()[:3])
            print(key, results["runs"][key], flush=True)
            save()
        for label, text in texts.items():
            r = api.evaluate([f32, *files.values()], ref=f32, text=text, n_chunks=args.eval_chunks, speed=False,
                             n_threads=args.threads, show_progress=False)
            names = {os.path.realpath(p): f"{t}/{m}" for (t, m), p in files.items()}
            ev = results["eval"].setdefault(label, {})
            ev.update({names.get(os.path.realpath(row.path), "f32"):
                       {k: getattr(row, k) for k in ("ppl", "kld_mean", "kld_median", "kld_p99", "top1_agreement")}
                       for row in r.rows})
            print(label, json.dumps(ev, indent=1), flush=True)
            save()


if __name__ == "__main__":
    main()
