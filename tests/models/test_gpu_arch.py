"""GPU checkpoints of every dense architecture: a tiny random Hugging Face model of each (hidden
256, 2 layers, the family's tokenizer kind) quantized by GPTQ (4 bits, groups of 32, 4 x 64
calibration tokens) to compressed-tensors loads in transformers + compressed-tensors with the
logits of quantkit's own dequantized model (the float model with each quantized linear's W
replaced by its dequantized W), and to GPTQ format holds, tensor for tensor, that same model.

transformers loads GPTQ-format checkpoints only through optimum + gptqmodel (not installed), so
the GPTQ directory is decoded with quantkit's v1 unpacker (checked against AutoGPTQ's own layout
in tests/quant/test_gpu_formats.py) and compared exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quantkit.models.gpu_formats import GPUFormatConfig, dequantize_compressed, dequantize_gptq
from quantkit.quant.checkpoint import export_gpu_checkpoint
from helpers.quantized_ckpt import assert_loads_as_quantized, checkpoint_tensors

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = ["llama3", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi2", "phi3", "glm4", "olmo2", "granite",
         "smollm3"]
BITS, GROUP = 4, 32
# transformers' decompressed model against quantkit's dequantized one: the same float32 weights,
# so only the order of float32 sums may differ: 1e-5 of max |logit| (measured <= ~1e-6).
LOGIT_RTOL = 1e-5


@pytest.fixture(scope="module")
def exported(arch_dirs, tmp_path_factory):
    """kind -> (model dir, {format: GPUExportResult}), built once per architecture; each result
    keeps quantkit's dequantized model (keep_model)."""
    root = tmp_path_factory.mktemp("gpu-arch")
    done: dict[str, tuple[Path, dict]] = {}

    def get(kind: str):
        if kind not in done:
            d = arch_dirs(kind)
            res = {fmt: export_gpu_checkpoint(str(d), str(root / f"{kind}-{fmt}"),
                                              GPUFormatConfig(fmt, bits=BITS, group_size=GROUP, method="gptq"),
                                              nsamples=4, seqlen=64, keep_model=True, show_progress=False)
                   for fmt in ("compressed-tensors", "gptq")}
            done[kind] = (d, res)
        return done[kind]

    return get


def _linears(model) -> list[str]:
    layers = model.model.layers
    return [f"model.layers.{i}.{n}" for i, layer in enumerate(layers) for n, m in layer.named_modules()
            if isinstance(m, torch.nn.Linear)]


@pytest.mark.parametrize("kind", KINDS)
def test_compressed_tensors_loads_with_dequantized_logits(exported, kind):
    from transformers import AutoModelForCausalLM
    d, res = exported(kind)
    r = res["compressed-tensors"]
    out = Path(r.output)
    ours = r.model.eval()
    names = _linears(ours)
    assert r.n_linear == len(names) > 0
    qc = json.load(open(out / "config.json"))["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    t = checkpoint_tensors(out)
    for p in names:                      # every decoder linear is stored packed and decodes to ours
        assert f"{p}.weight" not in t and t[f"{p}.weight_packed"].dtype == torch.int32, p
        assert torch.equal(dequantize_compressed(t, p, BITS, GROUP), ours.get_submodule(p).weight), p

    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    for p in names:                      # compressed-tensors runs each linear from the packed codes
        assert hasattr(theirs.get_submodule(p), "weight_packed"), p
    assert_loads_as_quantized(theirs, ours, ref, LOGIT_RTOL, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_gptq_checkpoint_holds_the_dequantized_model(exported, kind):
    d, res = exported(kind)
    r = res["gptq"]
    out = Path(r.output)
    ours = r.model
    cfg = json.load(open(out / "config.json"))
    assert cfg["quantization_config"]["quant_method"] == "gptq" and cfg["torch_dtype"] == "float16"
    t = checkpoint_tensors(out)
    names = _linears(ours)
    assert r.n_linear == len(names) > 0
    for p in names:
        assert torch.equal(dequantize_gptq(t, p, BITS), ours.get_submodule(p).weight), p
    # every other tensor of the model, in fp16; the head is absent only where it is tied
    state = ours.state_dict()
    quantized = {p + ".weight" for p in names}
    for name, v in state.items():
        if name in quantized:
            continue
        if name == "lm_head.weight" and ours.config.tie_word_embeddings:
            assert name not in t
            continue
        assert name in t, name
        assert torch.equal(t[name].float(), v.half().float()), name
