"""Vision-language models: the language model as a GGUF, the vision tower + projector as llama.cpp's
mmproj file, and the pair loaded in llama.cpp's multimodal runtime (libmtmd) against transformers.

Bounds (max |llama.cpp - transformers| / max |transformers| over one image's 16 x 256 embeddings):
F32 mmproj 1e-3 and F16 2e-3 (ggml's tanh GELU against transformers' erf GELU in the projector,
and F16 weights; measured 3.4e-4 and 4.6e-4), Q8_0 3e-2 (measured 8e-3).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from helpers.cli import assert_one_line, no_partial, run_cli
from helpers.vision_models import (IMAGE_MEAN, IMAGE_STD, build_gemma3_vlm, build_llava, clip_cls_last_features,
                                   pixel_values, sample_image)

from quantkit import api
from quantkit.models.vision import VisionSource
from quantkit.quant.mmproj import write_mmproj
from quantkit.runtimes.mtmd import MtmdPair

BOUNDS = {"f32": 1e-3, "f16": 2e-3, "q8_0": 3e-2}


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """(CLIP LLaVA, SigLIP LLaVA) directories sharing one tokenizer."""
    root = tmp_path_factory.mktemp("vlm")
    clip = build_llava(root, "llava-clip")
    siglip = build_llava(root, "llava-siglip", "siglip_vision_model", tokenizer_from=clip)
    return clip, siglip


def _hf(d):
    import transformers as tf
    return tf.LlavaForConditionalGeneration.from_pretrained(str(d)).eval()


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def test_llava_mmproj_embedding_equals_transformers(llava, tmp_path, capsys):
    """SigLIP LLaVA through the CLI: lm.gguf + mmproj-lm.gguf; mtmd's image embedding equals
    transformers' get_image_features at F32, F16 and Q8_0."""
    _, d = llava
    out = tmp_path / "lm.gguf"
    code, err = run_cli(["quantize", str(d), "--format", "gguf:f32", "-o", str(out), "--mmproj-type", "f32"], capsys)
    assert code == 0, err
    paths = {"f32": tmp_path / "mmproj-lm.gguf"}
    assert paths["f32"].is_file()
    with VisionSource(d) as src:
        for ft in ("f16", "q8_0"):
            paths[ft] = tmp_path / f"mmproj-{ft}.gguf"
            write_mmproj(src, paths[ft], ft, show_progress=False)
    img = sample_image(32)
    model = _hf(d)
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=pixel_values(img)).pooler_output[0].numpy()
    assert ref.shape == (16, 256)
    for ft, path in paths.items():
        with MtmdPair(str(out), str(path)) as pair:
            emb = pair.image_embedding(img)
        assert emb.shape == ref.shape
        assert _rel(emb, ref) < BOUNDS[ft], (ft, _rel(emb, ref))
    # a different image gives a different embedding (the pixels reach the tower)
    with MtmdPair(str(out), str(paths["f32"])) as pair:
        other = pair.image_embedding(sample_image(32, seed=1)[::-1].copy())
    assert _rel(other, ref) > 10 * BOUNDS["f32"]


def test_llava_clip_mmproj_embedding(llava, tmp_path):
    """CLIP LLaVA: the file holds transformers' weights and order (what llama.cpp's legacy
    converter writes); mtmd's embedding equals transformers' projector output evaluated in the
    order this llama.cpp's graph uses (class token last), or, once llama.cpp fixes that, the plain
    get_image_features."""
    d, _ = llava
    lm, mm = tmp_path / "lm.gguf", tmp_path / "mm.gguf"
    res = api.quantize(str(d), str(lm), format="gguf:f32", mmproj=str(mm), mmproj_type="f32", show_progress=False)
    assert res.mmproj == str(mm)
    img = sample_image(32)
    model = _hf(d)
    px = pixel_values(img)
    with torch.no_grad():
        hf = model.get_image_features(pixel_values=px).pooler_output[0].numpy()
    cls_last = clip_cls_last_features(model, px)
    with MtmdPair(str(lm), str(mm)) as pair:
        emb = pair.image_embedding(img)
    assert min(_rel(emb, hf), _rel(emb, cls_last)) < BOUNDS["f32"], (_rel(emb, hf), _rel(emb, cls_last))


