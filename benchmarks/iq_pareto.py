"""IQ rungs against the K-quant rungs of about the same size on the bundled Gemma-3-270M: where the
IQ types pay on the size / KL-divergence Pareto front.

Every rung is llama-quantize --imatrix of the same F32 GGUF with the same importance matrix
(llama-imatrix -c 512 --chunks 64 on wikitext-2 valid), scored by quantkit eval against that F32
reference (4 chunks of 512 by default) on wikitext-2 test and SST-2 dev. The scores already
measured with that protocol are reused: the K-quant rows of benchmarks/results/budget_mix.json
(benchmarks/budget_mix.py) and the IQ rows of benchmarks/results/iq_gptq_quality.json
(benchmarks/iq_gptq_quality.py, which also holds quantkit's GPTQ-compensated IQ files, added as a
second family), and what an earlier run of this script measured. A (rung, text) pair with no score is evaluated here from the file in
iq_gptq_quality.py's work directory, made with llama-quantize --imatrix if missing. The Pareto
front is over (whole-file bytes, mean KL), per text, over all rows and over llama.cpp's files alone. Results:
benchmarks/results/iq_pareto.json; `--markdown` prints the table.

Gemma-3-270M's 640-wide rows are not a multiple of 256: only ffn_down (2048 wide) and
attn_output (1024 wide) take the 256-block IQ / K types, the rest fall back as llama.cpp's rules
say, and the tied 262k x 640 embedding is Q8_0 in every file; the files span only 231-250 MB.

    python benchmarks/iq_pareto.py [--kquants q2_k,q3_k_s,q3_k_m,q4_k_s] [--iq iq2_xs,iq2_m,iq3_s,iq4_xs]
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

METRICS = ("ppl", "kld_mean", "kld_p99", "top1_agreement")


def _load(name: str) -> dict:
    path = os.path.join(HERE, "results", name)
    return json.load(open(path)) if os.path.exists(path) else {"runs": {}, "eval": {}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kquants", default="q2_k,q3_k_s,q3_k_m,q4_k_s")
    ap.add_argument("--iq", default="iq2_xs,iq2_m,iq3_s,iq4_xs")
    ap.add_argument("--imatrix", default=os.path.expanduser("~/.cache/quantkit/bench-budget/imatrix-64.dat"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-chunks", type=int, default=4)
    ap.add_argument("--texts", default="wikitext-2 test,sst-2 dev")
    ap.add_argument("--markdown", action="store_true", help="print the table of the last results and exit")
    args = ap.parse_args()
    res_path = os.path.join(HERE, "results", "iq_pareto.json")
    if args.markdown:
        print(markdown(json.load(open(res_path))))
        return
    budget, iq = _load("budget_mix.json"), _load("iq_gptq_quality.json")
    # (row label, source results, key there, file type, method)
    rows = [(f"{ft} llama.cpp + imatrix", budget, f"{ft}/imatrix", ft, "imatrix") for ft in args.kquants.split(",")]
    rows += [(f"{ft} llama.cpp + imatrix", iq, f"{ft}/imatrix", ft, "imatrix") for ft in args.iq.split(",")]
    rows += [(f"{ft} quantkit GPTQ", iq, f"{ft}/gptq", ft, "gptq") for ft in args.iq.split(",")
             if f"{ft}/gptq" in iq["runs"]]
    texts = {"wikitext-2 test": os.path.join(DATA, "wikitext-2", "test.txt"), "sst-2 dev": sst2_text("dev")}
    before = _load("iq_pareto.json")                 # scores this script measured in an earlier run
    out = {"eval": {}, "measured_here": before.get("measured_here", []), "args": vars(args)}
    from quantkit.eval.lm import f32_reference
    from quantkit.eval.metrics import pareto_front
    from quantkit.models.bundled import bundled_path
    f32 = None
    for label in args.texts.split(","):
        table = out["eval"].setdefault(label, {})
        for name, src, key, ft, method in rows:
            path = os.path.join(WORK, f"{ft}-{method}-64.gguf")
            got = src["eval"].get(label, {}).get(key)
            if got is None and [label, name] in [m[:2] for m in out["measured_here"]]:
                got = before["eval"][label][name]
            size = src["runs"].get(key, {}).get("bytes") or (os.path.getsize(path) if os.path.exists(path) else None)
            if got is None:
                if method != "imatrix":
                    continue
                from quantkit import api
                f32 = f32 or f32_reference(bundled_path(), args.threads, show_progress=False)
                if not os.path.exists(path):
                    timed([os.path.join(TOOLS, "llama-quantize"), "--imatrix", args.imatrix, f32, path, ft.upper(),
                           str(args.threads)], os.path.join(WORK, f"{ft}-imatrix.log"))
                r = api.evaluate([f32, path], ref=f32, text=texts[label], n_chunks=args.eval_chunks, speed=False,
                                 n_threads=args.threads, show_progress=False)
                row = [x for x in r.rows if os.path.realpath(x.path) == os.path.realpath(path)][0]
                got = {m: getattr(row, m) for m in METRICS}
                size = row.file_bytes
                out["measured_here"].append([label, name, open("/proc/loadavg").read().split()[0]])
            table[name] = {"bytes": size, **{m: got.get(m) for m in METRICS}}
            print(label, name, table[name], flush=True)
        names = list(table)
        front = pareto_front([(table[n]["bytes"], table[n]["kld_mean"]) for n in names])
        for n, p in zip(names, front):
            table[n]["pareto"] = bool(p)
        # the front of llama.cpp's own files alone: where an IQ type beats the K-quants at its size
        stock = [n for n in names if n.endswith("llama.cpp + imatrix")]
        for n, p in zip(stock, pareto_front([(table[n]["bytes"], table[n]["kld_mean"]) for n in stock])):
            table[n]["pareto_llama_cpp"] = bool(p)
    with open(res_path + ".tmp", "w") as f:
        json.dump(out, f, indent=2)
    os.replace(res_path + ".tmp", res_path)
    print(markdown(out))


def markdown(results: dict) -> str:
    """One row per rung by size: bytes, then mean KL and Pareto membership per text."""
    texts = list(results["eval"])
    names = {n: e["bytes"] for t in texts for n, e in results["eval"][t].items()}
    lines = ["| rung | bytes | " + " | ".join(f"KL {t} | front (all / llama.cpp's)" for t in texts) + " |",
             "|---|---|" + "---|---|" * len(texts)]
    for n in sorted(names, key=lambda n: (names[n], n)):
        cells = [n, f"{names[n]:,}"]
        for t in texts:
            e = results["eval"][t].get(n)
            mark = "" if e is None else ("yes" if e["pareto"] else "no") + \
                ("" if "pareto_llama_cpp" not in e else " / " + ("yes" if e["pareto_llama_cpp"] else "no"))
            cells += ["" if e is None else f"{e['kld_mean']:.4f}", mark]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
