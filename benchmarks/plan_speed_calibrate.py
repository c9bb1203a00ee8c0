"""Calibrate and check the planner's CPU decode-speed model against llama.cpp on this machine.

Model (quantkit.plan.speed.CpuDecodeModel): seconds per decoded token =
    o_token + o_layer x n_layer                                  (graph, per-op and logits overhead)
  + sum over weight tensors of n_weights x (bytes_per_weight / BW + c[type])
  + KV bytes read / BW
BW is the effective read bandwidth of one core; c[type] is what each GGUF type's dot product
costs per weight beyond reading its bytes (dequantization and arithmetic); o_token, o_layer,
BW and c are fitted by non-negative least squares on CALIBRATION models only: random llama models built
here from configs (transformers, seed 0), written as F32 GGUF by quantkit's HF -> GGUF export,
then quantized *pure* (every tensor in the one type) by llama.cpp's own quantizer, at two shapes
(4 x 1536 wide and 12 x 512 wide with a 96k vocabulary, so that per-layer, per-weight and
head costs separate). The CHECK model is the bundled Gemma-3-270M, in llama.cpp's normal mixes
(Q4_K_M keeps a Q8_0 embedding, Q5_0 where rows are not a multiple of 256, ...): none of its
numbers enter the fit.

Each case is a fresh process, one llama.cpp thread (as benchmarks/plan_vs_measured.py): load,
32-token prompt, then 4 rounds of 16 decoded tokens. The per-token time is the median round's
process CPU time: with one thread that is the wall-clock time of an idle core, and it stays so
when other jobs share the machine's 2 cores (load average up to 8 while this was written), where
wall-clock time measures the scheduler instead. Wall-clock times are kept in the JSON too. Writes src/quantkit/plan/cpu_speed.yaml
(the fitted constants, with their source) and benchmarks/results/plan_speed.json.

    PYTHONPATH=src .venv/bin/python benchmarks/plan_speed_calibrate.py [--measure-only] [--fit-only]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "src"))

THREADS = 1
N_PROMPT = 32
ROUNDS = 4
PER_ROUND = 16
N_CTX = 512

# file type -> the single tensor type of the pure calibration file
CALIB_TYPES = {"f32": "f32", "f16": "f16", "bf16": "bf16", "q8_0": "q8_0", "q5_1": "q5_1", "q5_0": "q5_0",
               "q4_1": "q4_1", "q4_0": "q4_0", "q6_k": "q6_k", "q5_k_m": "q5_k", "q4_k_m": "q4_k",
               "q3_k_m": "q3_k", "q2_k": "q2_k"}
CHECK_TYPES = list(CALIB_TYPES)
CALIB_MODELS = {
    # name: (n_layer, hidden, ff, heads, kv heads, vocab)
    "llama-4x1536": (4, 1536, 4096, 12, 4, 16000),
    "llama-12x512": (12, 512, 1536, 8, 4, 96000),
    # near-weightless (F32 only): their time is the per-token and per-layer overhead
    "llama-2x64": (2, 64, 128, 2, 2, 512),
    "llama-24x64": (24, 64, 128, 2, 2, 512),
}
OVERHEAD_MODELS = ("llama-2x64", "llama-24x64")
CACHE = os.path.join(os.environ.get("QUANTKIT_CACHE", os.path.expanduser("~/.cache/quantkit")), "plan-speed")
OUT_JSON = os.path.join(HERE, "results", "plan_speed.json")
OUT_YAML = os.path.join(REPO, "src", "quantkit", "plan", "cpu_speed.yaml")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


# ---------------------------------------------------------------- child: one timed run

def child(path: str) -> None:
    import llama_cpp
    llm = llama_cpp.Llama(path, n_ctx=N_CTX, n_threads=THREADS, n_threads_batch=THREADS, verbose=False)
    n_vocab = llm.n_vocab()
    llm.eval([(7 * i + 3) % n_vocab for i in range(N_PROMPT)])
    tok = int(llm.scores[llm.n_tokens - 1].argmax())
    rounds, walls = [], []
    for _ in range(ROUNDS):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(PER_ROUND):
            llm.eval([tok])
            tok = int(llm.scores[llm.n_tokens - 1].argmax())
        rounds.append((time.process_time() - c0) / PER_ROUND)
        walls.append((time.perf_counter() - t0) / PER_ROUND)
    print("RESULT " + json.dumps({"s_per_token": sorted(rounds)[len(rounds) // 2], "cpu_rounds": rounds,
                                  "wall_rounds": walls, "s_per_token_wall_best": min(walls),
                                  "n_past_mid": N_PROMPT + ROUNDS * PER_ROUND // 2}), flush=True)


def measure(path: str) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", path], capture_output=True, text=True, timeout=900)
    res = next((json.loads(l[7:]) for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
    if res is None:
        raise RuntimeError(f"child failed on {path}: {p.stderr[-1500:]}")
    res["load1"] = os.getloadavg()[0]
    return res


# ---------------------------------------------------------------- files

def llama_quantize(src: str, dst: str, ftype: str, pure: bool) -> None:
    import llama_cpp
    from gguf import LlamaFileType
    if os.path.exists(dst):
        return
    params = llama_cpp.llama_model_quantize_default_params()
    name = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16"}.get(ftype, "MOSTLY_" + ftype.upper())
    params.ftype = int(getattr(LlamaFileType, name))
    params.allow_requantize = True
    params.pure = pure
    params.nthread = 2
    tmp = dst + ".partial"
    rc = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {ftype} failed: {rc}")
    os.replace(tmp, dst)


def _tokenizer(d: str) -> int:
    """A small byte-level BPE (Llama-3 pre-tokenizer) trained on the shipped WikiText excerpt."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    text = open(os.path.join(REPO, "src", "quantkit", "data", "wikitext2-test-excerpt.txt"), encoding="utf-8").read()
    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text.splitlines(), trainers.BpeTrainer(
        vocab_size=512 - len(specials), show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(specials)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                            eos_token="<|end_of_text|>").save_pretrained(d)
    return tok.get_vocab_size()


