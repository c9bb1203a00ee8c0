"""Vision-language models: quantkit's mmproj writer against llama.cpp's convert_hf_to_gguf.py --mmproj
on the same input, side by side in one run (each in its own process: wall time and peak RSS),
and the image-embedding agreement of the written files with transformers in llama.cpp's mtmd.

    .venv/bin/python benchmarks/vlm_mmproj.py [--repeats 3] [--skip-large]

Inputs, built here from configs (random weights, nothing downloaded), in the Hugging Face hub's
tensor layout (language_model.model.*, vision_tower.vision_model.*, multi_modal_projector.*):
- gemma3-tiny: Gemma3ForConditionalGeneration, 2-layer SigLIP (hidden 64), 2-layer Gemma-3 (hidden 256);
- gemma3-4b-vision: Gemma-3-4B's vision half at full size (SigLIP-So400m: 27 layers, hidden 1152,
  896 px in 14 px patches; 2560-wide projection; 419.8 M parameters, bf16) with a 1-layer language model;
- llava-siglip-tiny / llava-clip-tiny: the test suite's LLaVA models (mtmd agreement only:
  convert_hf_to_gguf.py does not convert LlavaForConditionalGeneration with a CLIP or SigLIP tower,
  it takes only Pixtral / Mistral-3 there).
Writes benchmarks/results/vlm_mmproj.json and prints Markdown tables for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))
LLAMA = Path(os.environ.get("QUANTKIT_CACHE", Path.home() / ".cache/quantkit")) / \
    "llama-tools/src/llama_cpp_python-0.3.36/vendor/llama.cpp"

QUANTKIT_CHILD = r"""
import sys
sys.path.insert(0, {src!r})
from quantkit.models.vision import VisionSource
from quantkit.quant.mmproj import write_mmproj
with VisionSource(sys.argv[1]) as s:
    write_mmproj(s, sys.argv[2], sys.argv[3], show_progress=False)
