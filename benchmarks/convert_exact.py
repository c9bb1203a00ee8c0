"""Converting quantized checkpoints without a second rounding, on the bundled Gemma-3-270M,
against llama.cpp's own path, side by side in one run per part.

  prepare    the F32 GGUF (llama.cpp's dequantization of the bundled Q4_K_M: the reference
             weights) and two GPTQ-format checkpoints quantkit writes from it: gptq:w4g128
             (symmetric) and gptq:w4g128-asym, by RTN (--ck-method gptq: GPTQ on N x 512 tokens)
  exact      checkpoint -> Q4_0 (sym) and Q4_1 (asym) with --exact: differing dequantized values
             against the checkpoint's (q - z) * s over every quantized linear; KL divergence of
             the GGUF in llama.cpp against the checkpoint's weights in transformers, next to the
             F32-vs-F32 runtime noise (the checkpoint's weights at F32 in llama.cpp against the
             same in transformers) and to llama.cpp's own path (convert_hf_to_gguf.py from the
             llama-cpp-python sdist, which dequantizes GPTQ, then llama-quantize Q4_0 / Q4_1)
  solved     checkpoint -> Q4_K_M: quantkit (GPTQ onto Q4_K_M's grids with the checkpoint's
             weights as the target) against llama.cpp's path (convert_hf_to_gguf.py, then
             llama-imatrix on the same N x 512 calibration tokens and llama-quantize --imatrix);
             KL divergence to the checkpoint's weights (F32 GGUF, llama.cpp) on wikitext-2 test
             and SST-2 dev
  codes      checkpoint -> Q4_K_M keeping the checkpoint's codes in Q4_K / Q6_K blocks (only the
             block scales and minima rounded; the 640-wide rows take the exact Q5_0 / Q8_0 path);
             no calibration. Against llama.cpp's path with imatrices of N and 4 x 512 tokens, the
             earlier GPTQ-solved file (4 x 512) and dequantize-then-RTN; KL divergence as in solved
  iq4        checkpoint -> IQ4_XS solved by GPTQ onto IQ4_XS / IQ4_NL (N x 512 calibration) against
             convert_hf_to_gguf.py + llama-imatrix (same N x 512 tokens) + llama-quantize IQ4_XS
  count      the exact files' dequantized values against the checkpoints' (q - z) * s: differing
             values, the largest difference, and (Q4_1) how many lie beyond the fp16 rounding of
             the minimum
  llmc       an llm-compressor checkpoint (its W4A16 scheme: symmetric 4-bit g128, round to nearest
             by QuantizationModifier, saved pack-quantized) of the F32 model exported to Hugging
             Face (the roundtrip part's f32-hf), written by llm-compressor from a separate venv
             (LLMC_PY, default ~/.cache/quantkit/llmc-venv), then -> Q4_0 with --exact: differing values
  qat        a QAT stand-in (the F32 weights of every Q4_0 tensor projected onto Q4_0 blocks
             whose largest magnitude sits on code 5, 6 or 7): quantkit --qat against
             llama-quantize Q4_0: blocks reproduced exactly, KL divergence to the stand-in
  roundtrip  F32 GGUF -> Hugging Face (hf:f32) -> F32 GGUF: identical tensors; the exported
             tokenizer's ids against llama.cpp's on both texts

    python benchmarks/convert_exact.py --part prepare|exact|solved|codes|iq4|count|llmc|qat|roundtrip [--chunks 4]
Results: benchmarks/results/convert_exact.json (one key per part).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from gguf_gptq import DATA, sst2_text, timed  # noqa: E402

CACHE = os.environ.get("QUANTKIT_CACHE", os.path.expanduser("~/.cache/quantkit"))
WORK = os.path.join(CACHE, "bench-convert")
TOOLS = os.path.join(CACHE, "llama-tools")
BIN = os.path.join(TOOLS, "bin")
LLAMA_SRC = os.path.join(TOOLS, "src", "llama_cpp_python-0.3.36", "vendor", "llama.cpp")
RESULTS = os.path.join(HERE, "results", "convert_exact.json")
PY = sys.executable
TEST = os.path.join(DATA, "wikitext-2", "test.txt")
VALID = os.path.join(DATA, "wikitext-2", "valid.txt")


def w(*p: str) -> str:
    return os.path.join(WORK, *p)


def summary(log: str) -> dict:
    """The --json summary a quantkit run printed into its log (between a "{" line and a "}" line)."""
    lines = open(log).read().replace("\r", "\n").splitlines()
    start = next(i for i, ln in enumerate(lines) if ln == "{")
    end = max(i for i, ln in enumerate(lines) if ln == "}")
    return json.loads("\n".join(lines[start:end + 1]))


def logged(log: str) -> dict:
    """The GNU time figures of an earlier timed() run, from its log."""
    if not os.path.exists(log):
        return {}
    last = [ln for ln in open(log).read().splitlines() if ln.startswith("TIME ")]
    if not last:
        return {}
    t = last[-1].split()
    return {"wall_s": float(t[1]), "cpu_s": round(float(t[2]) + float(t[3]), 1), "peak_rss_mb": round(int(t[4]) / 1024),
            "from_log": os.path.basename(log)}


def quantkit(args: list[str], log: str) -> dict:
    return timed([PY, "-m", "quantkit.cli", *args], log)


def save(part: str, data: dict) -> None:
    res = json.load(open(RESULTS)) if os.path.exists(RESULTS) else {}
    res[part] = data
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({part: data}, indent=1), flush=True)


def machine() -> dict:
    flags = open("/proc/cpuinfo").read()
    model = [ln.split(":", 1)[1].strip() for ln in flags.splitlines() if ln.startswith("model name")][0]
    return {"cpu": model, "flags": [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16") if f" {f}" in flags],
            "load_before": os.getloadavg()[0]}


def prepare(chunks: int, method: str) -> dict:
    from quantkit.models.bundled import bundled_path
    os.makedirs(WORK, exist_ok=True)
    out = {}
    if not os.path.exists(w("f32.gguf")):
        out["f32"] = quantkit(["quantize", bundled_path(), "--format", "gguf:f32", "-o", w("f32.gguf")], w("f32.log"))
    for spec in ("gptq:w4g128", "gptq:w4g128-asym"):
        d = w(spec.replace(":", "-"))
        if not os.path.exists(d):
            out[spec] = quantkit(["quantize", w("f32.gguf"), "--format", f"{spec}+{method}", "--calib", VALID,
                                  "--nsamples", str(chunks), "--seqlen", "512", "-o", d], d + ".log")
    return out


def checkpoint_f32(ck: str) -> str:
    """The checkpoint's own weights ((q - z) * s) as an F32 GGUF, for llama.cpp and the torch runtime."""
    path = ck + "-deq-f32.gguf"
    if not os.path.exists(path):
        from quantkit.models.quantized_source import QuantizedHFSource
        from quantkit.quant.gguf_export import export_gguf
        with QuantizedHFSource(ck) as src:
            export_gguf(src, path, "f32", show_progress=False)
    return path


