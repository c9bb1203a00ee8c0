"""GGUF -> Hugging Face for every architecture quantkit reads, against transformers' own GGUF
loader (`from_pretrained(gguf_file=...)`), side by side in one run.

  tiny     per architecture, a tiny random model (hidden 256, 2 layers, the family's tokenizer
           kind; tests/helpers/tiny_models.build_arch_model) -> F32 GGUF (quantkit), then
           quantkit's `--format hf:f32` export: wall and CPU seconds, logits against the original
           Hugging Face model and against llama.cpp's of the GGUF (max |diff| / max |logit|, 64
           tokens of wikitext-2 test and of SST-2 dev), the GGUF -> HF -> GGUF round trip
           (tensors that differ), the exported tokenizer's ids against llama.cpp's (wikitext-2
           test page and SST-2 dev sentences, special tokens parsed and not). The peer,
           transformers' GGUF loader, on the same GGUF: load seconds, logits against llama.cpp,
           tokenizer ids against llama.cpp, or the one-line reason it cannot load the file.
  bundled  the bundled Gemma-3-270M: Q4_K_M -> hf:bf16 export time; the F32 reference GGUF
           (llama.cpp's dequantization of it) -> hf:f32: logits against llama.cpp's, round trip
           tensors, tokenizer ids; the same for transformers' GGUF loader.

    python benchmarks/hf_export_arch.py [--part tiny|bundled|all] [--kinds llama3,qwen3]

transformers' GGUF loader needs `accelerate`, which quantkit does not: it is looked for in
$HFX_PEER_SITE (default ~/.cache/quantkit/hfx-peer), installed there once with
`pip install --no-deps --target ~/.cache/quantkit/hfx-peer accelerate`, so the project's own
environment stays as it is.
Results: benchmarks/results/hf_export_arch.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent / "src"))

PEER_SITE = os.environ.get("HFX_PEER_SITE", os.path.expanduser("~/.cache/quantkit/hfx-peer"))
if os.path.isdir(PEER_SITE):
    sys.path.append(PEER_SITE)

DATA = HERE.parent / "src" / "quantkit" / "data"
RESULTS = HERE / "results" / "hf_export_arch.json"
F32_BUNDLED = Path(os.environ.get("QUANTKIT_CACHE", os.path.expanduser("~/.cache/quantkit"))) / "bench-budget" / "f32.gguf"
SCRATCH = os.path.join(os.path.dirname(os.path.dirname(F32_BUNDLED)), "bench-hfexport")   # ~2.3 GB while it runs
KINDS = ["llama3", "mistral", "qwen2", "qwen3", "qwen3moe", "gemma2", "gemma3", "phi2", "phi3", "mixtral",
         "glm4", "olmo2", "granite", "smollm3"]


def machine() -> dict:
    flags = open("/proc/cpuinfo").read()
    model = [ln.split(":", 1)[1].strip() for ln in flags.splitlines() if ln.startswith("model name")][0]
    return {"cpu": model, "cores": os.cpu_count(),
            "flags": [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16") if f" {f}" in flags],
            "load_before": os.getloadavg()[0]}


def texts() -> dict[str, str]:
    wiki = (DATA / "wikitext-2" / "test.txt").read_text(encoding="utf-8")[:6000]
    with open(DATA / "sst2" / "dev.tsv", encoding="utf-8") as f:
        sst = [ln.split("\t", 1)[1].strip() for ln in f.read().splitlines()[1:] if "\t" in ln][:60]
    return {"wikitext2": wiki, "sst2": " ".join(sst)}


def timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, round(time.perf_counter() - t0, 2), round(time.process_time() - c0, 2)


def llama_logits(gguf: str, ids: list[int]) -> np.ndarray:
    import llama_cpp
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=256, n_batch=256, logits_all=True, verbose=False, n_threads=1,
                          type_k=0, type_v=0)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def llama_ids(gguf: str, text: str, special: bool) -> list[int]:
    import llama_cpp
    llm = llama_cpp.Llama(model_path=gguf, vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode(), add_bos=True, special=special)
    finally:
        llm.close()


def hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def agreement(model, tok, gguf: str, txt: dict[str, str], orig=None) -> dict:
    """Logits against llama.cpp (and the original model) on 64 tokens of each text, and the
    tokenizer's ids against llama.cpp's on each whole text, special tokens parsed and not."""
    out: dict = {}
    for name, text in txt.items():
        ids = llama_ids(gguf, text, True)[:64]
        got = hf_logits(model, ids)
        out[f"logits_vs_llama_cpp_{name}"] = rel(got, llama_logits(gguf, ids))
        if orig is not None:
            out[f"logits_vs_original_{name}"] = rel(got, hf_logits(orig, ids))
        for special in (True, False):
            want = llama_ids(gguf, text, special)
            have = tok(text, split_special_tokens=not special)["input_ids"]
            out[f"tokens_equal_{name}_{'special' if special else 'plain'}"] = have == want
    return out


def round_trip(hf_dir: str, gguf: str, work: str) -> int:
    """Tensors that differ after HF -> GGUF F32 (quantkit), or -1 if the tensor lists differ."""
    import torch
    from quantkit import api
    from quantkit.models.gguf import GGUFSource
    back = os.path.join(work, "back.gguf")
    api.quantize(hf_dir, back, format="gguf:f32", show_progress=False)
    try:
        with GGUFSource(gguf) as a, GGUFSource(back) as b:
            if [t.name for t in a.tensors()] != [t.name for t in b.tensors()]:
                return -1
            return sum(not torch.equal(a.load(t.name), b.load(t.name)) for t in a.tensors())
    finally:
        os.remove(back)


def ours(gguf: str, work: str, txt: dict, orig_dir: str | None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from quantkit import api
    out = os.path.join(work, "hf")
    _, wall, cpu = timed(lambda: api.quantize(gguf, out, format="hf:f32", show_progress=False))
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    orig = AutoModelForCausalLM.from_pretrained(orig_dir, dtype=torch.float32,
                                                attn_implementation="eager").eval() if orig_dir else None
    row = {"export_wall_s": wall, "export_cpu_s": cpu, "load": os.getloadavg()[0],
           **agreement(model, AutoTokenizer.from_pretrained(out), gguf, txt, orig)}
    del model, orig
    row["round_trip_differing_tensors"] = round_trip(out, gguf, work)
    shutil.rmtree(out)
    return row


def peer(gguf: str, txt: dict) -> dict:
    """transformers' GGUF loader on the same file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, name = os.path.dirname(gguf), os.path.basename(gguf)
    try:
        (model, tok), wall, cpu = timed(lambda: (
            AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32,
                                                 attn_implementation="eager").eval(),
            AutoTokenizer.from_pretrained(d, gguf_file=name)))
    except Exception as e:       # the peer's refusal, recorded as it says it
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    try:
        return {"load_wall_s": wall, "load_cpu_s": cpu, **agreement(model, tok, gguf, txt)}
    except Exception as e:
        return {"load_wall_s": wall, "load_cpu_s": cpu, "error": f"{type(e).__name__}: {str(e)[:200]}"}


