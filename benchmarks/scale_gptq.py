"""Scale: a llama-architecture model whose bf16 weights are larger than this machine's RAM,
quantized to GGUF Q4_0 by RTN and by GPTQ (8 x 512 calibration tokens), streaming block by
block; peak RSS of each run and a short generation of each output in llama.cpp.

Model: Llama-2-13B's shapes (hidden 5120, MLP 13824, 40 heads, vocabulary 32000 rows, untied
head) with 44 layers instead of 40: 14.3 B parameters, 28.6 GB in bf16, random weights
N(0, 0.02) (the scale run measures memory and completeness, not quality), a 512-token byte-level
BPE tokenizer (the embedding padded to 32000 rows, as models pad theirs). Written once to
$QUANTKIT_CACHE/bench-scale (about 29 GB free disk needed, plus ~16 GB for one output and the
GPTQ spool beside it; the RTN output is deleted after its check).

    python benchmarks/scale_gptq.py [--layers 44] [--threads 2] [--methods rtn,gptq]
Results: benchmarks/results/scale_gptq.json, keyed by the layer count (a few layers of the same
shapes measure GPTQ's per-block memory and time when the whole model would take hours).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from gguf_gptq import timed  # noqa: E402

CACHE = os.environ.get("QUANTKIT_CACHE", os.path.expanduser("~/.cache/quantkit"))
WORK = os.path.join(CACHE, "bench-scale")
SHAPE = dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40,
             vocab_size=32000)


def make_model(d: str, n_layer: int) -> int:
    """Write the random bf16 model shard by shard (one decoder block per shard). Returns bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from plan_speed_calibrate import _tokenizer
    if os.path.exists(os.path.join(d, "model.safetensors.index.json")):
        return sum(os.path.getsize(os.path.join(d, n)) for n in os.listdir(d) if n.endswith(".safetensors"))
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    n_tok = _tokenizer(d)
    cfg = LlamaConfig(num_hidden_layers=n_layer, tie_word_embeddings=False, max_position_embeddings=4096,
                      bos_token_id=n_tok - 2, eos_token_id=n_tok - 1, torch_dtype="bfloat16", **SHAPE)
    cfg.save_pretrained(d)
    h, ff, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=gen)

    shards = [{"model.embed_tokens.weight": rnd(v, h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
               "lm_head.weight": rnd(v, h)}]
    total, weight_map = 0, {}
    for i in range(n_layer + 1):
        if i > 0:
            p = f"model.layers.{i - 1}."
            shard = {p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                     p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                shard[p + f"self_attn.{n}.weight"] = rnd(h, h)
            shard[p + "mlp.gate_proj.weight"] = rnd(ff, h)
            shard[p + "mlp.up_proj.weight"] = rnd(ff, h)
            shard[p + "mlp.down_proj.weight"] = rnd(h, ff)
        else:
            shard = shards[0]
        name = f"model-{i + 1:05d}-of-{n_layer + 1:05d}.safetensors"
        save_file(shard, os.path.join(d, name + ".partial"), metadata={"format": "pt"})
        os.replace(os.path.join(d, name + ".partial"), os.path.join(d, name))
        total += sum(t.numel() * 2 for t in shard.values())
        weight_map.update({k: name for k in shard})
        print(f"  wrote {name}", flush=True)
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


def generate(path: str, threads: int) -> dict:
    """A few greedy tokens from the GGUF in llama.cpp (a child process: its memory is not ours)."""
    code = ("import json,sys,time;from llama_cpp import Llama;t=time.perf_counter();"
            f"m=Llama(model_path={path!r},n_ctx=64,n_threads={threads},verbose=False);l=time.perf_counter()-t;"
            "t=time.perf_counter();o=m.create_completion('The',max_tokens=4,temperature=0);"
            "print(json.dumps({'load_s':round(l,1),'gen_s':round(time.perf_counter()-t,1),"
            "'tokens':o['usage']['completion_tokens'],'text':o['choices'][0]['text']}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        return {"ok": False, "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["ok"] = out["tokens"] > 0
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=44)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--keep", action="store_true", help="keep the quantized files")
    args = ap.parse_args()
    os.makedirs(WORK, exist_ok=True)
    res_path = os.path.join(HERE, "results", "scale_gptq.json")
    everything = json.load(open(res_path)) if os.path.exists(res_path) else {}
    results = everything.setdefault(f"{args.layers} layers", {})
    model = os.path.join(WORK, f"llama-13b-shapes-{args.layers}l-bf16")
    nbytes = make_model(model, args.layers)
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    results["model"] = {"path": model, "layers": args.layers, **SHAPE, "bf16_bytes": nbytes, "ram_bytes": mem,
                        "bigger_than_ram": nbytes > mem}
    print(results["model"], flush=True)
    for method in args.methods.split(","):
        out = os.path.join(WORK, f"q4_0-{method}.gguf")
        cmd = [sys.executable, "-m", "quantkit.cli", "quantize", model, "--format", "gguf:q4_0", "-o", out]
        if method == "gptq":
            cmd += ["--method", "gptq", "--nsamples", "8", "--seqlen", "512", "--threads", str(args.threads)]
        r = timed(cmd, os.path.join(WORK, f"{method}.log"))
        r["bytes"] = os.path.getsize(out)
        r["llama_cpp"] = generate(out, args.threads)
        results[method] = r
        print(method, r, flush=True)
        os.makedirs(os.path.dirname(res_path), exist_ok=True)
        with open(res_path, "w") as f:
            json.dump(everything, f, indent=2)
        if not args.keep:
            os.remove(out)


if __name__ == "__main__":
    main()