def llama_path(ck: str, ftype: str, imatrix_chunks: int = 0) -> tuple[str, dict]:
    """llama.cpp's own path: convert_hf_to_gguf.py (dequantizes GPTQ) -> F32, then llama-quantize
    (with an importance matrix on the calibration text when imatrix_chunks)."""
    times = {}
    hf = ck + "-llama"
    conv = ck + "-llama-convert-f32.gguf"
    if not os.path.exists(conv):
        if not os.path.exists(hf):      # its SentencePiece vocabulary: convert_hf_to_gguf reads tokenizer.model
            shutil.copytree(ck, hf)
            from quantkit.models.gguf import GGUFSource
            from quantkit.models.gguf_tokenizer import spm_model_proto
            with GGUFSource(w("f32.gguf")) as g:
                m = g.metadata
                with open(os.path.join(hf, "tokenizer.model"), "wb") as f:
                    f.write(spm_model_proto(m, list(m["tokenizer.ggml.tokens"].value),
                                            [int(t) for t in m["tokenizer.ggml.token_type"].value]))
        env = dict(os.environ, PYTHONPATH=os.path.join(LLAMA_SRC, "gguf-py"))
        t0 = time.perf_counter()
        r = subprocess.run([PY, os.path.join(LLAMA_SRC, "convert_hf_to_gguf.py"), hf, "--outtype", "f32",
                            "--outfile", conv], env=env, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"convert_hf_to_gguf failed: {r.stderr[-2000:]}")
        times["convert_hf_to_gguf_s"] = round(time.perf_counter() - t0, 1)
    out = f"{ck}-llama-{ftype}{f'-imatrix{imatrix_chunks}' if imatrix_chunks else ''}.gguf"
    if not os.path.exists(out):
        cmd = [os.path.join(BIN, "llama-quantize")]
        if imatrix_chunks:
            mat = ck + f"-imatrix-{imatrix_chunks}.dat"
            if not os.path.exists(mat):
                times["imatrix"] = timed([os.path.join(BIN, "llama-imatrix"), "-m", conv, "-f", VALID, "-c", "512",
                                          "--chunks", str(imatrix_chunks), "-t", "2", "-o", mat], mat + ".log")
            cmd += ["--imatrix", mat]
        times["quantize"] = timed(cmd + [conv, out, ftype.upper(), "2"], out + ".log")
    return out, times


