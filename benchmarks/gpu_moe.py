"""GPU checkpoints (GPTQ, compressed-tensors) of the mixtures of experts Qwen3-MoE and Mixtral:
time, and agreement of what a runtime loads with quantkit's own dequantized model.

    nice .venv/bin/python benchmarks/gpu_moe.py [--kinds qwen3moe,mixtral] [--layers 4]

Per architecture a tiny random Hugging Face model (hidden 256, 4 experts, 2 per token, --layers
layers; tests/helpers/tiny_models.build_arch_model), then for each of compressed-tensors and
gptq x RTN and GPTQ (w4g128, symmetric; GPTQ on 8 x 128 tokens of wikitext-2 valid):
- wall and CPU seconds of the export (quant.checkpoint.export_gpu_checkpoint, keeping the
  dequantized model), the load average around it;
- compressed-tensors: the checkpoint loaded by transformers + compressed-tensors; logit agreement
  = max |transformers - quantkit| / max |quantkit| over 2 x 255 tokens of wikitext-2 test and 2 x
  (up to 255) of SST-2 dev; KL divergence of its next-token distribution to the float model's on both texts;
- gptq (transformers needs optimum + gptqmodel for it, not installed): every linear decoded with
  quantkit's v1 unpacker against quantkit's model (how many differ), and the same KL from
  quantkit's model;
- beside it, in the same run, quantkit's GPTQ-compensated Q4_0 GGUF of the same model on the same
  calibration (the same block pipeline and expert solver onto llama.cpp's grid): the time ratio.
Writes benchmarks/results/gpu_moe.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
from quantkit.models.gpu_formats import GPUFormatConfig, dequantize_gptq  # noqa: E402
from quantkit.quant.checkpoint import export_gpu_checkpoint  # noqa: E402
from quantkit.util.data import DATA_DIR  # noqa: E402
from helpers.tiny_models import build_arch_model, wikitext_lines  # noqa: E402

CALIB = dict(nsamples=8, seqlen=128)


def _texts(tok) -> dict[str, torch.Tensor]:
    wt = " ".join(wikitext_lines("test.txt", 400))
    sst = [line.split("\t")[0] for line in (Path(DATA_DIR) / "sst2" / "dev.tsv").read_text().splitlines()[1:200]]
    out = {}
    for name, text in (("wikitext", wt), ("sst2", " ".join(sst))):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        n = min(255, len(ids) // 2)
        out[name] = torch.tensor([ids[i * n:(i + 1) * n] for i in range(2)])
    return out


@torch.no_grad()
def _logits(model, texts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: model.eval()(input_ids=v).logits.float() for k, v in texts.items()}


def _kl(ref: torch.Tensor, x: torch.Tensor) -> float:
    p, q = torch.log_softmax(ref, -1), torch.log_softmax(x, -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _timed(fn):
    t0, c0, l0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    r = fn()
    return r, time.perf_counter() - t0, time.process_time() - c0, round((l0 + os.getloadavg()[0]) / 2, 2)


def _gptq_differing(out: Path, ours) -> tuple[int, int]:
    from safetensors.torch import load_file
    t = {}
    for f in os.listdir(out):
        if f.endswith(".safetensors"):
            t.update(load_file(out / f))
    differ = n = 0
    for p in sorted(k.removesuffix(".qweight") for k in t if k.endswith(".qweight")):
        m = re.fullmatch(r"(model\.layers\.(\d+))\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)", p)
        if m:
            lp, e, part = m.group(1), int(m.group(3)), m.group(4)
            ex = ours.get_submodule(lp).mlp.experts
            inter = ex.gate_up_proj.shape[1] // 2
            w = {"gate_proj": ex.gate_up_proj[e, :inter], "w1": ex.gate_up_proj[e, :inter],
                 "up_proj": ex.gate_up_proj[e, inter:], "w3": ex.gate_up_proj[e, inter:],
                 "down_proj": ex.down_proj[e], "w2": ex.down_proj[e]}[part]
        else:
            w = ours.get_submodule(p).weight
        n += 1
        differ += not torch.equal(dequantize_gptq(t, p, 4), w)
    return differ, n


def _row(kind: str, root: Path, layers: int, calib: str) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d = build_arch_model(kind, root, layers=layers)
    texts = _texts(AutoTokenizer.from_pretrained(str(d)))
    ref = _logits(AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32), texts)
    gguf = root / f"{kind}-gptq-q4_0.gguf"
    _, g_wall, g_cpu, g_load = _timed(lambda: api.quantize(str(d), gguf, format="gguf:q4_0", method="gptq",
                                                           calib=calib, show_progress=False, **CALIB))
    rows = []
    for fmt in ("compressed-tensors", "gptq"):
        for method in ("rtn", "gptq"):
            out = root / f"{kind}-{fmt}-{method}"
            cfg = GPUFormatConfig(fmt, bits=4, group_size=128, method=method)
            r, wall, cpu, load = _timed(lambda: export_gpu_checkpoint(str(d), str(out), cfg, calib=calib,
                                                                      keep_model=True, show_progress=False, **CALIB))
            ours = _logits(r.model, texts)
            row = {"kind": kind, "layers": layers, "format": fmt, "method": method, "wall_s": wall, "cpu_s": cpu,
                   "load": load, "n_linear": r.n_linear, "file_bytes": r.file_bytes,
                   "experts": r.report.experts or None}
            if fmt == "compressed-tensors":
                theirs = _logits(AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32), texts)
                row["logit_rel_err"] = {k: _rel(theirs[k], ours[k]) for k in texts}
                row["kl_to_float"] = {k: round(_kl(ref[k], theirs[k]), 5) for k in texts}
            else:
                row["linears_differing"], row["linears"] = _gptq_differing(out, r.model)
                row["kl_to_float"] = {k: round(_kl(ref[k], ours[k]), 5) for k in texts}
            if method == "gptq":
                row["gguf_gptq_q4_0"] = {"wall_s": g_wall, "cpu_s": g_cpu, "load": g_load}
            rows.append(row)
            del r
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kinds", default="qwen3moe,mixtral")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", default="gpu_moe.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    calib = str(Path(DATA_DIR) / "wikitext-2" / "valid.txt")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds.split(","):
            rows += _row(kind, Path(tmp), args.layers, calib)
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    machine = {"cpus": os.cpu_count(), "threads": torch.get_num_threads(),
               "flags": [x for x in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16") if x in flags]}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / args.out).write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    print("| MoE | format | method | wall / CPU s per layer (load) | logit rel. err wikitext / sst2 "
          "| KL to float wikitext / sst2 | GPTQ Q4_0 GGUF wall / CPU s per layer |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        n = r["layers"]
        agree = ("{:.1e} / {:.1e}".format(*r["logit_rel_err"].values()) if "logit_rel_err" in r
                 else f"{r['linears_differing']} of {r['linears']} linears differ")
        g = r.get("gguf_gptq_q4_0")
        print(f"| {r['kind']} | {r['format']} | {r['method']} | {r['wall_s'] / n:.2f} / {r['cpu_s'] / n:.2f} "
              f"({r['load']}) | {agree} | {r['kl_to_float']['wikitext']:.4f} / {r['kl_to_float']['sst2']:.4f} | "
              + (f"{g['wall_s'] / n:.2f} / {g['cpu_s'] / n:.2f} ({g['load']})" if g else "") + " |")


if __name__ == "__main__":
    main()
