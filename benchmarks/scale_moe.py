"""Scale: a Qwen3-MoE-shaped model whose bf16 weights are larger than this machine's RAM,
quantized to GGUF Q4_K_M by RTN and to Q4_0 by GPTQ (8 x 512 calibration tokens), streaming
block by block; wall, CPU seconds and peak RSS of each run (GNU time) and each output loaded in
llama.cpp (load time, a few tokens evaluated, logits finite).

Model: Qwen3-30B-A3B's shapes (hidden 2048, 128 experts of which 8 are used, expert width 768,
32 query / 4 key-value heads of 128, q/k RMS norms, 151936-row embedding and an untied head)
with fewer layers (20 instead of 48: 26.2 GB in bf16, 24.4 GiB, above this box's 23.5 GiB of
RAM), random weights N(0, 0.02) (the run measures memory and completeness, not quality), a
512-token byte-level BPE with Qwen2's pre-tokenizer, the embedding padded to 151936 rows as
Qwen's is. Each decoder block is one safetensors shard with one tensor per expert, as the
released checkpoint stores them; the model is written shard by shard, never whole in memory.

    python benchmarks/scale_moe.py [--layers 20] [--threads 2] [--methods rtn,gptq] [--link-from 20]
Results: benchmarks/results/scale_moe.json, keyed by the layer count (a 2-layer instance of the
same shapes measures per-block memory and time first). Files go to
$QUANTKIT_CACHE/bench-scale-moe; `--clean` deletes the model afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from gguf_gptq import timed  # noqa: E402

CACHE = os.environ.get("QUANTKIT_CACHE", os.path.expanduser("~/.cache/quantkit"))
WORK = os.path.join(CACHE, "bench-scale-moe")
SHAPE = dict(hidden_size=2048, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
             intermediate_size=6144, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
             vocab_size=151936)
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def qwen_tokenizer(d: str) -> int:
    """A 512-token byte-level BPE with Qwen2's pre-tokenizer and specials, trained on the shipped
    WikiText excerpt."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    text = open(os.path.join(REPO, "src", "quantkit", "data", "wikitext2-test-excerpt.txt"), encoding="utf-8").read()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text.splitlines(), trainers.BpeTrainer(
        vocab_size=512 - len(specials), show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(specials)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                            add_bos_token=False).save_pretrained(d)
    return tok.get_vocab_size()


def config(n_layer: int, n_tok: int) -> dict:
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_hidden_layers": n_layer,
            **SHAPE, "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "max_position_embeddings": 4096, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
            "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": False,
            "output_router_logits": False, "router_aux_loss_coef": 0.001, "use_sliding_window": False,
            "sliding_window": None, "max_window_layers": n_layer, "initializer_range": 0.02, "use_cache": True,
            "bos_token_id": None, "eos_token_id": n_tok - 3, "torch_dtype": "bfloat16"}


def block_tensors(p: str, rnd, ones) -> dict:
    """One Qwen3-MoE decoder block, HF names, one tensor per expert."""
    h, nh, kvh, hd = SHAPE["hidden_size"], SHAPE["num_attention_heads"], SHAPE["num_key_value_heads"], SHAPE["head_dim"]
    ff, ne = SHAPE["moe_intermediate_size"], SHAPE["num_experts"]
    t = {p + "input_layernorm.weight": ones(h), p + "post_attention_layernorm.weight": ones(h),
         p + "self_attn.q_proj.weight": rnd(nh * hd, h), p + "self_attn.k_proj.weight": rnd(kvh * hd, h),
         p + "self_attn.v_proj.weight": rnd(kvh * hd, h), p + "self_attn.o_proj.weight": rnd(h, nh * hd),
         p + "self_attn.q_norm.weight": ones(hd), p + "self_attn.k_norm.weight": ones(hd),
         p + "mlp.gate.weight": rnd(ne, h)}
    for e in range(ne):
        q = f"{p}mlp.experts.{e}."
        t[q + "gate_proj.weight"] = rnd(ff, h)
        t[q + "up_proj.weight"] = rnd(ff, h)
        t[q + "down_proj.weight"] = rnd(h, ff)
    return t


def make_model(d: str, n_layer: int) -> int:
    """Write the random bf16 model shard by shard (one decoder block per shard). Returns bytes."""
    import torch
    from safetensors.torch import save_file

    if os.path.exists(os.path.join(d, "model.safetensors.index.json")):
        return sum(os.path.getsize(os.path.join(d, n)) for n in os.listdir(d) if n.endswith(".safetensors"))
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    n_tok = qwen_tokenizer(d)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config(n_layer, n_tok), f, indent=2)
    h, v = SHAPE["hidden_size"], SHAPE["vocab_size"]
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=gen)

    def ones(n):
        return torch.ones(n, dtype=torch.bfloat16)

    total, weight_map = 0, {}
    for i in range(n_layer + 1):
        if i == 0:
            shard = {"model.embed_tokens.weight": rnd(v, h), "model.norm.weight": ones(h), "lm_head.weight": rnd(v, h)}
        else:
            shard = block_tensors(f"model.layers.{i - 1}.", rnd, ones)
        name = f"model-{i + 1:05d}-of-{n_layer + 1:05d}.safetensors"
        save_file(shard, os.path.join(d, name + ".partial"), metadata={"format": "pt"})
        os.replace(os.path.join(d, name + ".partial"), os.path.join(d, name))
        total += sum(t.numel() * 2 for t in shard.values())
        weight_map.update({k: name for k in shard})
        del shard
        print(f"  wrote {name}", flush=True)
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