def kld(models: list[str], ref: str, texts=None, chunks: int = 4) -> dict:
    from quantkit import api
    texts = texts or (("wikitext-2 test", TEST), ("sst-2 dev", sst2_text()))
    out = {}
    for label, text in texts:
        r = api.evaluate(models, ref=ref, text=text, n_chunks=chunks, speed=False, n_threads=2, show_progress=False)
        rows = {}
        for row in r.rows:
            rows[os.path.basename(str(row.path))] = {k: getattr(row, k, None) for k in ("ppl", "kld_mean", "kld_p99",
                                                                                      "top1_agreement")}
        out[label] = rows
    return out


def compare_dequantized(ck: str, gguf: str, minimum_bound: bool = False) -> dict:
    """Values of every exact tensor: the GGUF's dequantization against the checkpoint's; with
    minimum_bound, also the values farther from it than the fp16 rounding of their block's
    minimum -z*s (Q4_1: value = d*q + fp16(m))."""
    from quantkit.models.gguf import GGUFSource
    from quantkit.models.quantized_source import QuantizedHFSource
    n = differ = beyond = 0
    worst = 0.0
    with QuantizedHFSource(ck) as src, GGUFSource(gguf) as g:
        for t in g.tensors():
            grid = src.grid(t.name)
            if grid is None:
                continue
            a, b = src.load(t.name), g.load(t.name)
            n += a.numel()
            differ += int((a != b).sum())
            worst = max(worst, float((a - b).abs().max()))
            if minimum_bound:           # the grid's rows are in HF order: Gemma's q/k are not permuted
                m = -grid.column_zeros().float() * grid.column_scales()
                bound = (m.half().float() - m).abs()
                slack = 1.2e-7 * (b.abs() + m.abs().reshape(b.shape))     # the fp32 sum d*q + fp16(m)
                beyond += int(((a - b).abs() > bound.reshape(b.shape) + slack).sum())
    out = {"values": n, "differing": differ, "max_abs_diff": worst}
    if minimum_bound:
        out["beyond_fp16_rounding_of_minimum"] = beyond
    return out


def part_exact() -> dict:
    from quantkit.quant.convert import convert_to_gguf
    out = {}
    pairs = (("gptq:w4g128", "q4_0"), ("gptq:w4g128-asym", "q4_1"))
    for spec, ft in pairs if os.environ.get("CONVERT_ALL") else pairs[1:]:      # sym: measured by part exact
        ck = w(spec.replace(":", "-"))
        gg = f"{ck}-{ft}.gguf"
        row = {}
        if not os.path.exists(gg):
            t0 = time.perf_counter()
            rep = convert_to_gguf(ck, gg, ft, exact=True, show_progress=False)
            row = {"convert_s": round(time.perf_counter() - t0, 1), "paths": rep.counts(),
                   "max_min_error": rep.max_min_error, **compare_dequantized(ck, gg)}
        deq = checkpoint_f32(ck)
        theirs, times = llama_path(ck, ft)
        row["llama_cpp_path"] = times
        # reference: the checkpoint's weights in transformers; F32-vs-F32 noise: the same weights in llama.cpp
        save("exact", {**out, spec + " -> " + ft: row, "machine": machine()})
        row["kld_vs_checkpoint_in_transformers"] = kld([deq, gg, theirs], "torch:" + deq, (("wikitext-2 test", TEST),))
        out[spec + " -> " + ft] = row
        save("exact", {**out, "machine": machine()})
    return out