def tiny(kinds: list[str]) -> dict:
    from helpers.tiny_models import build_arch_model
    from quantkit import api
    txt = texts()
    res = {}
    with tempfile.TemporaryDirectory(prefix="hfx-bench-") as root:
        for kind in kinds:
            src = build_arch_model(kind, Path(root))
            gguf = os.path.join(root, f"{kind}.gguf")
            api.quantize(str(src), gguf, format="gguf:f32", show_progress=False)
            work = os.path.join(root, f"{kind}-work")
            os.makedirs(work)
            res[kind] = {"quantkit": ours(gguf, work, txt, str(src)), "transformers_gguf": peer(gguf, txt)}
            print(kind, json.dumps(res[kind]), flush=True)
    return res


def bundled() -> dict:
    from quantkit import api
    from quantkit.models.bundled import bundled_path
    txt = texts()
    res: dict = {}
    os.makedirs(SCRATCH, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hfx-bundled-", dir=SCRATCH) as work:
        out = os.path.join(work, "bf16")
        _, wall, cpu = timed(lambda: api.quantize(bundled_path(), out, format="hf:bf16", show_progress=False))
        res["q4_k_m_to_bf16"] = {"export_wall_s": wall, "export_cpu_s": cpu, "load": os.getloadavg()[0],
                                 "bytes": sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))}
        shutil.rmtree(out)
        print("bundled bf16", res["q4_k_m_to_bf16"], flush=True)
        res["f32"] = {"quantkit": ours(str(F32_BUNDLED), work, txt, None),
                      "transformers_gguf": peer(str(F32_BUNDLED), txt)}
        print("bundled f32", json.dumps(res["f32"]), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["tiny", "bundled", "all"], default="all")
    ap.add_argument("--kinds", default=",".join(KINDS))
    a = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    res = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    res["machine"] = machine()
    res["command"] = "python " + " ".join(sys.argv)
    if a.part in ("tiny", "all"):
        res["tiny"] = tiny(a.kinds.split(","))
    if a.part in ("bundled", "all"):
        res["bundled"] = bundled()
    res["load_after"] = os.getloadavg()[0]
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