def calib_f32(name: str) -> str:
    """The calibration model as an F32 GGUF (HF config -> random weights -> quantkit export)."""
    out = os.path.join(CACHE, f"{name}-f32.gguf")
    if os.path.exists(out):
        return out
    import shutil

    import torch
    import transformers as tf

    from quantkit.api import quantize
    n_layer, h, ff, nh, nkv, vocab = CALIB_MODELS[name]
    d = os.path.join(CACHE, name + "-hf")
    os.makedirs(d, exist_ok=True)
    n = _tokenizer(d)
    # the embedding is padded past the tokenizer (as Qwen2's 151936 rows for 151665 tokens)
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=ff, num_hidden_layers=n_layer,
                         num_attention_heads=nh, num_key_value_heads=nkv, bos_token_id=n - 2, eos_token_id=n - 1,
                         tie_word_embeddings=True, max_position_embeddings=4096)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).save_pretrained(d)
    quantize(d, out, format="gguf:f32", show_progress=False)
    shutil.rmtree(d)
    return out


def files() -> dict[tuple[str, str], str]:
    from quantkit.models.bundled import bundled_path
    os.makedirs(CACHE, exist_ok=True)
    out = {}
    for name in CALIB_MODELS:
        f32 = calib_f32(name)
        for ft in (["f32"] if name in OVERHEAD_MODELS else CALIB_TYPES):
            dst = f32 if ft == "f32" else os.path.join(CACHE, f"{name}-{ft}-pure.gguf")
            llama_quantize(f32, dst, ft, pure=True)
            out[(name, ft)] = dst
    src = bundled_path()
    for ft in CHECK_TYPES:
        dst = src if ft == "q4_k_m" else os.path.join(CACHE, f"gemma-3-270m-{ft}.gguf")
        llama_quantize(src, dst, ft, pure=False)
        out[("gemma-3-270m", ft)] = dst
    return out


def stream_bandwidth() -> float:
    """Read bandwidth of one core (bytes/s, CPU time): numpy int64 sum of 512 MiB, best of 5."""
    import numpy as np
    a = np.ones(64 * 2**20, dtype=np.int64)
    best = 0.0
    for _ in range(5):
        t = time.process_time()
        a.sum()
        best = max(best, a.nbytes / (time.process_time() - t))
    return best


# ---------------------------------------------------------------- fit

def fit(cases: list[dict]) -> dict:
    """Non-negative least squares on the calibration cases (relative error: rows weighted by
    1/time). Unknowns: o_token, o_layer, 1/BW and c[kind], all >= 0, so that every constant
    keeps its physical meaning (a cost cannot be negative; a numpy stream measured 12-15 GB/s
    on this core, below what ggml's F32 dot product reaches, so BW is fitted too)."""
    import numpy as np
    from scipy.optimize import nnls
    keys = sorted({k for c in cases for k in c["terms"]["weights_by_kind"]})
    cols = ["o_token", "o_layer", "inv_bandwidth"] + keys
    A = np.array([[1.0, c["terms"]["n_layer"], c["terms"]["bytes"]]
                  + [c["terms"]["weights_by_kind"].get(k, 0) for k in keys] for c in cases])
    y = np.array([c["s_per_token"] for c in cases])
    scale = A.max(axis=0)                      # columns to unit size for a well-conditioned solve
    sol, _ = nnls(A / scale / y[:, None], np.ones(len(y)))
    sol = sol / scale
    return dict(zip(cols, (float(v) for v in sol)))