def part_solved(chunks: int) -> dict:
    ck = w("gptq-w4g128")
    deq = checkpoint_f32(ck)
    ours = ck + "-q4_k_m.gguf"
    res: dict = {"machine": machine()}
    res["quantkit"] = logged(ours + ".log")
    if not os.path.exists(ours):
        res["quantkit"] = quantkit(["quantize", ck, "--format", "gguf:q4_k_m", "--calib", VALID, "--nsamples",
                                    str(chunks), "--seqlen", "512", "--json", "-o", ours], ours + ".log")
    res["quantkit"]["paths"] = summary(ours + ".log")["paths"]
    theirs, res["llama_cpp"] = llama_path(ck, "q4_k_m", imatrix_chunks=chunks)
    res["llama_cpp"].update({"imatrix": logged(ck + f"-imatrix-{chunks}.dat.log"), "quantize": logged(theirs + ".log")})
    rtn = ck + "-rtn-q4_k_m.gguf"
    res["rtn"] = logged(rtn + ".log")
    if not os.path.exists(rtn):
        res["rtn"] = quantkit(["quantize", deq, "--format", "gguf:q4_k_m", "-o", rtn], rtn + ".log")
    save("solved", res)
    res["kld_vs_checkpoint"] = kld([ours, theirs, rtn], deq)
    save("solved", res)
    return res


def part_codes(chunks: int) -> dict:
    ck = w("gptq-w4g128")
    deq = checkpoint_f32(ck)
    ours = ck + "-q4_k_m-codes.gguf"
    res: dict = {"machine": machine()}
    res["quantkit_codes"] = logged(ours + ".log")
    if not os.path.exists(ours):
        res["quantkit_codes"] = quantkit(["quantize", ck, "--format", "gguf:q4_k_m", "--json", "-o", ours],
                                         ours + ".log")
    rep = summary(ours + ".log")
    res["quantkit_codes"].update({k: rep[k] for k in ("paths", "max_scale_error", "max_value_error")})
    res["quantkit_codes"]["types"] = sorted({t["type"] + " " + t["path"] for t in rep["tensors"].values()})
    models = {"codes": ours}
    if os.environ.get("CONVERT_ALL"):   # the files part solved measured (same evaluation, deterministic)
        models.update({"gptq_4": ck + "-q4_k_m.gguf", "rtn": ck + "-rtn-q4_k_m.gguf"})
    for n in sorted({chunks, 4} if os.environ.get("CONVERT_ALL") else {chunks}):
        models[f"llama_imatrix_{n}"], t = llama_path(ck, "q4_k_m", imatrix_chunks=n)
        res[f"llama_imatrix_{n}"] = {**t, "imatrix": logged(ck + f"-imatrix-{n}.dat.log"),
                                     "quantize": logged(models[f"llama_imatrix_{n}"] + ".log")}
    res["files"] = {k: os.path.basename(v) for k, v in models.items()}
    save("codes", res)
    res["kld_vs_checkpoint"] = kld(list(models.values()), deq)
    save("codes", res)
    return res


