"""Budgeted GGUFs (per-tensor types under a byte budget) against llama.cpp's stock mixes at the
same sizes, on the bundled Gemma-3-270M, in one run.

Per stock mix (default Q4_K_M, Q3_K_M):
  llama.cpp RTN       llama-quantize F32 -> MIX
  llama.cpp imatrix   llama-imatrix -c 512 --chunks 64 on wikitext-2 valid, llama-quantize --imatrix
  quantkit GPTQ       quantkit quantize --format gguf:MIX+gptq (the stock mix, GPTQ-solved)
  budget RTN          quantkit quantize --target-size <the imatrix file's bytes>
  budget GPTQ         the same with --method gptq
  peer                llama.cpp's published --target-bpw rule (importance-weighted MSE, Lagrangian
                      allocation; benchmarks/target_bpw_peer.py) at the same size, by llama-quantize
All from the same F32 GGUF (llama.cpp's dequantization of the bundled file), also the
reference. Scored by quantkit eval (llama.cpp runtime, --eval-chunks chunks of 512) on
wikitext-2 test and SST-2 dev sentences. Steps are resumable: a file already made (and in the
results) is not made again. Results: benchmarks/results/budget_mix.json.

    python benchmarks/budget_mix.py [--sizes q4_k_m,q3_k_m] [--chunks 64] [--gptq-chunks 64]
                                    [--methods rtn,imatrix,budget-rtn,peer,gptq,budget-gptq]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from gguf_gptq import DATA, TOOLS, sst2_text, timed  # noqa: E402

WORK = os.path.join(os.environ.get("QUANTKIT_CACHE", os.path.expanduser("~/.cache/quantkit")), "bench-budget")
RESULTS = os.path.join(HERE, "results", "budget_mix.json")
STOCK = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")


_PEER_ERRORS: dict = {}


def make_peer_timed(f32: str, imatrix: str, stock: str, out: str, threads: int) -> dict:
    """llama.cpp's --target-bpw rule (benchmarks/target_bpw_peer.py) at the stock file's size;
    its error table is computed once per run (the seconds are in the first size's entry)."""
    import time

    from target_bpw_peer import make_peer, tensor_errors
    t0, c0 = time.perf_counter(), time.process_time()
    cached = os.path.join(WORK, "peer-errors.json")     # the error table, reused across runs
    if "e" not in _PEER_ERRORS and os.path.exists(cached):
        _PEER_ERRORS["e"] = {n: {t: tuple(v) for t, v in o.items()} for n, o in json.load(open(cached)).items()}
    if "e" not in _PEER_ERRORS:
        _PEER_ERRORS["e"] = tensor_errors(f32, imatrix)
        with open(cached + ".tmp", "w") as f:
            json.dump(_PEER_ERRORS["e"], f)
        os.replace(cached + ".tmp", cached)
    r = make_peer(f32, imatrix, stock, out, TOOLS, threads, _PEER_ERRORS["e"])
    ch = os.times()
    return {"wall_s": round(time.perf_counter() - t0, 1),
            "cpu_s": round(time.process_time() - c0 + ch.children_user + ch.children_system, 1),
            "command": r["command"], "choice": r["choice"], "room": r["room"]}


# the candidate types of the sensitivity pass cached on this model (the list: F16, Q8_0, the K-quants, the
# legacy types); the IQ / FP4 / ternary types are not priced on Gemma-3-270M in these runs
TYPES = "f16,q8_0,q6_k,q5_k,q4_k,q3_k,q2_k,q5_1,q5_0,q4_1,q4_0"
DETERMINISTIC = ("rtn", "imatrix")       # llama-quantize's files: the same bytes every time, scores kept


def _file_types(path: str) -> dict:
    """Per tensor class the type counts of a written GGUF."""
    from quantkit.models.gguf import GGUFSource
    from quantkit.quant.sensitivity import tensor_class
    out: dict[str, dict[str, int]] = {}
    with GGUFSource(path) as g:
        for t in g.tensors():
            c = out.setdefault(tensor_class(t.name), {})
            c[t.type] = c.get(t.type, 0) + 1
    return out


def _card_checks(card: str) -> list[str]:
    """The measured-check rows of a budgeted file's model card."""
    if not os.path.exists(card):
        return []
    text = open(card, encoding="utf-8").read()
    part = text.split("## Measured check of the mix", 1)[-1] if "## Measured check" in text else ""
    return [ln for ln in part.split("\n## ", 1)[0].splitlines() if ln.startswith("| ") and "candidate" not in ln]


def _card_notes(gguf: str) -> list[str]:
    card = os.path.join(os.path.dirname(gguf), "README.md")
    return open(card, encoding="utf-8").read().splitlines() if os.path.exists(card) else []


# One loop that makes, scores and (with --cleanup) deletes each size's files in turn, resumable.
def main() -> None:  # noqa: C901  (the run's steps in order)
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default=",".join(STOCK))
    ap.add_argument("--chunks", type=int, default=64, help="imatrix chunks of 512 tokens")
    ap.add_argument("--gptq-chunks", type=int, default=64, help="GPTQ calibration samples of 512 tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-chunks", type=int, default=8)
    ap.add_argument("--methods", default="rtn,imatrix,budget-rtn,peer,gptq,budget-gptq")
    ap.add_argument("--texts", default="wikitext-2 test,sst-2 dev")
    ap.add_argument("--remake", default="", help="methods whose files are made again even when in the results")
    ap.add_argument("--cleanup", action="store_true", help="delete each size's files once scored")
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--results", default=RESULTS, help="the JSON to write (and resume from)")
    args = ap.parse_args()
    results_path = args.results
    os.makedirs(WORK, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(results_path)), exist_ok=True)
    py = sys.executable
    valid = os.path.join(DATA, "wikitext-2", "valid.txt")
    test = os.path.join(DATA, "wikitext-2", "test.txt")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}
    runs = results.setdefault("runs", {})
    ev = results.setdefault("eval", {})
    texts = {"wikitext-2 test": test, "sst-2 dev": sst2_text("dev")}
    texts = {k: v for k, v in texts.items() if k in args.texts.split(",")}
    remake = set(args.remake.split(",")) - {""}

    def save():
        with open(results_path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(results_path + ".tmp", results_path)

    def score(key: str, path: str, fresh: bool, keep: tuple = ()) -> None:
        """Score `path` on every text it has no score for (fresh: on every text but those in `keep`)."""
        from quantkit import api
        for label, text in texts.items():
            rows = ev.setdefault(label, {})
            if key in rows and (not fresh or label in keep):
                continue
            w0, c0 = time.perf_counter(), time.process_time()
            r = api.evaluate([f32, path], ref=f32, text=text, n_chunks=args.eval_chunks, speed=False,
                             n_threads=args.threads, show_progress=False)
            for row in r.rows:
                k = key if os.path.realpath(row.path) == os.path.realpath(path) else "f32"
                rows[k] = {m: getattr(row, m) for m in ("ppl", "kld_mean", "kld_median", "kld_p99", "top1_agreement")}
            rows[key].update({"mtime": int(os.path.getmtime(path)), "loadavg": open("/proc/loadavg").read().split()[0],
                              "wall_s": round(time.perf_counter() - w0, 1), "cpu_s": round(time.process_time() - c0, 1)})
            print(label, key, json.dumps(rows[key]), flush=True)
            save()

    f32 = os.path.join(WORK, "f32.gguf")
    if not os.path.exists(f32):
        runs["f32"] = timed([py, "-m", "quantkit.cli", "quantize", "--format", "gguf:f32", "-o", f32],
                            os.path.join(WORK, "f32.log"))
        save()
    imatrix = os.path.join(WORK, f"imatrix-{args.chunks}.dat")
    if not os.path.exists(imatrix) and "imatrix" in args.methods.split(","):
        runs["imatrix"] = timed([os.path.join(TOOLS, "llama-imatrix"), "-m", f32, "-f", valid, "-c", "512",
                                 "--chunks", str(args.chunks), "-t", str(args.threads), "-o", imatrix],
                                os.path.join(WORK, "imatrix.log"))
        save()
    methods = args.methods.split(",")
    for size in args.sizes.split(","):
        made = []
        for method in methods:
            key = f"{size}/{method}"
            stock = os.path.join(WORK, f"{size}-imatrix.gguf")
            out = os.path.join(WORK, f"{size}-{method}.gguf")
            if method.startswith("budget"):
                out = os.path.join(WORK, f"{size}-{method}", f"{size}-{method}.gguf")   # its card beside it
                os.makedirs(os.path.dirname(out), exist_ok=True)
            scored = all(key in ev.get(t, {}) for t in texts)
            if key in runs and method not in remake and (scored or os.path.exists(out)):
                if not scored and not args.skip_eval:
                    score(key, out, False)
                continue
            if method == "peer" and not os.path.exists(stock):
                timed([os.path.join(TOOLS, "llama-quantize"), "--imatrix", imatrix, f32, stock, size.upper(),
                       str(args.threads)], os.path.join(WORK, f"{size}-imatrix.log"))
                made.append(stock)
            # the budget: the llama.cpp imatrix stock file's bytes
            target = runs.get(f"{size}/imatrix", {}).get("bytes") or os.path.getsize(stock)
            cal = ["--calib", valid, "--nsamples", str(args.gptq_chunks), "--seqlen", "512", "--threads",
                   str(args.threads)]
            if method in ("rtn", "imatrix"):
                cmd = [os.path.join(TOOLS, "llama-quantize")] + (["--imatrix", imatrix] if method == "imatrix" else []) \
                      + [f32, out, size.upper(), str(args.threads)]
            elif method == "peer":
                runs[key] = make_peer_timed(f32, imatrix, stock, out, args.threads)
                runs[key]["bytes"] = os.path.getsize(out)
                runs[key]["target_bytes"] = target
                print(key, {k: v for k, v in runs[key].items() if k != "choice"}, flush=True)
                save()
                made.append(out)
                if not args.skip_eval:
                    score(key, out, True)
                continue
            elif method == "gptq":
                cmd = [py, "-m", "quantkit.cli", "quantize", f32, "--format", f"gguf:{size}+gptq", *cal, "-o", out]
            else:
                cmd = [py, "-m", "quantkit.cli", "quantize", f32, "--target-size", str(target), "--types", TYPES, *cal,
                       "-o", out] + (["--method", "gptq"] if method == "budget-gptq" else [])
            before = runs.get(key, {}).get("bytes")
            runs[key] = timed(cmd, os.path.join(WORK, f"{size}-{method}.log"))
            runs[key]["bytes"] = os.path.getsize(out)
            runs[key]["loadavg"] = open("/proc/loadavg").read().split()[:3]
            if method.startswith("budget"):
                runs[key]["target_bytes"] = target
                runs[key]["under_budget_pct"] = 100 * (1 - os.path.getsize(out) / target)
                runs[key]["types"] = _file_types(out)
                runs[key]["check"] = _card_checks(os.path.join(os.path.dirname(out), "README.md"))
            print(key, runs[key], flush=True)
            save()
            made.append(out)
            # a budgeted RTN file whose measured check kept the allocation's own mix is the file an
            # earlier run scored (the allocation and the writer are unchanged): its wikitext score stands
            keep = ()
            if method == "budget-rtn" and before == runs[key]["bytes"] and \
                    not any("measured check: kept" in ln for ln in _card_notes(out)):
                keep = ("wikitext-2 test",)
                runs[key]["same_mix_as_scored"] = True
            if not args.skip_eval:
                score(key, out, method not in DETERMINISTIC, keep)
        if args.cleanup:
            for path in made:
                if os.path.exists(path):
                    os.unlink(path)


def markdown(path: str = RESULTS) -> str:
    """The BENCHMARKS.md table: per size each file's bytes, KL on wikitext-2 test and SST-2 dev,
    top-1 agreement, and the budgeted files' KL ratios to llama.cpp's imatrix stock file and to
    quantkit's GPTQ of the stock mix."""
    r = json.load(open(path))
    runs, ev = r.get("runs", {}), r.get("eval", {})
    wiki, sst = ev.get("wikitext-2 test", {}), ev.get("sst-2 dev", {})
    names = {"rtn": "llama.cpp RTN", "imatrix": "llama.cpp + imatrix", "peer": "target-bpw rule (peer)",
             "gptq": "quantkit GPTQ, stock mix", "budget-rtn": "quantkit budget, RTN",
             "budget-gptq": "quantkit budget, GPTQ"}
    lines = ["| size | file | bytes | KLD wikitext-2 test | KLD SST-2 dev | top-1 wikitext | / imatrix (wiki, SST-2) "
             "| / GPTQ stock (wiki, SST-2) |", "|---|---|---:|---:|---:|---:|---:|---:|"]

    def ratio(key, other):
        out = []
        for rows in (wiki, sst):
            a, b = rows.get(key), rows.get(other)
            out.append(f"{a['kld_mean'] / b['kld_mean']:.2f}x" if a and b else "")
        return ", ".join(x for x in out if x)
    for size in STOCK:
        for method, label in names.items():
            key = f"{size}/{method}"
            if key not in runs:
                continue
            w, s_ = wiki.get(key), sst.get(key)
            budget = method.startswith("budget")
            lines.append(f"| {size.upper()} | {label} | {runs[key].get('bytes', 0):,} | "
                         f"{w['kld_mean']:.4g} | " if w else f"| {size.upper()} | {label} | {runs[key].get('bytes', 0):,} | | ")
            lines[-1] += (f"{s_['kld_mean']:.4g} | " if s_ else " | ") + (f"{w['top1_agreement']:.1%} | " if w else " | ")
            lines[-1] += (ratio(key, f"{size}/imatrix") + " | " + ratio(key, f"{size}/gptq") + " |") if budget else " | |"
    return "\n".join(lines)


FAMILIES = {"budget-rtn": "quantkit budget (RTN)", "budget-gptq": "quantkit budget (GPTQ)",
            "gptq": "quantkit GPTQ stock mix", "peer": "llama.cpp target-bpw rule (peer)",
            "imatrix": "llama.cpp imatrix stock mix", "rtn": "llama.cpp RTN stock mix"}


def pareto_pages(path: str = RESULTS) -> list[str]:
    """The size-against-KL pages (quantkit.eval.report.write_series_report), one per text."""
    import platform

    from quantkit.eval.report import write_series_report
    r = json.load(open(path))
    runs, out = r.get("runs", {}), []
    for text, rows in r.get("eval", {}).items():
        series: dict[str, list] = {}
        for method, family in FAMILIES.items():
            pts = [{"name": key.split("/")[0].upper(), "bytes": runs[key]["bytes"], "kld": m["kld_mean"]}
                   for key, m in sorted(rows.items(), key=lambda kv: runs.get(kv[0], {}).get("bytes", 0))
                   if key.endswith("/" + method) and key in runs]
            if pts:
                series[family] = pts
        slug = "wikitext2" if "wikitext" in text else "sst2"
        page = os.path.join(os.path.dirname(path), f"budget_pareto_{slug}.html")
        write_series_report(series, {"title": f"Gemma-3-270M: file size against KL divergence ({text})",
                                     "text": text, "command": "python benchmarks/budget_mix.py --pareto",
                                     "machine": {"cpu": platform.processor() or platform.machine()},
                                     "note": "Each family at the nine llama.cpp stock sizes; KL to the F32 "
                                             "reference, 4 chunks of 512 tokens."}, page)
        out.append(page)
    return out


if __name__ == "__main__":
    if "--markdown" in sys.argv:
        print(markdown())
    elif "--pareto" in sys.argv:
        print("\n".join(pareto_pages()))
    else:
        main()
