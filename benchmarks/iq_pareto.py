"""IQ rungs against the K-quant rungs of about the same size, side by side in one eval, on the
bundled Gemma-3-270M: where the IQ types pay on the size / KL divergence Pareto front.

Every file is llama-quantize --imatrix of the same F32 GGUF with the same importance matrix
(llama-imatrix -c 512 --chunks 64 on wikitext-2 valid; --imatrix FILE), K-quant mixes (default
Q2_K, Q3_K_S, Q3_K_M, Q4_K_S) beside IQ mixes (default IQ2_XS, IQ2_M, IQ3_S, IQ4_XS); with
--gptq, quantkit's GPTQ-compensated IQ files that benchmarks/iq_gptq_quality.py left for the same
calibration are scored in the same eval. A file this script (or iq_gptq_quality.py) already made
for the same type and imatrix is reused. Scored by quantkit eval (KL divergence against the F32
reference) on wikitext-2 test and SST-2 dev; the Pareto front is over (whole-file bytes, mean
KL). Results: benchmarks/results/iq_pareto.json, and an HTML page per text
(quantkit.eval.report) under the work directory.

Gemma-3-270M's 640-wide rows are not a multiple of 256: only ffn_down (2048 wide) and
attn_output (1024 wide) take the 256-block IQ / K types, the rest fall back as llama.cpp's rules
say, and the tied 262k x 640 embedding is Q8_0 in every file. So the files span only 229-242 MB;
the bits per weight of the linears (the `bpw linear` column) separate the rungs more.

    python benchmarks/iq_pareto.py [--kquants q2_k,...] [--iq iq2_xs,...] [--gptq] [--eval-chunks 4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from gguf_gptq import DATA, TOOLS, sst2_text, timed  # noqa: E402
from iq_gptq_quality import WORK  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kquants", default="q2_k,q3_k_s,q3_k_m,q4_k_s")
    ap.add_argument("--iq", default="iq2_xs,iq2_m,iq3_s,iq4_xs")
    ap.add_argument("--imatrix", default=os.path.expanduser("~/.cache/quantkit/bench-budget/imatrix-64.dat"))
    ap.add_argument("--chunks", type=int, default=64, help="the imatrix's (and GPTQ's) calibration chunks")
    ap.add_argument("--gptq", action="store_true", help="also score iq_gptq_quality.py's GPTQ files")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-chunks", type=int, default=4)
    args = ap.parse_args()
    os.makedirs(WORK, exist_ok=True)
    res_path = os.path.join(HERE, "results", "iq_pareto.json")
    results = {"runs": {}, "eval": {}, "args": vars(args)}

    from quantkit import api
    from quantkit.eval.lm import f32_reference
    from quantkit.eval.metrics import pareto_front
    from quantkit.eval.report import write_report
    from quantkit.models.bundled import bundled_path
    f32 = f32_reference(bundled_path(), args.threads, show_progress=False)
    files = {}
    for ft in args.kquants.split(",") + args.iq.split(","):
        out = os.path.join(WORK, f"{ft}-imatrix-{args.chunks}.gguf")
        if not os.path.exists(out):
            cmd = [os.path.join(TOOLS, "llama-quantize"), "--imatrix", args.imatrix, f32, out, ft.upper(),
                   str(args.threads)]
            results["runs"][ft] = dict(timed(cmd, os.path.join(WORK, f"{ft}-imatrix.log")),
                                       loadavg=open("/proc/loadavg").read().split()[:3])
        files[f"{ft} llama.cpp + imatrix"] = out
        gptq = os.path.join(WORK, f"{ft}-gptq-{args.chunks}.gguf")
        if args.gptq and ft in args.iq.split(",") and os.path.exists(gptq):
            files[f"{ft} quantkit GPTQ"] = gptq
    names = {os.path.realpath(p): n for n, p in files.items()}
    texts = {"wikitext-2 test": os.path.join(DATA, "wikitext-2", "test.txt"), "sst-2 dev": sst2_text("dev")}
    for label, text in texts.items():
        r = api.evaluate([f32, *files.values()], ref=f32, text=text, n_chunks=args.eval_chunks, speed=False,
                         n_threads=args.threads, show_progress=False)
        write_report(r, os.path.join(WORK, f"iq_pareto-{label.replace(' ', '_')}.html"))
        rows = [row for row in r.rows if os.path.realpath(row.path) in names]
        front = pareto_front([(row.file_bytes, row.kld_mean) for row in rows])
        results["eval"][label] = {names[os.path.realpath(row.path)]: {
            "bytes": row.file_bytes, "bpw": row.bits_per_weight, "bpw_linear": row.bits_per_weight_linear,
            "kld_mean": row.kld_mean, "kld_p99": row.kld_p99, "ppl": row.ppl, "top1": row.top1_agreement,
            "pareto": bool(p)} for row, p in zip(rows, front)}
        print(label, json.dumps(results["eval"][label], indent=1), flush=True)
    results["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    with open(res_path + ".tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(res_path + ".tmp", res_path)
    print(markdown(results))


def markdown(results: dict) -> str:
    """The table: one row per file, bytes, bpw, KL and Pareto membership per text."""
    texts = list(results["eval"])
    first = results["eval"][texts[0]]
    lines = ["| file | bytes | bpw linear | " + " | ".join(f"KL {t} | Pareto" for t in texts) + " |",
             "|---|---|---|" + "---|---|" * len(texts)]
    for name in sorted(first, key=lambda n: first[n]["bytes"]):
        cells = [name, f"{first[name]['bytes']:,}", f"{first[name]['bpw_linear']:.2f}"]
        for t in texts:
            e = results["eval"][t][name]
            cells += [f"{e['kld_mean']:.4f}", "yes" if e["pareto"] else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