def part_iq4(chunks: int) -> dict:
    ck = w("gptq-w4g128")
    deq = checkpoint_f32(ck)
    ours = ck + f"-iq4_xs-gptq{chunks}.gguf"
    res: dict = {"machine": machine(), "chunks": chunks}
    res["quantkit"] = logged(ours + ".log")
    if not os.path.exists(ours):
        res["quantkit"] = quantkit(["quantize", ck, "--format", "gguf:iq4_xs", "--calib", VALID, "--nsamples",
                                    str(chunks), "--seqlen", "512", "--json", "-o", ours], ours + ".log")
    res["quantkit"]["paths"] = summary(ours + ".log")["paths"]
    theirs, t = llama_path(ck, "iq4_xs", imatrix_chunks=chunks)
    res["llama_cpp"] = {**t, "imatrix": logged(ck + f"-imatrix-{chunks}.dat.log"), "quantize": logged(theirs + ".log")}
    res["files"] = {"quantkit": os.path.basename(ours), "llama_cpp": os.path.basename(theirs)}
    save("iq4", res)
    res["kld_vs_checkpoint"] = kld([ours, theirs], deq)
    save("iq4", res)
    return res


def part_count() -> dict:
    res: dict = {"machine": machine()}
    pairs = (("gptq:w4g128", "q4_0"), ("gptq:w4g128-asym", "q4_1"))
    for spec, ft in pairs if os.environ.get("CONVERT_ALL") else pairs[1:]:      # sym: measured by part exact
        ck = w(spec.replace(":", "-"))
        gg = f"{ck}-{ft}.gguf"
        row = {}
        if not os.path.exists(gg):
            from quantkit.quant.convert import convert_to_gguf
            rep = convert_to_gguf(ck, gg, ft, exact=True, show_progress=False)
            row = {"paths": rep.counts(), "max_min_error": rep.max_min_error}
        row.update(compare_dequantized(ck, gg, minimum_bound=(ft == "q4_1")))
        res[f"{spec} -> {ft}"] = row
        save("count", res)
    return res


