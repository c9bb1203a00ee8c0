"""A GGUF rebuilt as a transformers model (runtimes.torch.model_from_gguf through models.gguf_hf)
for every architecture quantkit converts: the F32 GGUF of a tiny random model of each
(the session's arch_dirs / arch_f32 fixtures) gives transformers' logits on the original
Hugging Face directory, mixtures of experts included (their fused expert parameters rebuilt
from the stacked GGUF tensors); a GGUF of another architecture is one line naming it and the
supported ones, for the torch runtime and for GPTQ from the file."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from quantkit.models.gguf import GGUFSource, write_gguf_file
from quantkit.models.source import MetaValue
from quantkit.runtimes.torch import model_from_gguf
from quantkit.util.errors import QuantkitError
from helpers.cli import assert_one_line, no_partial, run_cli
from helpers.tiny_models import ARCH_TOKENIZERS

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = sorted(ARCH_TOKENIZERS)      # the 14 architectures build_arch_model makes
# both sides run transformers' own modules in float32 on the same weights: only the config
# rebuilt from the GGUF could make them differ (measured 0 for every architecture)
RTOL = 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_logits_equal_transformers_on_the_hf_directory(arch_dirs, arch_f32, kind):
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(str(arch_dirs(kind)), dtype=torch.float32,
                                               attn_implementation="eager").eval()
    got = model_from_gguf(str(arch_f32(kind)))
    # Mistral without a sliding window is written as llama, and comes back as Llama
    assert type(got).__name__ == ("LlamaForCausalLM" if kind == "mistral" else type(ref).__name__)
    ids = torch.tensor([[(7 * i + 3) % 500 + 5 for i in range(24)]])     # past gemma2/3's sliding window of 4
    with torch.no_grad():
        want, have = ref(input_ids=ids).logits, got(input_ids=ids).logits
    scale = float(want.abs().max())
    assert scale > 1.0, "random model too flat to prove anything"
    err = float((have - want).abs().max()) / scale
    assert err <= RTOL, f"{kind}: max |diff| / max |logit| = {err:.2e}"


def test_streaming_skeleton_is_unfilled_and_reads_one_expert(arch_f32):
    """load=False: the model is built without reading a weight; the reader gives one expert's
    matrix as a checkpoint stores it, equal to that expert's slice of the fused parameter."""
    from quantkit.models.gguf_hf import hf_tensor_reader
    path = str(arch_f32("qwen3moe"))
    full = model_from_gguf(path)
    skeleton, arch = model_from_gguf(path, load=False)
    assert arch.key == "qwen3moe" and type(skeleton) is type(full)
    with GGUFSource(path) as src:
        read = hf_tensor_reader(src, arch)
        fused = full.model.layers[1].mlp.experts.gate_up_proj
        up = read("model.layers.1.mlp.experts.2.up_proj.weight")
        assert torch.equal(up, fused[2, fused.shape[1] // 2:])
        assert read("model.layers.1.mlp.experts.gate_up_proj") is None      # stacked by quant.moe
        assert read("model.layers.1.mlp.experts.9.up_proj.weight") is None  # 4 experts


def _relabelled(src_path, out, arch: str) -> str:
    """The GGUF at src_path with general.architecture (and its keys) renamed to `arch`."""
    with GGUFSource(str(src_path)) as g:
        meta = {(k.replace("llama.", f"{arch}.", 1) if k.startswith("llama.") else k): v
                for k, v in g.metadata.items() if k != "general.architecture"}
        meta["general.architecture"] = MetaValue(arch, meta["general.name"].vtype)
        tensors = [(t.name, t.shape, t.type) for t in g.tensors()]
        write_gguf_file(str(out), arch, meta, tensors, lambda n: np.asarray(g.raw(n)[0]).view(np.uint8))
    return str(out)


def test_other_architecture_is_one_line(arch_f32, tmp_path, capsys):
    bad = _relabelled(arch_f32("mistral"), tmp_path / "sc2.gguf", "starcoder2")
    needles = ("'starcoder2'", "not rebuilt in transformers", "supported:", "gemma3", "llama", "qwen3moe", "smollm3")
    with pytest.raises(QuantkitError) as e:
        model_from_gguf(bad)
    assert_one_line(str(e.value), *needles)
    out = tmp_path / "out"
    out.mkdir()
    code, err = run_cli(["quantize", bad, "--format", "gguf:q4_0", "--method", "gptq", "--nsamples", "2",
                         "--seqlen", "32", "-o", str(out / "x.gguf")], capsys)
    assert code != 0
    assert_one_line(err, *needles)
    assert os.listdir(out) == [] and no_partial(out)