"""


def hub_layout(d: Path) -> None:
    """Rename the checkpoint's tensors to the hub's layout (transformers 5 saves vision towers
    without the vision_model. level that released checkpoints and convert_hf_to_gguf.py use)."""
    from safetensors.torch import load_file, save_file
    f = d / "model.safetensors"
    sd = load_file(str(f))
    out = {}
    for k, v in sd.items():
        if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model."):
            k = "vision_tower.vision_model." + k[len("vision_tower."):]
        out[k] = v
    save_file(out, str(f), metadata={"format": "pt"})


def build_gemma3_4b_vision(root: Path) -> Path:
    import torch
    import transformers as tf
    from helpers.tiny_models import randomise
    from helpers.vision_models import bpe_tokenizer_with, write_preprocessor
    d = root / "gemma3-4b-vision"
    d.mkdir()
    n = bpe_tokenizer_with(d, ["<start_of_image>", "<end_of_image>", "<image_soft_token>"])
    ids = {t["content"]: t["id"] for t in json.loads((d / "tokenizer.json").read_text())["added_tokens"]}
    vc = tf.SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                               num_attention_heads=16, image_size=896, patch_size=14, vision_use_head=False)
    tc = tf.Gemma3TextConfig(vocab_size=n, hidden_size=2560, intermediate_size=512, num_hidden_layers=1,
                             num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                             max_position_embeddings=1024, sliding_window=64, layer_types=["full_attention"])
    cfg = tf.Gemma3Config(text_config=tc, vision_config=vc, mm_tokens_per_image=256,
                          boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
                          image_token_index=ids["<image_soft_token>"])
    torch.manual_seed(0)
    model = tf.Gemma3ForConditionalGeneration(cfg)
    randomise(model, gemma=True)
    model.to(torch.bfloat16).save_pretrained(str(d))
    del model
    write_preprocessor(d, "Gemma3ImageProcessor", 896, image_seq_length=256)
    return d


LAUNCH = r"""
import json, os, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
err = p.stderr.read()
_, status, ru = os.wait4(p.pid, 0)
sys.stderr.write(err.decode(errors="replace")[-3000:] if status else "")
print(json.dumps({"s": time.perf_counter() - t0, "rss": ru.ru_maxrss * 1024, "status": status}))
"""


def run_child(cmd: list[str], env: dict | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one process, started by a small launcher process (a child
    forked from this one would start its peak-RSS count at this process's size)."""
    r = subprocess.run([sys.executable, "-c", LAUNCH, *cmd], capture_output=True, text=True, env=env)
    if r.returncode != 0 or not r.stdout.strip():
        raise RuntimeError(f"{cmd[:3]} failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if res["status"] != 0:
        raise RuntimeError(f"{cmd[:3]} failed:\n{r.stderr[-3000:]}")
    return res["s"], res["rss"]


def convert_both(d: Path, out: Path, ft: str, repeats: int) -> dict:
    py = sys.executable
    ours = [py, "-c", QUANTKIT_CHILD.format(src=str(ROOT / "src")), str(d), str(out / f"qk-{d.name}.gguf"), ft]
    env = dict(os.environ, PYTHONPATH=str(LLAMA / "gguf-py"))
    peer = [py, str(LLAMA / "convert_hf_to_gguf.py"), str(d), "--mmproj", "--outtype", ft,
            "--outfile", str(out / f"peer-{d.name}.gguf")]
    t = {"quantkit": [], "convert_hf_to_gguf": []}
    rss = {"quantkit": 0, "convert_hf_to_gguf": 0}
    for _ in range(repeats):
        for name, cmd, e in (("quantkit", ours, None), ("convert_hf_to_gguf", peer, env)):
            dt, r = run_child(cmd, e)
            t[name].append(dt)
            rss[name] = max(rss[name], r)
    med = {k: statistics.median(v) for k, v in t.items()}
    return {"seconds": t, "median_s": med, "peak_rss_bytes": rss,
            "ratio_quantkit_over_peer": med["quantkit"] / med["convert_hf_to_gguf"],
            "files": same_file(out / f"qk-{d.name}.gguf", out / f"peer-{d.name}.gguf"),
            "bytes": os.path.getsize(out / f"qk-{d.name}.gguf")}


def same_file(a: Path, b: Path) -> dict:
    """Tensor names, types and data, and the clip.* keys, of two mmproj files compared."""
    import numpy as np
    from gguf import GGUFReader
    ra, rb = GGUFReader(str(a)), GGUFReader(str(b))
    ta = {t.name: t for t in ra.tensors}
    tb = {t.name: t for t in rb.tensors}
    diff_type = [n for n in ta if n in tb and ta[n].tensor_type != tb[n].tensor_type]
    diff_data = [n for n in ta if n in tb and not np.array_equal(np.asarray(ta[n].data), np.asarray(tb[n].data))]

    def keys(r):
        out = {}
        for k, f in r.fields.items():
            if not k.startswith("clip."):
                continue
            out[k] = [f.parts[i].tolist() for i in f.data]
        return out
    ka, kb = keys(ra), keys(rb)
    return {"same_tensor_names": set(ta) == set(tb), "only_quantkit": sorted(set(ta) - set(tb)),
            "only_peer": sorted(set(tb) - set(ta)), "type_differs": diff_type, "data_differs": diff_data,
            "clip_keys_only_quantkit": sorted(set(ka) - set(kb)), "clip_keys_only_peer": sorted(set(kb) - set(ka)),
            "clip_values_differ": sorted(k for k in ka if k in kb and ka[k] != kb[k])}


def agreement(kind: str, d: Path, out: Path) -> dict:
    """mtmd's image embedding (quantkit's LM + mmproj at F32, F16, Q8_0) against transformers."""
    import numpy as np
    import torch
    import transformers as tf
    from helpers.vision_models import clip_cls_last_features, pixel_values, sample_image
    from quantkit import api
    from quantkit.models.vision import VisionSource
    from quantkit.quant.mmproj import write_mmproj
    from quantkit.runtimes.mtmd import MtmdPair
    lm = out / f"lm-{kind}.gguf"
    api.quantize(str(d), str(lm), format="gguf:f32", text_only=True, show_progress=False)
    cls = tf.Gemma3ForConditionalGeneration if kind.startswith("gemma3") else tf.LlavaForConditionalGeneration
    model = cls.from_pretrained(str(d)).eval()
    img = sample_image(32)
    with torch.no_grad():
        o = model.get_image_features(pixel_values=pixel_values(img))
        ref = getattr(o, "pooler_output", o)[0].numpy()
    res = {}
    with VisionSource(d) as src:
        for ft in ("f32", "f16", "q8_0"):
            mm = out / f"mm-{kind}-{ft}.gguf"
            write_mmproj(src, mm, ft, show_progress=False)
            with MtmdPair(str(lm), str(mm)) as pair:
                e = pair.image_embedding(img)
            cos = float((e * ref).sum() / np.linalg.norm(e) / np.linalg.norm(ref))
            res[ft] = {"max_rel": float(np.abs(e - ref).max() / np.abs(ref).max()), "cosine": cos}
            if kind.startswith("llava-clip"):
                # against transformers evaluated in this llama.cpp's class-token order (issue 25814)
                sim = clip_cls_last_features(model, pixel_values(img))
                res[ft]["max_rel_cls_last_order"] = float(np.abs(e - sim).max() / np.abs(sim).max())
    peer = out / f"peer-{d.name}.gguf"
    if peer.is_file():
        with MtmdPair(str(lm), str(peer)) as pair:
            e = pair.image_embedding(img)
        res["peer_f16"] = {"max_rel": float(np.abs(e - ref).max() / np.abs(ref).max())}
    return res


def machine() -> dict:
    flags = open("/proc/cpuinfo").read()
    model = next((ln.split(":", 1)[1].strip() for ln in flags.splitlines() if ln.startswith("model name")), "?")
    return {"cpu": model, "cores": os.cpu_count(), "load_1m": os.getloadavg()[0],
            "flags": {f: f" {f} " in flags for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16")},
            "python": platform.python_version()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-large", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("QUANTKIT_QUIET", "1")
    from helpers.vision_models import build_gemma3_vlm, build_llava
    result = {"machine_before": machine(), "speed": {}, "agreement": {}}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as tmp:
        root, out = Path(tmp) / "models", Path(tmp) / "out"
        root.mkdir()
        out.mkdir()
        g = build_gemma3_vlm(root, "gemma3-tiny")
        hub_layout(g)
        clip = build_llava(root, "llava-clip-tiny")
        sig = build_llava(root, "llava-siglip-tiny", "siglip_vision_model", tokenizer_from=clip)
        models = [g]
        if not args.skip_large:
            big = build_gemma3_4b_vision(root)
            hub_layout(big)
            models.append(big)
        for d in models:
            result["speed"][d.name] = convert_both(d, out, "f16", args.repeats)
            print(d.name, json.dumps(result["speed"][d.name]["median_s"]), flush=True)
        for kind, d in (("gemma3-tiny", g), ("llava-siglip-tiny", sig), ("llava-clip-tiny", clip)):
            result["agreement"][kind] = agreement(kind, d, out)
    result["machine_after"] = machine()
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "vlm_mmproj.json").write_text(json.dumps(result, indent=1))
    print("\n| model | quantkit s | convert_hf_to_gguf.py --mmproj s | ratio | quantkit peak RSS MB | peer peak RSS MB | "
          "mmproj MB | tensors identical |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in result["speed"].items():
        m, rss, f = r["median_s"], r["peak_rss_bytes"], r["files"]
        same = f["same_tensor_names"] and not f["type_differs"] and not f["data_differs"]
        print(f"| {name} | {m['quantkit']:.2f} | {m['convert_hf_to_gguf']:.2f} | {r['ratio_quantkit_over_peer']:.2f} | "
              f"{rss['quantkit'] / 1e6:.0f} | {rss['convert_hf_to_gguf'] / 1e6:.0f} | {r['bytes'] / 1e6:.1f} | "
              f"{'yes' if same else 'no'} |")
    print("\n| model | F32 max rel | F16 max rel | Q8_0 max rel | Q8_0 cosine | F16 vs class-token-last order |")
    print("|---|---|---|---|---|---|")
    for name, r in result["agreement"].items():
        cl = r["f16"].get("max_rel_cls_last_order")
        print(f"| {name} | {r['f32']['max_rel']:.1e} | {r['f16']['max_rel']:.1e} | {r['q8_0']['max_rel']:.1e} | "
              f"{r['q8_0']['cosine']:.5f} | {'-' if cl is None else f'{cl:.1e}'} |")


if __name__ == "__main__":
    main()