LLMC_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
src, out = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16)
tok = AutoTokenizer.from_pretrained(src)
oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]))
model.save_pretrained(out, save_compressed=True)
tok.save_pretrained(out)
"""


def part_llmc() -> dict:
    from quantkit.quant.convert import convert_to_gguf
    py = os.environ.get("LLMC_PY", os.path.join(CACHE, "llmc-venv", "bin", "python"))
    ck, gg = w("llmc-w4a16"), w("llmc-w4a16-q4_0.gguf")
    res: dict = {"machine": machine()}
    if not os.path.exists(ck):
        script = w("llmc_w4a16.py")
        with open(script, "w") as f:
            f.write(LLMC_SCRIPT)
        res["llm_compressor"] = timed([py, script, w("f32-hf"), ck], ck + ".log")
    if not os.path.exists(os.path.join(ck, "tokenizer.model")):    # save_pretrained writes tokenizer.json only
        shutil.copy(w("f32-hf", "tokenizer.model"), ck)
    if not os.path.exists(gg):
        t0 = time.perf_counter()
        rep = convert_to_gguf(ck, gg, "q4_0", exact=True, show_progress=False)
        res["convert"] = {"wall_s": round(time.perf_counter() - t0, 1), "paths": rep.counts(), "source": rep.source}
    res.update(compare_dequantized(ck, gg))
    save("llmc", res)
    return res


def part_qat() -> dict:
    import numpy as np
    import torch
    from quantkit.models.gguf import GGUFSource, write_gguf_file
    from quantkit.quant.gguf_export import plan_gguf
    stand = w("qat-standin-f32.gguf")
    with GGUFSource(w("f32.gguf")) as src:
        _, plan = plan_gguf(src, "q4_0")
        q40 = {n for n, _, t in plan if t == "q4_0"}
        if not os.path.exists(stand):
            g = torch.Generator().manual_seed(0)

            def produce(name):
                x = src.load(name)
                if name in q40:
                    b = x.reshape(-1, 32)
                    k = torch.randint(5, 8, (b.shape[0], 1), generator=g).float()
                    d = (b.abs().amax(1, keepdim=True) / k).half().float()
                    x = (torch.clamp(torch.round(b / d), -8, 7) * d).reshape(x.shape)
                return np.ascontiguousarray(x.numpy().astype(np.float32)).view(np.uint8).reshape(-1)
            write_gguf_file(stand, src.spec.arch, src.metadata, [(t.name, t.shape, "f32") for t in src.tensors()],
                            produce)
    res: dict = {"machine": machine(), "q4_0_tensors": len(q40)}
    ours = w("qat-quantkit-q4_0.gguf")
    theirs = w("qat-llama-q4_0.gguf")
    r = {} if os.path.exists(ours) else quantkit(["quantize", stand, "--format", "gguf:q4_0", "--qat", "--json",
                                                   "-o", ours], ours + ".log")
    rep = summary(ours + ".log")                # the --json summary (kept from the run that made the file)
    res["quantkit"] = {**r, **{k: rep[k] for k in ("blocks", "blocks_exact_share", "blocks_near_share",
                                                    "llama_cpp_exact_share")}}
    res["llama_cpp"] = {} if os.path.exists(theirs) else timed([os.path.join(BIN, "llama-quantize"), stand, theirs,
                                                                  "Q4_0", "2"], theirs + ".log")
    blocks = same = 0
    with GGUFSource(stand) as a, GGUFSource(theirs) as b:
        for n in sorted(q40):
            x, y = a.load(n).reshape(-1, 32), b.load(n).reshape(-1, 32)
            blocks += x.shape[0]
            same += int((x == y).all(1).sum())
    res["llama_cpp"]["blocks_exact_share"] = same / blocks
    save("qat", res)
    res["kld_vs_standin"] = kld([ours, theirs], stand)
    save("qat", res)
    return res


def part_roundtrip() -> dict:
    import torch
    from quantkit.models.gguf import GGUFSource
    hf, back = w("f32-hf"), w("f32-hf-f32.gguf")
    res: dict = {"machine": machine()}
    for p in (hf, back):
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.remove(p)
    res["to_hf"] = quantkit(["quantize", w("f32.gguf"), "--format", "hf:f32", "-o", hf], hf + ".log")
    res["to_gguf"] = quantkit(["quantize", hf, "--format", "gguf:f32", "-o", back], back + ".log")
    n = same = 0
    with GGUFSource(w("f32.gguf")) as a, GGUFSource(back) as b:
        assert [t.name for t in a.tensors()] == [t.name for t in b.tensors()]
        for t in a.tensors():
            n += 1
            same += bool(torch.equal(a.load(t.name), b.load(t.name)))
    res["tensors"], res["identical"] = n, same
    import llama_cpp
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(hf)
    llm = llama_cpp.Llama(model_path=w("f32.gguf"), vocab_only=True, verbose=False)
    ids = {}
    for label, path in (("wikitext-2 test", TEST), ("sst-2 dev", sst2_text())):
        text = open(path, encoding="utf-8").read()
        for special in (True, False):
            a = llm.tokenize(text.encode(), add_bos=True, special=special)
            b = tok(text, split_special_tokens=not special)["input_ids"]
            ids[f"{label}, special={special}"] = {"tokens": len(a), "equal": a == b}
    res["tokenizer_ids"] = ids
    save("roundtrip", res)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", required=True, choices=["prepare", "exact", "solved", "codes", "iq4", "count",
                                                      "llmc", "qat", "roundtrip"])
    ap.add_argument("--chunks", type=int, default=16, help="calibration chunks of 512 tokens")
    ap.add_argument("--ck-method", default="rtn", choices=["rtn", "gptq"],
                    help="prepare: how the GPTQ-format checkpoints are made (rtn: seconds; gptq: an hour at load 15)")
    a = ap.parse_args()
    os.makedirs(WORK, exist_ok=True)
    if a.part == "prepare":
        save("prepare", {**prepare(a.chunks, a.ck_method), "machine": machine(), "chunks": a.chunks,
                         "checkpoint_method": a.ck_method})
    elif a.part == "exact":
        part_exact()
    elif a.part == "solved":
        part_solved(a.chunks)
    elif a.part == "codes":
        part_codes(a.chunks)
    elif a.part == "iq4":
        part_iq4(a.chunks)
    elif a.part == "count":
        part_count()
    elif a.part == "llmc":
        part_llmc()
    elif a.part == "qat":
        part_qat()
    else:
        part_roundtrip()


if __name__ == "__main__":
    main()