def test_mmproj_metadata_and_types(llava, tmp_path):
    """The keys clip.cpp reads, gguf-py's MMPROJ tensor names, and convert_hf_to_gguf's type rules."""
    d, _ = llava
    path = tmp_path / "mmproj.gguf"
    with VisionSource(d) as src:
        rep = write_mmproj(src, path, "f16", show_progress=False)
    r = GGUFReader(str(path))

    def val(key):
        f = r.fields[key]
        if len(f.data) == 1 and f.types[0].name == "STRING":
            return bytes(f.parts[f.data[0]]).decode()
        vals = [f.parts[i].tolist()[0] for i in f.data]
        return vals if len(vals) > 1 or f.types[0].name == "ARRAY" else vals[0]

    assert val("general.architecture") == "clip" and val("general.type") == "mmproj"
    assert val("clip.projector_type") == "mlp" and val("clip.has_vision_encoder") is True
    assert val("clip.vision.projection_dim") == 256 and val("clip.vision.embedding_length") == 64
    assert val("clip.vision.image_size") == 32 and val("clip.vision.patch_size") == 8
    assert val("clip.vision.block_count") == 1 and val("clip.vision.feature_layer") == [1]
    np.testing.assert_allclose(val("clip.vision.image_mean"), IMAGE_MEAN, rtol=1e-6)
    np.testing.assert_allclose(val("clip.vision.image_std"), IMAGE_STD, rtol=1e-6)
    assert "clip.use_gelu" not in r.fields            # CLIP's quick GELU is clip.cpp's default
    types = {t.name: t.tensor_type.name.lower() for t in r.tensors}
    assert types == rep.types
    assert set(types) == {
        "v.class_embd", "v.patch_embd.weight", "v.position_embd.weight", "v.pre_ln.weight", "v.pre_ln.bias",
        *(f"v.blk.0.{t}.{k}" for t in ("attn_q", "attn_k", "attn_v", "attn_out", "ffn_up", "ffn_down", "ln1", "ln2")
          for k in ("weight", "bias")),
        "mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias"}
    assert types["v.patch_embd.weight"] == "f16" and types["v.position_embd.weight"] == "f32"
    assert types["v.blk.0.attn_q.weight"] == "f16" and types["v.blk.0.attn_q.bias"] == "f32"
    assert types["v.blk.0.ln1.weight"] == "f32" and types["mm.2.weight"] == "f16"
    # the second (last) CLIP layer is never run for vision_feature_layer -2: not written
    assert not any(n.startswith("v.blk.1.") for n in types)


def test_llava_generation_with_image(llava, tmp_path, capsys):
    """A prompt holding an image, evaluated by mtmd_helper_eval_chunks, then greedy decoding: at F32
    the continuation equals transformers' generate on the same ids and pixels; a Q4_K_M language
    model with the default F16 projector loads and generates."""
    _, d = llava
    img = sample_image(32)
    lm, mm = tmp_path / "lm-f32.gguf", tmp_path / "mm-f32.gguf"
    api.quantize(str(d), str(lm), format="gguf:f32", mmproj=str(mm), mmproj_type="f32", show_progress=False)
    with MtmdPair(str(lm), str(mm)) as pair:
        gen = pair.generate(f"The picture {pair.marker()} shows", img, max_tokens=8)
    assert gen.image_tokens == 16 and gen.prompt_positions == len(gen.prompt_tokens)
    assert len(gen.tokens) == 8
    model = _hf(d)
    ids = torch.tensor([[model.config.image_token_index if t < 0 else t for t in gen.prompt_tokens]])
    with torch.no_grad():
        hf = model.generate(input_ids=ids, pixel_values=pixel_values(img), max_new_tokens=8, do_sample=False,
                            attention_mask=torch.ones_like(ids))
    assert hf[0, ids.shape[1]:].tolist() == gen.tokens

    q = tmp_path / "lm-q4km.gguf"
    code, err = run_cli(["quantize", str(d), "--format", "gguf:q4_k_m", "-o", str(q)], capsys)
    assert code == 0, err
    r = GGUFReader(str(tmp_path / "mmproj-lm-q4km.gguf"))
    assert {t.tensor_type.name for t in r.tensors if t.name == "mm.0.weight"} == {"F16"}
    with MtmdPair(str(q), str(tmp_path / "mmproj-lm-q4km.gguf")) as pair:
        g2 = pair.generate(f"The picture {pair.marker()} shows", img, max_tokens=8)
    assert g2.image_tokens == 16 and len(g2.tokens) == 8


