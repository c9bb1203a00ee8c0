"""Importance matrices: quantkit against llama.cpp's own tools, side by side in one run, on the
bundled Gemma-3-270M (F32 reference GGUF: llama.cpp's dequantization of the bundled file).

1. llama-imatrix -c 512 --chunks N on wikitext-2 valid (its default output: GGUF imatrix), and
   quantkit's imatrix (api.imatrix) on the very same token ids (llama.cpp's tokenization of the
   file, chunks of 512 with BOS first, as llama-imatrix makes them): entry names, token counts,
   and the largest difference of the sums relative to each tensor's largest column; wall and
   CPU time of each, in child processes.
2. With llama-imatrix's file, per file type: `llama-quantize --imatrix FILE` and
   `quantkit quantize --format gguf:TYPE --imatrix FILE` (the same FILE string, so the
   quantize.imatrix.file keys agree): differing bytes over the whole files, differing tensors,
   and the time of each.

llama.cpp's tools come from benchmarks/build_llama_tools.sh. Results: benchmarks/results/imatrix_exact.json.

    python benchmarks/imatrix_exact.py [--chunks 64] [--types q4_0,...|iq] [--threads 2] [--skip-imatrix]
                                       [--imatrix FILE] [--f32 FILE]
                                       [--results benchmarks/results/imatrix_exact.json]

`--types iq` stands for every IQ and ternary file type (IQ_TYPES). A pair of files that differ is
kept in the work directory for inspection; identical pairs are removed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DATA = os.path.join(REPO, "src", "quantkit", "data")
CACHE = os.environ.get("QUANTKIT_CACHE", os.path.expanduser("~/.cache/quantkit"))
WORK = os.path.join(CACHE, "bench-imatrix")
TOOLS = os.path.join(CACHE, "llama-tools", "bin")
TYPES = ("q4_0,q4_1,q5_0,q5_1,q8_0,q2_k,q2_k_s,q3_k_s,q3_k_m,q3_k_l,q4_k_s,q4_k_m,q5_k_s,q5_k_m,q6_k")
IQ_TYPES = ("iq4_xs,iq4_nl,iq3_m,iq3_s,iq3_xs,iq3_xxs,iq2_m,iq2_s,iq2_xs,iq2_xxs,iq1_m,iq1_s,tq1_0,tq2_0")


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


def machine() -> dict:
    flags = set()
    model = ""
    with open("/proc/cpuinfo") as f:
        for ln in f:
            if ln.startswith("flags") and not flags:
                flags = set(ln.split(":", 1)[1].split())
            if ln.startswith("model name") and not model:
                model = ln.split(":", 1)[1].strip()
    return {"cpu": model, "cores": os.cpu_count(), "load_avg_at_start": os.getloadavg(),
            "flags": {k: k in flags for k in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "fma")}}


def llama_chunks(f32: str, text_path: str, chunks: int, ctx: int = 512) -> np.ndarray:
    """llama-imatrix's token ids: the file tokenized with BOS (common_tokenize, add_special),
    cut into chunks of ctx tokens, each chunk's first token replaced by BOS."""
    import llama_cpp
    llm = llama_cpp.Llama(model_path=f32, vocab_only=True, verbose=False)
    with open(text_path, "rb") as f:
        text = f.read()
    if text.endswith(b"\n"):            # common's -f reader drops one trailing newline
        text = text[:-1]
    toks = np.array(llm.tokenize(text, add_bos=True, special=False), dtype=np.int64)
    bos = llm.token_bos()
    ids = toks[: chunks * ctx].reshape(chunks, ctx).copy()
    ids[:, 0] = bos
    return ids


def compare_imatrix(ours: str, theirs: str) -> dict:
    from quantkit.models.imatrix_file import read_imatrix
    a, b = read_imatrix(ours), read_imatrix(theirs)
    names_equal = sorted(a.entries) == sorted(b.entries)
    worst, worst_name, counts_equal, med = 0.0, None, True, []
    for n in sorted(set(a.entries) & set(b.entries)):
        x, y = a.entries[n].sums.astype(np.float64), b.entries[n].sums.astype(np.float64)
        counts_equal &= np.array_equal(a.entries[n].counts, b.entries[n].counts)
        rel = np.abs(x - y).max() / max(np.abs(y).max(), 1e-30)
        med.append(float(np.median(np.abs(x - y) / np.maximum(np.abs(y), 1e-30))))
        if rel > worst:
            worst, worst_name = rel, n
    return {"entries": [len(a.entries), len(b.entries)], "names_equal": names_equal, "counts_equal": bool(counts_equal),
            "max_rel_diff_of_max": worst, "worst_tensor": worst_name,
            "median_elementwise_rel_diff": float(np.median(med)) if med else None}


