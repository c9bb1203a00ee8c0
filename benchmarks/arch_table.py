"""Every dense architecture through quantkit: convert, RTN K-quant mix, GPTQ GGUF, plan, with the
measured agreement, and conversion + quantization speed side by side with llama.cpp's own
convert_hf_to_gguf.py + llama-quantize on the same input.

    nice .venv/bin/python benchmarks/arch_table.py [--kinds llama3,qwen3,...] [--layers 4] [--repeats 3]

Per architecture a tiny random Hugging Face model (hidden 256, --layers layers, the family's
tokenizer kind trained offline; tests/helpers/tiny_models.build_arch_model) is built, then:
- convert: HF -> F32 GGUF; logit agreement = max |llama.cpp - transformers| / max |logit| on a
  wikitext-2 test sentence, and whether every position's argmax agrees;
- RTN mix: Q4_K_M; KL divergence to the F32 GGUF's next-token distribution in llama.cpp on
  wikitext-2 test (in domain) and SST-2 dev sentences (out of domain);
- GPTQ GGUF: GPTQ-compensated Q4_0 (8 x 128 tokens of wikitext-2 valid) vs RTN Q4_0, the same KL
  (mixtures of experts: also the calibration tokens each expert was routed, and how many experts
  got too few and were safeguarded; GPTQ's CPU seconds and the load average beside its wall time);
- plan: the planner's tensor list from config.json alone against the tensors converted.
Times are wall seconds in this process, per layer = time / layers. The speed comparison runs
each side as its own process (start-up included on both sides), --repeats times, median.
For the SentencePiece families the F32 files of both converters are also compared: metadata
(every key and value) and tensors (names, shapes, bytes).
Writes benchmarks/results/arch_table.json and prints Markdown tables for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent / "src"))
os.environ.setdefault("QUANTKIT_QUIET", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from quantkit import api  # noqa: E402
from quantkit.util.data import DATA_DIR  # noqa: E402
from helpers.tiny_models import build_arch_model, wikitext_lines  # noqa: E402

LLAMA_CPP = Path("/root/.cache/quantkit/llama-tools/src/llama_cpp_python-0.3.36/vendor/llama.cpp")
LLAMA_QUANTIZE = Path("/root/.cache/quantkit/llama-tools/bin/llama-quantize")
KINDS = ["llama3", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi2", "phi3", "glm4", "olmo2", "granite",
         "smollm3"]
SPM = ("mistral", "gemma2", "gemma3", "phi3")      # llama.cpp's converter knows their tokenizers
MOE = ("qwen3moe", "mixtral")                       # mixtures of experts: GPTQ on routed calibration (quant.moe)


def _llama(path: Path):
    import llama_cpp
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, logits_all=True, verbose=False,
                           n_threads=1, seed=0, type_k=0, type_v=0)


def _scores(path: Path, chunks: list[list[int]]) -> np.ndarray:
    llm = _llama(path)
    try:
        out = []
        for c in chunks:
            llm.reset()
            llm.eval(c)
            out.append(np.asarray(llm.scores[: len(c)], dtype=np.float32))
        return np.concatenate(out)
    finally:
        llm.close()


def _kl(ref: np.ndarray, x: np.ndarray) -> float:
    def logp(a):
        a = a - a.max(-1, keepdims=True)
        return a - np.log(np.exp(a).sum(-1, keepdims=True))
    p, q = logp(ref), logp(x)
    return float((np.exp(p) * (p - q)).sum(-1).mean())


def _texts(tok) -> dict[str, list[list[int]]]:
    wt = " ".join(wikitext_lines("test.txt", 400))
    sst = [line.split("\t")[0] for line in (Path(DATA_DIR) / "sst2" / "dev.tsv").read_text().splitlines()[1:200]]
    out = {}
    for name, text in (("wikitext", wt), ("sst2", " ".join(sst))):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        out[name] = [ids[i * 255:(i + 1) * 255] for i in range(3)]
    return out


def _timed(fn):
    t0 = time.perf_counter()
    r = fn()
    return r, time.perf_counter() - t0


def _row(kind: str, root: Path, layers: int, calib: str, shrink: float | None = None) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from quantkit.models.gguf import GGUFSource
    from quantkit.plan.model import build_tensors, from_hf_config

    d = build_arch_model(kind, root, layers=layers)
    tok = AutoTokenizer.from_pretrained(str(d))
    texts = _texts(tok)
    f32 = root / f"{kind}-f32.gguf"
    _, t_conv = _timed(lambda: api.quantize(str(d), f32, format="gguf:f32", show_progress=False))
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, attn_implementation="eager").eval()
    ids = tok("The tower is 324 metres tall, about the same height as an 81-storey building.")["input_ids"]
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    got = _scores(f32, [ids])
    rel = float(np.abs(got - ref).max() / np.abs(ref).max())
    argmax = bool((got.argmax(-1) == ref.argmax(-1)).all())
    ref_scores = {k: _scores(f32, v) for k, v in texts.items()}

    def kls(path):
        return {k: round(_kl(ref_scores[k], _scores(path, v)), 5) for k, v in texts.items()}

    kq, rtn, gq = root / f"{kind}-q4km.gguf", root / f"{kind}-q4_0.gguf", root / f"{kind}-gptq.gguf"
    _, t_kq = _timed(lambda: api.quantize(str(d), kq, format="gguf:q4_k_m", show_progress=False))
    api.quantize(str(d), rtn, format="gguf:q4_0", show_progress=False)
    c0, load0 = time.process_time(), os.getloadavg()[0]
    res, t_gq = _timed(lambda: api.quantize(str(d), gq, format="gguf:q4_0", method="gptq", calib=calib,
                                            nsamples=8, seqlen=128, shrink=shrink, show_progress=False))
    gptq_cpu, load = time.process_time() - c0, (load0 + os.getloadavg()[0]) / 2
    experts = (res.report or {}).get("experts") or None
    cfg = json.loads((d / "config.json").read_text())
    planned, t_plan = _timed(lambda: {t.name: tuple(t.shape) for t in build_tensors(from_hf_config(cfg, kind), "f32")})
    with GGUFSource(f32) as s:
        written = {t.name: tuple(t.shape) for t in s.tensors() if t.name != "rope_freqs.weight"}
    return {
        "kind": kind, "layers": layers, "dir": str(d),
        "convert_s": t_conv, "logit_rel_err": rel, "argmax_agrees": argmax,
        "q4_k_m_s": t_kq, "q4_k_m_kl": kls(kq),
        "gptq_q4_0_s": t_gq, "gptq_q4_0_kl": kls(gq) if gq else None, "rtn_q4_0_kl": kls(rtn),
        "plan_s": t_plan, "plan_tensors_match": planned == written,
        "gptq_shrink": shrink, "gptq_q4_0_cpu_s": gptq_cpu, "gptq_load": round(load, 2),
        **({"experts": experts, "expert_tokens": _spread(experts)} if experts else {}),
    }


def _spread(experts: dict) -> dict:
    """Tokens per expert over every MoE layer: min / median / max, and how many were safeguarded."""
    c = sorted(n for r in experts.values() for n in r["tokens"])
    return {"min": c[0], "median": c[len(c) // 2], "max": c[-1], "experts": len(c),
            "safeguarded": sum(len(r["safeguarded"]) for r in experts.values()),
            "min_tokens": next(iter(experts.values()))["min_tokens"]}


def _compare_files(ours: Path, theirs: Path) -> dict:
    """Metadata keys/values and tensors (name, shape, bytes) of two F32 GGUFs."""
    from gguf import GGUFReader
    a, b = GGUFReader(str(ours)), GGUFReader(str(theirs))

    def meta(r):
        out = {}
        for k, f in r.fields.items():
            if k.startswith("GGUF.") or k in ("general.name", "general.file_type", "general.quantization_version") \
                    or k.startswith("general.") and k not in ("general.architecture",):
                continue
            try:
                v = f.contents()
            except Exception:
                v = None
            out[k] = v
        return out

    ma, mb = meta(a), meta(b)
    diff = sorted(k for k in set(ma) | set(mb) if ma.get(k) != mb.get(k))
    ta = {t.name: (tuple(int(x) for x in t.shape), bytes(t.data.tobytes())) for t in a.tensors}
    tb = {t.name: (tuple(int(x) for x in t.shape), bytes(t.data.tobytes())) for t in b.tensors}
    tdiff = sorted(n for n in set(ta) | set(tb) if ta.get(n) != tb.get(n))
    return {"metadata_differs": diff, "tensors_differ": tdiff}


def _speed(kind: str, d: Path, root: Path, repeats: int) -> dict:
    py = sys.executable
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
    ours_cmd = [py, "-c", "import sys; from quantkit.cli import main; sys.exit(main(sys.argv[1:]))",
                "quantize", str(d), "--format", "gguf:q4_k_m", "-o", str(root / f"{kind}-ours.gguf")]
    conv = [py, str(LLAMA_CPP / "convert_hf_to_gguf.py"), str(d), "--outtype", "f32",
            "--outfile", str(root / f"{kind}-ref-f32.gguf")]
    quant = [str(LLAMA_QUANTIZE), str(root / f"{kind}-ref-f32.gguf"), str(root / f"{kind}-ref-q4km.gguf"), "Q4_K_M",
             "2"]
    ours, theirs, ours_cpu, theirs_cpu = [], [], [], []

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    for _ in range(repeats):
        t0, c0 = time.perf_counter(), cpu()
        subprocess.run(ours_cmd, check=True, env=env, capture_output=True)
        ours.append(time.perf_counter() - t0)
        ours_cpu.append(cpu() - c0)
        t0, c0 = time.perf_counter(), cpu()
        subprocess.run(conv, check=True, env=env, capture_output=True)
        subprocess.run(quant, check=True, capture_output=True)
        theirs.append(time.perf_counter() - t0)
        theirs_cpu.append(cpu() - c0)
    cmp = _compare_files(root / f"{kind}-f32.gguf", root / f"{kind}-ref-f32.gguf")
    med = statistics.median
    return {"kind": kind, "quantkit_s": med(ours), "llama_cpp_s": med(theirs), "ratio": med(ours) / med(theirs),
            "quantkit_cpu_s": med(ours_cpu), "llama_cpp_cpu_s": med(theirs_cpu),
            "cpu_ratio": med(ours_cpu) / med(theirs_cpu), **cmp}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="arch_table.json", help="file name under benchmarks/results")
    ap.add_argument("--shrink", type=float, default=None, help="GPTQ's Hessian shrinkage (default: the format's)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    calib = str(Path(DATA_DIR) / "wikitext-2" / "valid.txt")
    rows, speed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for kind in args.kinds.split(","):
            r = _row(kind, root, args.layers, calib, args.shrink)
            rows.append(r)
            print(json.dumps(r), flush=True)
            if kind in SPM and LLAMA_QUANTIZE.exists():
                s = _speed(kind, Path(r["dir"]), root, args.repeats)
                speed.append(s)
                print(json.dumps(s), flush=True)
    out = HERE / "results" / args.out
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "speed": speed, "layers": args.layers}, indent=1))
    print("\n| architecture | convert s/layer | logit rel. err | argmax | Q4_K_M s/layer | KL wikitext / sst2 | "
          "GPTQ Q4_0 s/layer | KL GPTQ vs RTN Q4_0 (wikitext / sst2) | plan = converted |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        n = r["layers"]
        g, q = r["gptq_q4_0_kl"], r["rtn_q4_0_kl"]
        gptq = (f"{r['gptq_q4_0_s'] / n:.2f} | {g['wikitext']:.4f} vs {q['wikitext']:.4f} / {g['sst2']:.4f} vs "
                f"{q['sst2']:.4f}") if g else f"refused | RTN Q4_0 {q['wikitext']:.4f} / {q['sst2']:.4f}"
        print(f"| {r['kind']} | {r['convert_s'] / n:.3f} | {r['logit_rel_err']:.1e} | {'yes' if r['argmax_agrees'] else 'NO'} "
              f"| {r['q4_k_m_s'] / n:.3f} | {r['q4_k_m_kl']['wikitext']:.4f} / {r['q4_k_m_kl']['sst2']:.4f} "
              f"| {gptq} | {'yes' if r['plan_tensors_match'] else 'NO'} |")
    moe = [r for r in rows if r.get("expert_tokens")]
    if moe:
        print("\n| MoE | GPTQ Q4_0 wall / CPU s per layer (load) | tokens per expert min / median / max "
              "(experts x layers) | safeguarded (under N tokens) |")
        print("|---|---|---|---|")
        for r in moe:
            e, n = r["expert_tokens"], r["layers"]
            print(f"| {r['kind']} | {r['gptq_q4_0_s'] / n:.2f} / {r['gptq_q4_0_cpu_s'] / n:.2f} ({r['gptq_load']}) "
                  f"| {e['min']} / {e['median']} / {e['max']} ({e['experts']}) | {e['safeguarded']} "
                  f"(under {e['min_tokens']}) |")
    if speed:
        print("\n| architecture | quantkit HF -> Q4_K_M wall / CPU (s) | convert_hf_to_gguf + llama-quantize "
              "wall / CPU (s) | ratio wall / CPU | F32 metadata differing | F32 tensors differing |")
        print("|---|---|---|---|---|---|")
        for s in speed:
            print(f"| {s['kind']} | {s['quantkit_s']:.2f} / {s['quantkit_cpu_s']:.2f} | {s['llama_cpp_s']:.2f} / "
                  f"{s['llama_cpp_cpu_s']:.2f} | {s['ratio']:.2f}x / {s['cpu_ratio']:.2f}x | "
                  f"{', '.join(s['metadata_differs']) or 'none'} | {', '.join(s['tensors_differ']) or 'none'} |")


if __name__ == "__main__":
    main()
