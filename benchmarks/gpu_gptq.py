"""GPU formats: quantkit's RTN and GPTQ (compressed-tensors pack-quantized, symmetric, group 128)
against llm-compressor, the tool that writes this format, side by side in one run on the
bundled Gemma-3-270M.

  reference      llama.cpp's F32 dequantization of the bundled file (as benchmarks/gguf_gptq.py)
  quantkit       quantkit quantize F32.gguf --method rtn|gptq --format compressed-tensors
                 --bits B --group-size 128 [--act-order]  (llama.cpp's tokenizer for calibration)
  llm-compressor oneshot(QuantizationModifier | GPTQModifier, W{B}A16 g128, its defaults:
                 damp 0.01, block 128, actorder static) on a Hugging Face directory holding the
                 same F32 weights, fed the same calibration token ids (benchmarks/llmc_run.py,
                 its own venv: ~/.cache/quantkit/venv-llmc, torch pinned to 2.13.0)

Calibration: the same N x 512 tokens of wikitext-2 valid for both. Every checkpoint is scored
by quantkit eval through transformers + compressed-tensors (the torch runtime) against the F32
reference on wikitext-2 test and on SST-2 dev sentences (out of the calibration's domain).
Times, CPU seconds and peak RSS of each quantizer are measured in child processes.

    python benchmarks/gpu_gptq.py [--bits 4,3] [--chunks 64] [--threads 2] [--methods ...]
    (methods: quantkit-rtn, quantkit-gptq, llmc-rtn, llmc-gptq; quantkit-gptq takes suffixes:
     -s0.1 adds --shrink 0.1, -ns adds --no-scale-search, e.g. quantkit-gptq-s0.1-ns)
Results: benchmarks/results/gpu_gptq.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from gguf_gptq import DATA, sst2_text, timed  # noqa: E402

CACHE = os.environ.get("QUANTKIT_CACHE", os.path.expanduser("~/.cache/quantkit"))
WORK = os.path.join(CACHE, "bench-gpu")
LLMC_PY = os.path.join(CACHE, "venv-llmc", "bin", "python")


def prepare(f32: str, chunks: int) -> tuple[str, str]:
    """The F32 weights as a Hugging Face directory (for llm-compressor) and the calibration ids."""
    import torch

    from quantkit.runtimes.torch import model_from_gguf
    from quantkit.quant.calib import calibration_ids
    from quantkit.quant.checkpoint import gguf_tokenizer_files
    from quantkit.quant.streaming import LlamaCppTokenizer
    hf_dir = os.path.join(WORK, "gemma-3-270m-f32-hf")
    if not os.path.exists(os.path.join(hf_dir, "model.safetensors")):
        m = model_from_gguf(f32)
        m.config.architectures = [type(m).__name__]
        m.save_pretrained(hf_dir)
        gguf_tokenizer_files(f32, hf_dir)
    ids_path = os.path.join(WORK, f"calib-{chunks}x512.pt")
    if not os.path.exists(ids_path):
        ids = calibration_ids(LlamaCppTokenizer(f32), os.path.join(DATA, "wikitext-2", "valid.txt"), chunks, 512)
        torch.save(ids, ids_path)
    return hf_dir, ids_path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--chunks", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-chunks", type=int, default=8)
    ap.add_argument("--methods", default="quantkit-rtn,quantkit-gptq,llmc-rtn,llmc-gptq")
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--eval-only", action="store_true", help="score the checkpoints already made; make none")
    args = ap.parse_args()
    os.makedirs(WORK, exist_ok=True)
    if any(m.startswith("llmc") for m in args.methods.split(",")) and not os.path.exists(LLMC_PY):
        raise SystemExit(f"{LLMC_PY} missing: python3.11 -m venv {os.path.dirname(os.path.dirname(LLMC_PY))} && "
                         f"{os.path.dirname(LLMC_PY)}/pip install torch==2.13.0 llmcompressor==0.14.0.1")
    res_path = os.path.join(HERE, "results", "gpu_gptq.json")
    results = json.load(open(res_path)) if os.path.exists(res_path) else {}
    runs = results.setdefault("runs", {})

    def save():
        os.makedirs(os.path.dirname(res_path), exist_ok=True)
        with open(res_path + ".tmp", "w") as f:
            json.dump(results, f, indent=2)
        os.replace(res_path + ".tmp", res_path)

    from quantkit.eval.lm import f32_reference
    from quantkit.models.bundled import bundled_path
    f32 = f32_reference(bundled_path(), args.threads, show_progress=False)
    hf_dir, ids_path = prepare(f32, args.chunks)
    valid = os.path.join(DATA, "wikitext-2", "valid.txt")
    files = {}
    for bits in (int(b) for b in args.bits.split(",")):
        for method in args.methods.split(","):
            key = f"w{bits}g128/{method}"
            out = os.path.join(WORK, f"w{bits}g128-{method}-{args.chunks}")
            if args.eval_only and not os.path.exists(out):
                continue
            files[key] = out
            if os.path.exists(out) and key in runs:
                continue
            shutil.rmtree(out, ignore_errors=True)
            tool, how, *extra = method.split("-")
            if tool == "quantkit":
                cmd = [sys.executable, "-m", "quantkit.cli", "quantize", f32, "--method", how,
                       "--format", "compressed-tensors", "--bits", str(bits), "--group-size", "128",
                       "--threads", str(args.threads), "-o", out]
                for opt in extra:                        # -s0.1: --shrink 0.1; -ns: --no-scale-search
                    cmd += ["--no-scale-search"] if opt == "ns" else ["--shrink", opt[1:]]
                if how == "gptq":
                    cmd += ["--act-order", "--calib", valid, "--nsamples", str(args.chunks), "--seqlen", "512"]
            else:
                cmd = [LLMC_PY, os.path.join(HERE, "llmc_run.py"), "--model", hf_dir, "--ids", ids_path,
                       "--method", how, "--bits", str(bits), "--threads", str(args.threads), "-o", out]
            runs[key] = timed(cmd, os.path.join(WORK, f"w{bits}g128-{method}.log"))
            if tool == "llmc":       # llm-compressor saves no tokenizer: the eval reads the vocabulary
                for name in ("tokenizer.json", "tokenizer_config.json"):
                    shutil.copyfile(os.path.join(hf_dir, name), os.path.join(out, name))
            runs[key]["bytes"] = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out)
                                     if n.endswith(".safetensors"))
            print(key, runs[key], flush=True)
            save()
    if args.skip_eval:
        return
    from quantkit import api
    ev = results.setdefault("eval", {})
    test = os.path.join(DATA, "wikitext-2", "test.txt")
    for label, text in (("wikitext-2 test", test), ("sst-2 dev", sst2_text())):
        r = api.evaluate([f32, *files.values()], ref=f32, text=text, n_chunks=args.eval_chunks, speed=False,
                         n_threads=args.threads, show_progress=False)
        names = {os.path.realpath(p): k for k, p in files.items()}
        rows = ev.setdefault(label, {})
        for row in r.rows:
            key = names.get(os.path.realpath(row.get("path", "")), "f32")
            rows[key] = {k: row.get(k) for k in ("ppl", "kld_mean", "kld_median", "kld_p99", "top1_agreement",
                                                 "bits_per_weight_linear")}
        print(label, json.dumps(rows, indent=1), flush=True)
        save()


if __name__ == "__main__":
    main()