def test_unsupported_vision_tower_names_text_only(llava, tmp_path, capsys):
    """A vision tower llama.cpp cannot run: one line naming it and --text-only, exit 2, nothing
    written; with --text-only the language model alone is written and loads."""
    src, _ = llava
    d = tmp_path / "odd-vlm"
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["vision_config"]["model_type"] = "dinov2"
    (d / "config.json").write_text(json.dumps(cfg))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "lm.gguf"
    code, err = run_cli(["quantize", str(d), "--format", "gguf:q8_0", "-o", str(out)], capsys)
    assert code == 2
    assert_one_line(err, "dinov2", "--text-only")
    assert no_partial(out_dir)
    code, err = run_cli(["quantize", str(d), "--format", "gguf:q8_0", "-o", str(out), "--text-only"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(out_dir)) == ["lm.gguf"]
    r = GGUFReader(str(out))
    assert not any(t.name.startswith(("v.", "mm.")) for t in r.tensors)
    assert any(t.name == "blk.1.ffn_down.weight" for t in r.tensors)


def test_mmproj_flags_refused_in_one_line(llava, tmp_path, capsys):
    """--mmproj with --text-only, and --mmproj equal to -o: one line each, nothing written."""
    d, _ = llava
    out = tmp_path / "lm.gguf"
    code, err = run_cli(["quantize", str(d), "--format", "gguf:q8_0", "-o", str(out), "--text-only",
                         "--mmproj", str(tmp_path / "m.gguf")], capsys)
    assert code == 2
    assert_one_line(err, "--text-only")
    code, err = run_cli(["quantize", str(d), "--format", "gguf:q8_0", "-o", str(out), "--mmproj", str(out)], capsys)
    assert code == 2
    assert_one_line(err, "--mmproj")
    assert no_partial(tmp_path)


def test_inspect_names_the_vision_tower(llava, capsys):
    clip, siglip = llava
    info = api.inspect(str(siglip))
    assert info["vision"]["tower"] == "siglip_vision_model" and info["vision"]["projector"] == "mlp"
    assert info["vision"]["mmproj"] is True and info["vision"]["image_tokens"] == 16
    assert info["architecture"]["arch"] == "llama" and info["architecture"]["n_embd"] == 256
    from quantkit.cli import main
    assert main(["inspect", str(clip), "--tensors", "1"]) == 0
    text = capsys.readouterr().out
    assert "vision tower  clip_vision_model + mlp projector (llava)" in text and "-> 16 tokens" in text


def test_plan_counts_the_mmproj_file_exactly(llava, tmp_path):
    """The planner's mmproj bytes (from config.json alone) are the tensor bytes of the F16 file
    quant.mmproj writes, and the context holds the image's tokens."""
    for d in llava:
        with VisionSource(d) as src:
            write_mmproj(src, tmp_path / "m.gguf", "f16", show_progress=False)
        written = sum(int(t.n_bytes) for t in GGUFReader(str(tmp_path / "m.gguf")).tensors)
        p = api.plan(str(d), formats=["q4_k_m"], n_ctx=128)
        assert p.model.vision.mmproj_bytes == written
        assert p.n_ctx == 128 + 16
        # the vision tensors are planned as the mmproj file, not as language-model tensors
        assert not any("vision" in t.name or "projector" in t.name for t in p.model.tensors)


def test_gemma3_vision_embedding_and_generation(tmp_path_factory, tmp_path):
    """Gemma3ForConditionalGeneration: SigLIP + average pool + soft-embedding norm + projection as an
    mmproj of projector type gemma3; mtmd's image embedding equals transformers' get_image_features,
    and a prompt with the image (<start_of_image> ... <end_of_image> around it) generates."""
    import transformers as tf

    d = build_gemma3_vlm(tmp_path_factory.mktemp("gemma3vlm"))
    lm = tmp_path / "lm.gguf"
    res = api.quantize(str(d), str(lm), format="gguf:f32", mmproj_type="f32", show_progress=False)
    r = GGUFReader(res.mmproj)
    assert bytes(r.fields["clip.projector_type"].parts[-1]).decode() == "gemma3"
    assert int(r.fields["clip.vision.projector.scale_factor"].parts[-1][0]) == 2     # 4x4 patches -> 2x2
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["mm.input_projection.weight"] == "F16" and types["v.patch_embd.weight"] == "F32"
    assert "v.post_ln.weight" in types and "mm.soft_emb_norm.weight" in types
    img = sample_image(32)
    model = tf.Gemma3ForConditionalGeneration.from_pretrained(str(d)).eval()
    with torch.no_grad():
        out = model.get_image_features(pixel_values=pixel_values(img))
        ref = getattr(out, "pooler_output", out)[0].numpy()
    with MtmdPair(str(lm), res.mmproj) as pair:
        emb = pair.image_embedding(img)
        gen = pair.generate(f"Look: {pair.marker()} it is", img, max_tokens=6)
    assert emb.shape == ref.shape == (4, 256)
    assert _rel(emb, ref) < BOUNDS["f32"], _rel(emb, ref)
    assert gen.image_tokens == 4 and len(gen.tokens) == 6
    vocab = json.loads((d / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in vocab}
    i = gen.prompt_tokens.index(-1)
    assert gen.prompt_tokens[i - 1] == ids["<start_of_image>"] and gen.prompt_tokens[i + 4] == ids["<end_of_image>"]


def test_llava_gptq_gguf_with_mmproj(llava, tmp_path, capsys):
    """GPTQ-compensated GGUF of a vision-language model: the language model is calibrated on its
    own (the checkpoint's language_model.* tensors), the projector file is written beside it at
    --mmproj-type, and the pair loads and generates in mtmd."""
    _, d = llava
    out = tmp_path / "lm-gptq.gguf"
    code, err = run_cli(["quantize", str(d), "--format", "gguf:q4_0+gptq", "--nsamples", "2", "--seqlen", "32",
                         "-o", str(out), "--mmproj-type", "q8_0"], capsys)
    assert code == 0, err
    mm = tmp_path / "mmproj-lm-gptq.gguf"
    assert {t.tensor_type.name for t in GGUFReader(str(mm)).tensors if t.name == "mm.2.weight"} == {"Q8_0"}
    assert {t.tensor_type.name for t in GGUFReader(str(out)).tensors if t.name == "blk.0.attn_q.weight"} == {"Q4_0"}
    with MtmdPair(str(out), str(mm)) as pair:
        g = pair.generate(f"See {pair.marker()} here", sample_image(32), max_tokens=4)
    assert g.image_tokens == 16 and len(g.tokens) == 4