def terms(path: str, n_past: int) -> dict:
    from quantkit.plan import speed
    from quantkit.plan.model import load
    m = load(path)
    return speed.cpu_decode_terms(m, m.tensors, n_past)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--fit-only", action="store_true", help="refit from benchmarks/results/plan_speed.json")
    ap.add_argument("--resume", action="store_true", help="measure only the cases missing from the JSON")
    a = ap.parse_args()
    if a.child:
        child(a.child)
        return
    if a.fit_only:
        res = json.load(open(OUT_JSON))
    else:
        paths = files()
        old = json.load(open(OUT_JSON)) if a.resume and os.path.exists(OUT_JSON) else None
        res = {"machine": {"cpu": open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": \t"),
                           "cores": os.cpu_count(), "threads": THREADS,
                           "llama_cpp": __import__("llama_cpp").__version__},
               "uptime_before": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
               "cases": []}
        res["machine"]["stream_read_bandwidth"] = stream_bandwidth()
        if old:
            res["cases"] = [c for c in old["cases"] if (c["model"], c["file_type"]) in paths]
        done = {(c["model"], c["file_type"]) for c in res["cases"]}
        for (model, ft), path in paths.items():
            if (model, ft) in done:
                continue
            r = measure(path)
            c = {"model": model, "file_type": ft, "role": "check" if model.startswith("gemma") else "fit",
                 "path": os.path.basename(path), **r}
            print(json.dumps({k: v for k, v in c.items() if k != "rounds"}), flush=True)
            res["cases"].append(c)
        res["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        res["machine"]["stream_read_bandwidth"] = max(res["machine"]["stream_read_bandwidth"], stream_bandwidth())
        for c in res["cases"]:
            c["terms"] = terms(paths[(c["model"], c["file_type"])], c["n_past_mid"])
    consts = fit([c for c in res["cases"] if c["role"] == "fit"])
    res["fit"] = consts
    write_yaml(res, consts, 1.0 / consts["inv_bandwidth"])
    from quantkit.plan import speed
    speed.cpu_model.cache_clear()
    cm = speed.cpu_model()
    for c in res["cases"]:
        c["planned_s_per_token"] = cm.seconds_from_terms(c["terms"])
        c["error"] = c["planned_s_per_token"] and (1 / c["planned_s_per_token"] - 1 / c["s_per_token"]) * c["s_per_token"]
        print(f"{c['role']:5} {c['model']:14} {c['file_type']:7} measured {1 / c['s_per_token']:7.1f} t/s  "
              f"planned {1 / c['planned_s_per_token']:7.1f} t/s  {100 * c['error']:+6.1f}%")
    os.makedirs(os.path.dirname(OUT_JSON), exist_ok=True)
    with open(OUT_JSON, "w") as f:
        json.dump(res, f, indent=1)


def write_yaml(res: dict, consts: dict, bw: float) -> None:
    lines = [
        "# CPU decode-speed model of quantkit.plan.speed (CpuDecodeModel), measured on one machine.",
        "# seconds/token = o_token + o_layer * n_layer + sum_tensors n * (bytes_per_weight / bandwidth + c[kind])",
        "#                 + KV bytes read / bandwidth",
        "# kind = the tensor's GGUF type, '+repack' when ggml-cpu repacks it (q4_0/q4_k/iq4_nl on AVX2).",
        "# Written by benchmarks/plan_speed_calibrate.py; do not edit by hand.",
        f"machine: {json.dumps(res['machine']['cpu'] + ', AVX2, ' + str(res['machine']['threads']) + ' llama.cpp thread')}",
        f"llama_cpp: {json.dumps(res['machine']['llama_cpp'])}",
        f"threads: {res['machine']['threads']}",
        f"bandwidth: {bw:.6g}        # bytes/s, fitted effective read bandwidth of one core "
        f"(numpy int64 sum of 512 MiB: {res['machine']['stream_read_bandwidth']:.3g})",
        f"o_token: {consts['o_token']:.6g}       # s",
        f"o_layer: {consts['o_layer']:.6g}       # s per layer",
        "c_per_weight:                 # s per weight beyond its bytes",
    ]
    for k, v in sorted(consts.items()):
        if k not in ("o_token", "o_layer", "inv_bandwidth"):
            lines.append(f"  {json.dumps(k)}: {v:.6g}")
    lines.append("source: " + json.dumps(
        "benchmarks/plan_speed_calibrate.py: least squares over " + ", ".join(CALIB_MODELS)
        + " (random llama, quantkit HF->GGUF export, llama.cpp pure quantization), one thread; "
        + res.get("uptime_before", "")))
    with open(OUT_YAML, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
