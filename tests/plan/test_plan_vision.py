"""The planner on vision-language configs: the mmproj file and image encoder in every total, the
images' tokens in the context; from config.json alone."""

from __future__ import annotations

import json

import pytest

from quantkit import api

# Gemma-3-4B-it's config.json, the keys the planner reads
GEMMA3_4B = {
    "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "mm_tokens_per_image": 256,
    "text_config": {"model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240,
                    "num_hidden_layers": 34, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                    "sliding_window": 1024, "vocab_size": 262208, "max_position_embeddings": 131072,
                    "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "query_pre_attn_scalar": 256},
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "image_size": 896,
                      "intermediate_size": 4304, "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14, "vision_use_head": False},
}


@pytest.fixture
def gemma3_dir(tmp_path):
    d = tmp_path / "gemma-3-4b-it"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(GEMMA3_4B))
    return d


def test_gemma3_vision_plan(gemma3_dir):
    p = api.plan(str(gemma3_dir), formats=["q4_k_m"], n_ctx=2048, images=2)
    v = p.model.vision
    assert (v.kind, v.projector, v.image_tokens) == ("siglip", "gemma3", 256)
    # SigLIP-So400m (27 layers) + the 1152 x 2560 projection: 419.8 M parameters; as the F16 file
    # convert_hf_to_gguf.py --mmproj writes (embeddings F32, matrices F16): 851.2 MB
    assert v.n_params == 419_816_304
    assert v.mmproj_bytes == 851_226_048
    assert p.n_ctx == 2048 + 2 * 256
    row = p.rows[0]
    assert row.memory.vision == v.mmproj_bytes + v.compute_bytes
    assert row.memory.total == (row.memory.weights + row.memory.kv + row.memory.compute + row.memory.output
                                + row.memory.overhead_cpu + row.memory.vision)
    assert any(a.startswith("vision: a siglip tower + gemma3 projector") for a in p.assumptions)
    text_only = api.plan(str(gemma3_dir), formats=["q4_k_m"], n_ctx=2048, images=0)
    assert text_only.n_ctx == 2048 and text_only.rows[0].memory.kv < row.memory.kv


def test_unsupported_tower_plans_the_language_model(gemma3_dir):
    cfg = dict(GEMMA3_4B, vision_config=dict(GEMMA3_4B["vision_config"], model_type="dinov2"))
    (gemma3_dir / "config.json").write_text(json.dumps(cfg))
    p = api.plan(str(gemma3_dir), formats=["q4_k_m"], n_ctx=2048)
    assert p.model.vision is None and p.n_ctx == 2048 and p.rows[0].memory.vision == 0
    assert p.model.arch == "gemma3" and p.model.n_layer == 34


def test_plan_cli_images(gemma3_dir, capsys):
    from quantkit.cli import main
    assert main(["plan", str(gemma3_dir), "--format", "q8_0", "--ctx", "100", "--images", "3", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["options"]["n_ctx"] == 100 + 3 * 256 and d["options"]["images"] == 3
    assert d["model"]["vision"]["mmproj_bytes"] == 851_226_048
    assert d["formats"][0]["memory"]["vision"] > d["model"]["vision"]["mmproj_bytes"]
