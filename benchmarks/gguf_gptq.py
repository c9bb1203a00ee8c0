"""GPTQ-compensated GGUF against llama.cpp's own quantizer, with and without an importance
matrix, side by side in one run, on the bundled Gemma-3-270M.

Per file type (default Q4_0, Q4_1, Q3_K_M):
  llama.cpp RTN       llama-quantize F32 -> TYPE
  llama.cpp imatrix   llama-imatrix -c 512 --chunks N on wikitext-2 valid, then llama-quantize --imatrix
  quantkit GPTQ       quantkit quantize --method gptq, the same N x 512 tokens of wikitext-2 valid
All from the same F32 GGUF (llama.cpp's dequantization of the bundled file), which is also the
reference. Each file is scored by quantkit eval (llama.cpp runtime, 8 chunks of BOS + 511,
second half scored) on wikitext-2 test and, out of the calibration's domain, on SST-2 dev
sentences (movie reviews). Quantization times and peak RSS are measured in child processes.

llama.cpp's tools are built from the sources vendored in the llama-cpp-python sdist by
benchmarks/build_llama_tools.sh. Results: benchmarks/results/gguf_gptq.json.

    python benchmarks/gguf_gptq.py [--types q4_0,q4_1,q3_k_m] [--chunks 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DATA = os.path.join(REPO, "src", "quantkit", "data")
WORK = os.path.join(os.environ.get("QUANTKIT_CACHE", os.path.expanduser("~/.cache/quantkit")), "bench-gptq")
TOOLS = os.path.join(os.environ.get("QUANTKIT_CACHE", os.path.expanduser("~/.cache/quantkit")), "llama-tools", "bin")


def timed(cmd: list[str], log: str) -> dict:
    """Run cmd; wall seconds, CPU seconds and peak RSS of the child (GNU time)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        r = subprocess.run(["/usr/bin/time", "-f", "TIME %e %U %S %M", *cmd], stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}; see {log}")
    last = [ln for ln in open(log).read().splitlines() if ln.startswith("TIME ")][-1].split()
    return {"wall_s": round(wall, 1), "cpu_s": round(float(last[2]) + float(last[3]), 1),
            "peak_rss_mb": round(int(last[4]) / 1024, 0), "command": " ".join(cmd)}