def compare_files(a: str, b: str) -> dict:
    from quantkit.models.gguf import GGUFSource
    x = np.fromfile(a, dtype=np.uint8)
    y = np.fromfile(b, dtype=np.uint8)
    n = min(x.size, y.size)
    diff = int((x[:n] != y[:n]).sum()) + abs(x.size - y.size)
    ra, rb = GGUFSource(a), GGUFSource(b)
    try:
        bad = [t.name for t in ra.tensors() if ra.tensor_info(t.name).type != rb.tensor_info(t.name).type
               or not np.array_equal(ra.raw(t.name)[0], rb.raw(t.name)[0])]
        types = sorted({ra.tensor_info(t.name).type for t in ra.tensors()})
    finally:
        ra.close()
        rb.close()
    return {"bytes": [int(x.size), int(y.size)], "differing_bytes": diff, "differing_tensors": bad, "types": types}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=64)
    ap.add_argument("--types", default=TYPES)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-imatrix", action="store_true", help="reuse the imatrix files of an earlier run")
    ap.add_argument("--imatrix", default=None,
                    help="quantize with this imatrix file (implies --skip-imatrix) instead of llama-imatrix's of --chunks")
    ap.add_argument("--f32", default=None, help="the F32 model file to quantize (default: quantkit's F32 reference "
                                                "of the bundled model, rebuilt in the eval cache when evicted)")
    ap.add_argument("--results", default=os.path.join(HERE, "results", "imatrix_exact.json"))
    args = ap.parse_args()
    if args.types == "iq":
        args.types = IQ_TYPES
    for tool in ("llama-imatrix", "llama-quantize"):
        if not os.path.exists(os.path.join(TOOLS, tool)):
            raise SystemExit(f"{tool} missing: run benchmarks/build_llama_tools.sh first")
    os.makedirs(WORK, exist_ok=True)
    res_path = args.results
    results = json.load(open(res_path)) if os.path.exists(res_path) else {}
    results["machine"] = machine()

    def save():
        os.makedirs(os.path.dirname(res_path), exist_ok=True)
        with open(res_path + ".tmp", "w") as f:
            json.dump(results, f, indent=2)
        os.replace(res_path + ".tmp", res_path)

    from quantkit.eval.lm import f32_reference
    from quantkit.models.bundled import bundled_path
    f32 = args.f32 or f32_reference(bundled_path(), args.threads, show_progress=False)
    valid = os.path.join(DATA, "wikitext-2", "valid.txt")
    theirs = args.imatrix or os.path.join(WORK, f"imatrix-llama-{args.chunks}.gguf")
    ours = os.path.join(WORK, f"imatrix-quantkit-{args.chunks}.gguf")
    if not (args.skip_imatrix or args.imatrix):
        ids_path = os.path.join(WORK, f"ids-{args.chunks}.npy")
        np.save(ids_path, llama_chunks(f32, valid, args.chunks))
        im = results.setdefault("imatrix", {})
        im["llama-imatrix"] = timed([os.path.join(TOOLS, "llama-imatrix"), "-m", f32, "-f", valid, "-c", "512",
                                     "--chunks", str(args.chunks), "-t", str(args.threads), "-o", theirs],
                                    os.path.join(WORK, "llama-imatrix.log"))
        save()
        code = (f"import numpy as np, torch; torch.set_num_threads({args.threads}); from quantkit import api; "
                f"api.imatrix({f32!r}, {ours!r}, input_ids=np.load({ids_path!r}), show_progress=False)")
        im["quantkit"] = timed([sys.executable, "-c", code], os.path.join(WORK, "quantkit-imatrix.log"))
        im["time_ratio_quantkit_over_llama"] = round(im["quantkit"]["wall_s"] / im["llama-imatrix"]["wall_s"], 2)
        im["compare"] = compare_imatrix(ours, theirs)
        print(json.dumps(im, indent=1), flush=True)
        save()
    q = results.setdefault("quantize", {})
    for ft in args.types.split(","):
        a, b = os.path.join(WORK, f"{ft}-quantkit.gguf"), os.path.join(WORK, f"{ft}-llama.gguf")
        r = {"llama-quantize": timed([os.path.join(TOOLS, "llama-quantize"), "--imatrix", theirs, f32, b, ft.upper(),
                                      str(args.threads)], os.path.join(WORK, f"{ft}-llama.log")),
             "quantkit": timed([sys.executable, "-m", "quantkit.cli", "-q", "quantize", f32, "--format", f"gguf:{ft}",
                                "--imatrix", theirs, "-o", a], os.path.join(WORK, f"{ft}-quantkit.log"))}
        r.update(compare_files(a, b))
        r["first_differing_tensor"] = r["differing_tensors"][0] if r["differing_tensors"] else None
        r["wall_ratio_quantkit_over_llama"] = round(r["quantkit"]["wall_s"] / r["llama-quantize"]["wall_s"], 2)
        r["cpu_ratio_quantkit_over_llama"] = round(r["quantkit"]["cpu_s"] / max(r["llama-quantize"]["cpu_s"], 0.1), 2)
        r["load_avg_after"] = os.getloadavg()
        q[ft] = r
        print(ft, {k: r[k] for k in ("differing_bytes", "differing_tensors")},
              r["llama-quantize"]["wall_s"], r["quantkit"]["wall_s"], flush=True)
        save()
        if r["differing_bytes"] == 0:
            for p in (a, b):
                os.remove(p)


if __name__ == "__main__":
    main()
