"""GPTQ of a mixture of experts from a GGUF file against from its Hugging Face directory: CPU
time, wall time and peak RSS of each run, and whether the two Q4_0 files are the same bytes.

    nice .venv/bin/python benchmarks/moe_gguf_source.py [--layers 4] [--experts 16] [--nsamples 16]

A tiny random Qwen3-MoE (tests/helpers/tiny_models.build_arch_model's qwen3moe, hidden 256,
--layers layers, its config re-drawn with --experts experts, 2 per token) and its F32 GGUF
(quantkit's own conversion); then GPTQ Q4_0 from each source, each run in a fresh process on
one torch thread (the figures include the imports and the model/tokenizer loads), calibrated
on --nsamples x 128 tokens of wikitext-2 valid with the text transformers' and llama.cpp's
tokenizers split differently removed (a literal '<unk>', leading spaces), so both runs see
the same calibration tensor. Writes benchmarks/results/moe_gguf_source.json.
"""

from __future__ import annotations

import argparse
import json
import os
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
from quantkit.models.gguf import GGUFSource  # noqa: E402
from quantkit.util.data import DATA_DIR  # noqa: E402
from helpers.tiny_models import build_arch_model  # noqa: E402

CHILD = """
import json, resource, sys, time, torch
torch.set_num_threads(1)
from quantkit import api
src, out, calib, n = sys.argv[1:5]
t0 = time.perf_counter()
r = api.quantize(src, out, format="gguf:q4_0", method="gptq", calib=calib, nsamples=int(n), seqlen=128,
                 show_progress=False)
print(json.dumps({"cpu_s": time.process_time(), "wall_s": time.perf_counter() - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "experts": r.report["experts"]}))
"""


def _model(root: Path, layers: int, experts: int) -> Path:
    import transformers as tf
    d = build_arch_model("qwen3moe", root, layers=layers)
    cfg = tf.AutoConfig.from_pretrained(str(d))
    cfg.num_experts = experts
    torch.manual_seed(0)
    tf.Qwen3MoeForCausalLM(cfg).to(torch.float32).save_pretrained(str(d))
    return d


def _calib(out: Path) -> str:
    text = (Path(DATA_DIR) / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")[:200000]
    text = text.replace(" <unk>", "").replace(" @-@ ", "-")
    out.write_text("\n".join(line.strip() for line in text.splitlines() if line.strip()), encoding="utf-8")
    return str(out)


def _run(src: str, out: str, calib: str, n: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(HERE.parent / "src"))
    p = subprocess.run([sys.executable, "-c", CHILD, src, out, calib, str(n)], capture_output=True, text=True,
                       env=env, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--nsamples", type=int, default=16)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        d = _model(root, args.layers, args.experts)
        f32 = root / "f32.gguf"
        api.quantize(str(d), f32, format="gguf:f32", show_progress=False)
        calib = _calib(root / "calib.txt")
        load = [os.getloadavg()[0]]
        runs = {}
        for name, src in (("hf_directory", str(d)), ("gguf", str(f32))):
            runs[name] = _run(src, str(root / f"{name}.gguf"), calib, args.nsamples)
            load.append(os.getloadavg()[0])
        with GGUFSource(root / "hf_directory.gguf") as a, GGUFSource(root / "gguf.gguf") as b:
            same = all(np.array_equal(np.asarray(a.raw(t.name)[0]), np.asarray(b.raw(t.name)[0]))
                       for t in a.tensors()) and len(a.tensors()) == len(b.tensors())
    res = {"model": f"tiny random Qwen3-MoE, hidden 256, {args.layers} layers, {args.experts} experts, 2 per token",
           "calibration": f"{args.nsamples} x 128 tokens of wikitext-2 valid", "torch_threads": 1,
           "loadavg_1min": load, "same_bytes": same,
           "same_expert_counts": runs["hf_directory"].pop("experts") == runs["gguf"].pop("experts"),
           "runs": runs,
           "ratio_gguf_over_hf": {k: runs["gguf"][k] / runs["hf_directory"][k] for k in ("cpu_s", "wall_s", "peak_rss_mb")},
           "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = HERE / "results" / "moe_gguf_source.json"
    out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