def sst2_text(split: str = "dev") -> str:
    """SST-2 sentences, one per line (dev: the reported out-of-domain text; train: the text used
    to choose GPTQ settings, so that dev is never tuned on)."""
    path = os.path.join(WORK, f"sst2-{split}.txt")
    if not os.path.exists(path):
        os.makedirs(WORK, exist_ok=True)
        with open(os.path.join(DATA, "sst2", f"{split}.tsv"), encoding="utf-8") as f:
            lines = [ln.split("\t", 1)[1].strip() for ln in f.read().splitlines()[1:] if "\t" in ln][:5000]
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default="q4_0,q4_1,q3_k_m")
    ap.add_argument("--chunks", type=int, default=64, help="calibration chunks of 512 tokens (both methods)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-chunks", type=int, default=8)
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--methods", default="rtn,imatrix,gptq")
    ap.add_argument("--shrink", type=float, default=0.0, help="quantkit --shrink for the gptq rows (label gptq-sS)")
    ap.add_argument("--texts", default="wikitext-2 test,sst-2 dev",
                    help="eval texts: wikitext-2 test, sst-2 dev, sst-2 train (the last for choosing settings)")
    args = ap.parse_args()
    os.makedirs(WORK, exist_ok=True)
    py = sys.executable
    valid = os.path.join(DATA, "wikitext-2", "valid.txt")
    test = os.path.join(DATA, "wikitext-2", "test.txt")
    methods = args.methods.split(",")
    if set(methods) - {"gptq"}:
        for tool in ("llama-imatrix", "llama-quantize"):
            if not os.path.exists(os.path.join(TOOLS, tool)):
                raise SystemExit(f"{tool} missing: run benchmarks/build_llama_tools.sh first")
    res_path = os.path.join(HERE, "results", "gguf_gptq.json")
    results = json.load(open(res_path)) if os.path.exists(res_path) else {}
    results.setdefault("runs", {})

    def save():
        """Merge into the file (another instance may be running other types or methods)."""
        os.makedirs(os.path.dirname(res_path), exist_ok=True)
        disk = json.load(open(res_path)) if os.path.exists(res_path) else {}
        def merge(dst: dict, src: dict) -> None:
            for k, v in src.items():
                if isinstance(v, dict) and isinstance(dst.get(k), dict) and k != "f32":
                    merge(dst[k], v)
                else:
                    dst[k] = v

        merge(disk, results)
        tmp = f"{res_path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(disk, f, indent=2)
        os.replace(tmp, res_path)

    from quantkit.eval.lm import f32_reference
    from quantkit.models.bundled import bundled_path
    f32 = f32_reference(bundled_path(), args.threads, show_progress=False)
    results["reference"] = f32
    imatrix = os.path.join(WORK, f"imatrix-{args.chunks}.gguf")
    runs = results["runs"]
    if "imatrix" in methods and not os.path.exists(imatrix):
        runs["imatrix"] = timed([os.path.join(TOOLS, "llama-imatrix"), "-m", f32, "-f", valid, "-c", "512",
                                 "--chunks", str(args.chunks), "-t", str(args.threads), "-o", imatrix],
                                os.path.join(WORK, "imatrix.log"))
        save()
    files = {}
    for ft in args.types.split(","):
        for method in methods:
            if method == "gptq" and args.shrink:
                method = f"gptq-s{args.shrink:g}"
            out = os.path.join(WORK, f"{ft}-{method}-{args.chunks}.gguf")
            files[(ft, method)] = out
            key = f"{ft}/{method}"
            if os.path.exists(out) and key in runs:
                continue
            if method.startswith("gptq"):
                cmd = [py, "-m", "quantkit.cli", "quantize", f32, "--method", "gptq", "--format", f"gguf:{ft}",
                       "--calib", valid, "--nsamples", str(args.chunks), "--seqlen", "512", "--threads", str(args.threads),
                       "--shrink", str(args.shrink), "-o", out]
            else:
                cmd = [os.path.join(TOOLS, "llama-quantize")] + (["--imatrix", imatrix] if method == "imatrix" else []) \
                      + [f32, out, ft.upper(), str(args.threads)]
            runs[key] = timed(cmd, os.path.join(WORK, f"{ft}-{method}.log"))
            runs[key]["bytes"] = os.path.getsize(out)
            print(key, runs[key], flush=True)
            save()
    if args.skip_eval:
        return
    from quantkit import api
    results.setdefault("eval", {})
    texts = {"wikitext-2 test": test, "sst-2 dev": sst2_text("dev"), "sst-2 train": sst2_text("train")}
    for label in args.texts.split(","):
        text = texts[label]
        r = api.evaluate([f32, *files.values()], ref=f32, text=text, n_chunks=args.eval_chunks, speed=False,
                         n_threads=args.threads, show_progress=False)
        names = {os.path.realpath(p): f"{ft}/{m}" for (ft, m), p in files.items()}
        rows = {}
        for row in r.rows:
            key = names.get(os.path.realpath(row.path), "f32")
            rows[key] = {k: getattr(row, k) for k in ("ppl", "kld_mean", "kld_median", "kld_p99", "top1_agreement")}
        results["eval"][label] = rows
        print(label, json.dumps(rows, indent=1), flush=True)
        save()


def markdown(res_path: str) -> str:
    """The BENCHMARKS.md table of a results file."""
    r = json.load(open(res_path))
    runs, ev = r.get("runs", {}), r.get("eval", {})
    texts = list(ev)
    head = "| file | method | bytes | " + " | ".join(f"KLD {t} | PPL {t} | top-1 {t}" for t in texts) \
        + " | quantize CPU s (wall s) | peak RSS MB |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    imat = runs.get("imatrix", {})
    keys = ["f32"] + sorted({k for t in texts for k in ev[t] if k != "f32"},
                            key=lambda k: (k.split("/")[0], ["rtn", "imatrix", "gptq"].index(k.split("/")[1])))
    for k in keys:
        ft, method = (k.split("/") + ["reference"])[:2] if k != "f32" else ("F32", "reference")
        run = runs.get(k, {})
        cells = []
        for t in texts:
            m = ev[t].get(k, {})
            cells += [f"{m['kld_mean']:.4f}" if m else "", f"{m['ppl']:.3f}" if m else "",
                      f"{100 * m['top1_agreement']:.1f}%" if m else ""]
        cost = f"{run['cpu_s']:.0f} ({run['wall_s']:.0f})" if run else ""
        if method == "imatrix" and imat:
            cost += f" + matrix {imat['cpu_s']:.0f} ({imat['wall_s']:.0f})"
        label = {"rtn": "llama.cpp RTN", "imatrix": "llama.cpp + imatrix", "gptq": "quantkit GPTQ"}.get(method, method)
        lines.append(f"| {ft.upper()} | {label} | {run.get('bytes', '')} | " + " | ".join(cells)
                     + f" | {cost} | {run.get('peak_rss_mb', '')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if "--markdown" in sys.argv:
        print(markdown(os.path.join(HERE, "results", "gguf_gptq.json")))
    else:
        main()