def linked_model(d: str, n_layer: int, big: str) -> bool:
    """The n_layer instance as the first blocks of a bigger model already written (same seed:
    the same tensors): its config, tokenizer and an index naming links to the big model's
    first shards. False if the big model is not there."""
    if os.path.exists(os.path.join(d, "model.safetensors.index.json")) or \
            not os.path.exists(os.path.join(big, "model.safetensors.index.json")):
        return False
    os.makedirs(d, exist_ok=True)
    cfg = json.load(open(os.path.join(big, "config.json")))
    cfg.update(num_hidden_layers=n_layer, max_window_layers=n_layer)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    for name in os.listdir(big):
        if name.startswith("tokenizer"):
            shutil.copy(os.path.join(big, name), d)
    wm = json.load(open(os.path.join(big, "model.safetensors.index.json")))["weight_map"]
    keep = {k: v for k, v in wm.items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < n_layer}
    for name in set(keep.values()):
        os.symlink(os.path.join(big, name), os.path.join(d, name))
    total = sum(os.path.getsize(os.path.join(d, n)) for n in set(keep.values()))
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": keep}, f)
    return True


def llama_check(path: str, threads: int) -> dict:
    """Load the GGUF in llama.cpp (a child process: its memory is not ours), evaluate a few
    tokens and check the logits are finite; then 4 greedy tokens."""
    code = ("import json,math,time;from llama_cpp import Llama;t=time.perf_counter();"
            f"m=Llama(model_path={path!r},n_ctx=64,n_threads={threads},verbose=False);l=time.perf_counter()-t;"
            "toks=m.tokenize(b'The history of the city',add_bos=False);t=time.perf_counter();m.eval(toks);"
            "e=time.perf_counter()-t;lg=m.scores[len(toks)-1];fin=all(math.isfinite(float(x)) for x in lg);"
            "m.reset();o=m.create_completion('The',max_tokens=4,temperature=0);"
            "print(json.dumps({'load_s':round(l,1),'eval_tokens':len(toks),'eval_s':round(e,1),'finite':fin,"
            "'n_vocab':len(lg),'tokens':o['usage']['completion_tokens'],'text':o['choices'][0]['text']}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        return {"ok": False, "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["ok"] = bool(out["finite"]) and out["tokens"] > 0
    return out


def save(res_path: str, key: str, results: dict) -> None:
    """Merge this run's results into the JSON as it is now (another run may have written it)."""
    os.makedirs(os.path.dirname(res_path), exist_ok=True)
    everything = json.load(open(res_path)) if os.path.exists(res_path) else {}
    everything[key] = {**everything.get(key, {}), **results}
    with open(res_path, "w") as f:
        json.dump(everything, f, indent=2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--keep", action="store_true", help="keep the quantized files")
    ap.add_argument("--clean", action="store_true", help="delete the model when done")
    ap.add_argument("--link-from", type=int, default=0, metavar="N",
                    help="build this instance as links to the first shards of the N-layer one, if it is there")
    args = ap.parse_args()
    os.makedirs(WORK, exist_ok=True)
    res_path = os.path.join(HERE, "results", "scale_moe.json")
    everything = json.load(open(res_path)) if os.path.exists(res_path) else {}
    results = everything.get(f"{args.layers} layers", {})
    model = os.path.join(WORK, f"qwen3-30b-a3b-shapes-{args.layers}l-bf16")
    if args.link_from:          # the first blocks of a bigger instance: no second copy on disk
        linked_model(model, args.layers, os.path.join(WORK, f"qwen3-30b-a3b-shapes-{args.link_from}l-bf16"))
    nbytes = make_model(model, args.layers)
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    results["model"] = {"path": model, "layers": args.layers, **SHAPE, "bf16_bytes": nbytes, "ram_bytes": mem,
                        "bigger_than_ram": nbytes > mem}
    print(results["model"], flush=True)
    types = {"rtn": "q4_k_m", "gptq": "q4_0"}
    for method in args.methods.split(","):
        out = os.path.join(WORK, f"{types[method]}-{method}-{args.layers}l.gguf")
        cmd = [sys.executable, "-m", "quantkit.cli", "quantize", model, "--format", f"gguf:{types[method]}",
               "-o", out]
        if method == "gptq":
            cmd += ["--method", "gptq", "--nsamples", "8", "--seqlen", "512", "--threads", str(args.threads)]
        with open("/proc/loadavg") as f:
            load_before = f.read().split()[:3]
        r = timed(cmd, os.path.join(WORK, f"{method}-{args.layers}l.log"))
        with open("/proc/loadavg") as f:
            r["loadavg_before_after"] = [load_before, f.read().split()[:3]]
        r["bytes"] = os.path.getsize(out)
        r["llama_cpp"] = llama_check(out, args.threads)
        results[method] = r
        print(method, r, flush=True)
        save(res_path, f"{args.layers} layers", results)
        if not args.keep:
            os.remove(out)
    if args.clean:
        shutil.rmtree(model)


if __name__ == "__main__":
    main()
