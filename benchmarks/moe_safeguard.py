"""What the starved-expert safeguard of MoE GPTQ buys: GPTQ-compensated Q4_0 of a tiny random
Qwen3-MoE with the safeguard (an expert routed fewer than `moe_min_tokens` calibration tokens is
solved on its Hessian mixed with the layer's mean, quant.moe) against the same run without it
(moe_min_tokens=1: every expert on its own few tokens' Hessian, damped) and round to nearest.

    nice .venv/bin/python benchmarks/moe_safeguard.py [--seeds 3] [--experts 16] [--nsamples 2] [--type q4_0]

Per seed: a tiny random Qwen3-MoE (tests/helpers/tiny_models.build_arch_model's qwen3moe, 4
layers, hidden 256, its config re-drawn with --experts experts, 2 per token), its F32 GGUF, then
--type (default Q4_0) by RTN, GPTQ with the safeguard (default threshold max(16, hidden // 8) = 32 tokens) and GPTQ
without; calibration --nsamples x 128 tokens of wikitext-2 valid (few on purpose: many experts
starve). KL divergence to the F32 file in llama.cpp on 3 x 255 tokens of wikitext-2 test (the
calibration's domain) and of SST-2 dev sentences (outside it). Writes
benchmarks/results/moe_safeguard.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent / "src"))
os.environ.setdefault("QUANTKIT_QUIET", "1")

import torch  # noqa: E402

from quantkit import api  # noqa: E402
from quantkit.quant.gguf_gptq import export_gguf_gptq  # noqa: E402
from quantkit.quant.gptq import GPTQConfig  # noqa: E402
from quantkit.util.data import DATA_DIR  # noqa: E402
from helpers.llama_logits import chunk_logits, kld  # noqa: E402
from helpers.tiny_models import build_arch_model, wikitext_lines  # noqa: E402

CALIB_SEQLEN = 128


def _model(root: Path, seed: int, experts: int) -> Path:
    """build_arch_model's qwen3moe with its weights re-drawn (seed) at `experts` experts."""
    import transformers as tf
    d = build_arch_model("qwen3moe", root, layers=4)
    cfg = tf.AutoConfig.from_pretrained(str(d))
    cfg.num_experts = experts
    torch.manual_seed(seed)
    tf.Qwen3MoeForCausalLM(cfg).to(torch.float32).save_pretrained(str(d))
    return d


def _texts() -> dict[str, str]:
    sst = [line.split("\t")[0] for line in (Path(DATA_DIR) / "sst2" / "dev.tsv").read_text().splitlines()[1:300]]
    return {"wikitext": " ".join(wikitext_lines("test.txt", 400)), "sst2": " ".join(sst)}


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_seed(seed: int, experts: int, nsamples: int, root: Path, qtype: str = "q4_0") -> dict:
    d = _model(root, seed, experts)
    f32 = root / "f32.gguf"
    api.quantize(str(d), str(f32), format="gguf:f32", show_progress=False)
    texts = _texts()
    ref = {k: chunk_logits(f32, t) for k, t in texts.items()}
    row: dict = {"seed": seed}
    files = {"rtn": None, "gptq_safeguard": None, "gptq_no_safeguard": 1}
    for label, min_tokens in files.items():
        out = root / f"{label}.gguf"
        c0, t0 = _cpu(), time.time()
        if label == "rtn":
            api.quantize(str(d), str(out), format=f"gguf:{qtype}", show_progress=False)
        else:
            rep = export_gguf_gptq(str(d), out, qtype, nsamples=nsamples, seqlen=CALIB_SEQLEN,
                                   gptq=GPTQConfig(moe_min_tokens=min_tokens), show_progress=False)
            row[f"{label}_experts"] = json.loads(json.dumps(rep.experts, default=str))
        row[f"{label}_cpu_s"] = round(_cpu() - c0, 2)
        row[f"{label}_wall_s"] = round(time.time() - t0, 2)
        row[label] = {k: kld(ref[k], chunk_logits(out, t)) for k, t in texts.items()}
        out.unlink()
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--nsamples", type=int, default=2)
    ap.add_argument("--type", default="q4_0", help="the GGUF file type of all three files")
    ap.add_argument("--results", default=str(HERE / "results" / "moe_safeguard.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for seed in range(a.seeds):
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(run_seed(seed, a.experts, a.nsamples, Path(tmp), a.type))
        print(json.dumps({k: v for k, v in rows[-1].items() if not k.endswith("_experts")}), flush=True)
    meta = {"type": a.type, "experts": a.experts, "experts_used": 2, "calibration": f"{a.nsamples} x {CALIB_SEQLEN}",
            "loadavg": open("/proc/loadavg").read().split()[:3]}
    Path(a.results).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\n{a.type}, {a.experts} experts, calibration {meta['calibration']}")
    print("\n| seed | RTN KL wikitext / sst2 | GPTQ, safeguard | GPTQ, no safeguard |")
    print("|---|---|---|---|")
    for r in rows:
        cells = [f"{r[k]['wikitext']:.4f} / {r[k]['sst2']:.4f}" for k in ("rtn", "gptq_safeguard", "gptq_no_safeguard")]
        print(f"| {r['seed']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
