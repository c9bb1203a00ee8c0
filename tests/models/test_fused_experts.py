"""Mixtures of experts whose experts are stored fused (transformers 5's `mlp.experts.gate_up_proj`
[E, 2 * ff, hidden] and `mlp.experts.down_proj` [E, hidden, ff], as its
save_pretrained(save_original_format=False) writes them): transformers loads the test layout as
the per-expert checkpoint, and quantkit reads it into the very bytes the per-expert checkpoint
gives (F32 GGUF, GPTQ Q4_0, a K-quant mix), with the same inspect and plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quantkit import api
from helpers.tiny_models import fuse_experts

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.tensor([[3, 17, 99, 250, 5, 8, 300, 41, 7, 120]])


def _fused(arch_dirs, tmp_path: Path, kind: str, prefix: str = "mlp") -> Path:
    """The fused copy, in a directory of the per-expert one's name (the GGUF's general.name)."""
    (tmp_path / "fused").mkdir()
    return fuse_experts(arch_dirs(kind), tmp_path / "fused" / kind, prefix)


@pytest.mark.parametrize("kind,prefix", [("qwen3moe", "mlp"), ("mixtral", "mlp"), ("mixtral", "block_sparse_moe")])
def test_transformers_loads_it_and_f32_gguf_is_byte_identical(arch_dirs, arch_f32, tmp_path, kind, prefix):
    """The fused checkpoint holds no per-expert tensor; transformers 5 loads it into the same
    parameters as the per-expert one (nothing missing or unexpected) with the same logits; its
    F32 GGUF is the per-expert checkpoint's, byte for byte."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    d = _fused(arch_dirs, tmp_path, kind, prefix)
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        assert not [n for n in names if ".experts.0." in n]
        assert tuple(f.get_tensor(f"model.layers.1.{prefix}.experts.gate_up_proj").shape)[0] == 4
    ref = AutoModelForCausalLM.from_pretrained(str(arch_dirs(kind)), dtype=torch.float32).eval()
    model, info = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    a, b = ref.state_dict(), model.eval().state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        la, lb = ref(IDS).logits, model(IDS).logits
    assert torch.allclose(la, lb, rtol=0, atol=1e-5 * float(la.abs().max()))
    out = tmp_path / "f32.gguf"
    api.quantize(str(d), out, format="gguf:f32", show_progress=False)
    assert out.read_bytes() == arch_f32(kind).read_bytes()


@pytest.mark.parametrize("kind", ["qwen3moe", "mixtral"])
def test_gptq_q4_0_is_byte_identical(arch_dirs, tmp_path, kind):
    """GPTQ Q4_0 (block-wise streaming, routed calibration of the experts) from the fused
    checkpoint writes the per-expert checkpoint's bytes."""
    d = _fused(arch_dirs, tmp_path, kind)
    a, b = tmp_path / "per-expert.gguf", tmp_path / "fused.gguf"
    for src, out in ((arch_dirs(kind), a), (d, b)):
        api.quantize(str(src), out, format="gguf:q4_0", method="gptq", nsamples=2, seqlen=64, show_progress=False)
    assert a.read_bytes() == b.read_bytes()


def test_kquant_mix_inspect_and_plan_match_per_expert(arch_dirs, tmp_path):
    """Mixtral fused as transformers 5 saves it (router renamed to mlp.gate): the Q4_K_M mix is
    the per-expert checkpoint's bytes; inspect and plan (from config.json and the safetensors
    header) report the same tensors, parameters and memory."""
    ref = arch_dirs("mixtral")
    d = _fused(arch_dirs, tmp_path, "mixtral")
    a, b = tmp_path / "per-expert.gguf", tmp_path / "fused.gguf"
    api.quantize(str(ref), a, format="gguf:q4_k_m", show_progress=False)
    api.quantize(str(d), b, format="gguf:q4_k_m", show_progress=False)
    assert a.read_bytes() == b.read_bytes()
    ia, ib = api.inspect(str(ref)), api.inspect(str(d))
    assert ia.pop("path") != ib.pop("path") and ia == ib
    assert any(t["name"] == "blk.1.ffn_up_exps.weight" and t["shape"] == [4, 512, 256] for t in ib["tensors"])
    pa, pb = (json.loads(json.dumps(api.plan(str(p)).to_dict()).replace(str(p), "<dir>")) for p in (ref, d))
    assert pa == pb
    assert pa["formats"] and pa["formats"][0]["memory"]["weights"] > 0


def test_config_contradicting_a_fused_tensor_is_one_line(arch_dirs, tmp_path, capsys):
    """moe_intermediate_size that the fused tensors contradict: one line naming the tensor, the
    shape config.json implies and the shape found, nothing written; the per-expert checkpoint
    with the same config is refused the same way, naming an expert's tensor."""
    from helpers.cli import assert_one_line, no_partial, run_cli
    fused = _fused(arch_dirs, tmp_path, "qwen3moe")
    per_expert = tmp_path / "per-expert"
    import shutil
    shutil.copytree(arch_dirs("qwen3moe"), per_expert)
    for d in (fused, per_expert):
        cfg = json.loads((d / "config.json").read_text())
        cfg["moe_intermediate_size"] = 128
        (d / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    out.mkdir()
    capsys.readouterr()
    code, err = run_cli(["quantize", str(fused), "--format", "gguf:f32", "-o", str(out / "x.gguf")], capsys)
    assert code != 0
    assert_one_line(err, "tensor model.layers.0.mlp.experts.down_proj has shape [4, 256, 256] but config.json "
                    "implies [4, 256, 128]", str(fused / "config.json"))
    code, err = run_cli(["quantize", str(per_expert), "--format", "gguf:f32", "-o", str(out / "x.gguf")], capsys)
    assert code != 0
    assert_one_line(err, "tensor model.layers.0.mlp.experts.0.down_proj.weight has shape [256, 256] but config.json "
                    "implies [256, 128]", str(per_expert / "config.json"))
    assert no_partial(out) and not list(out.iterdir())


def test_gpu_checkpoint_is_written_per_expert_and_identical(arch_dirs, tmp_path):
    """compressed-tensors (round to nearest) from the fused checkpoint: every file equals the
    per-expert checkpoint's, the experts written one linear each under transformers' save names."""
    from safetensors import safe_open
    d = _fused(arch_dirs, tmp_path, "qwen3moe")
    a, b = tmp_path / "per-expert-ct", tmp_path / "fused-ct"
    api.quantize_gpu(str(arch_dirs("qwen3moe")), a, format="compressed-tensors:w4g32+rtn", show_progress=False)
    api.quantize_gpu(str(d), b, format="compressed-tensors:w4g32+rtn", show_progress=False)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    names = [n for f in b.glob("*.safetensors") for n in safe_open(str(f), "pt").keys()]
    assert "model.layers.1.mlp.experts.3.down_proj.weight_packed" in names
    assert not [n for n in names if "gate_up_proj" in n]
