"""Float weights on a Q4_0 grid with scales llama.cpp would not pick (a QAT stand-in) convert to
Q4_0 blocks that llama.cpp decodes to the same floats; ordinary weights keep llama.cpp's bytes."""

import numpy as np
import pytest
import torch

from quantkit import api
from quantkit.models.gguf import GGUFSource, write_gguf_file
from quantkit.quant.qat import qat_blocks
from helpers.ggml_reference import ggml_dequantize, ggml_quantize

pytestmark = pytest.mark.usefixtures("one_thread")


def project(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Blocks [n, 32] onto Q4_0 grids whose largest magnitude sits on code 7, 6 or 5 (fp16 d)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(5, 8, (x.shape[0], 1), generator=g).float()
    d = (x.abs().amax(1, keepdim=True) / k).half().float()
    return torch.clamp(torch.round(x / d), -8, 7) * d


def test_projected_blocks_are_reproduced_bit_for_bit():
    x = project(torch.randn(4096, 32, generator=torch.Generator().manual_seed(1)))
    data, st = qat_blocks(x)
    back = torch.from_numpy(ggml_dequantize("q4_0", data.numpy(), 32))
    assert torch.equal(back, x) and st.exact == st.blocks == 4096 and st.near == 0
    theirs = ggml_dequantize("q4_0", ggml_quantize("q4_0", x.numpy()), 32)
    llama_exact = int((torch.from_numpy(theirs) == x).all(1).sum())
    assert st.llama_exact == llama_exact < 0.05 * st.blocks    # llama.cpp re-rounds almost every block


def test_bf16_stored_qat_blocks_are_near_and_better_than_llama_cpp():
    x = project(torch.randn(4096, 32, generator=torch.Generator().manual_seed(2))).bfloat16().float()
    data, st = qat_blocks(x)
    ours = torch.from_numpy(ggml_dequantize("q4_0", data.numpy(), 32))
    theirs = torch.from_numpy(ggml_dequantize("q4_0", ggml_quantize("q4_0", x.numpy()), 32))
    assert st.exact + st.near == st.blocks
    assert (ours - x).abs().amax(1).le(2 ** -7 * x.abs().amax(1)).all()
    assert ((ours - x) ** 2).sum() * 20 < ((theirs - x) ** 2).sum()


def test_ordinary_weights_keep_llama_cpp_bytes():
    x = torch.randn(4096, 32, generator=torch.Generator().manual_seed(3))
    data, st = qat_blocks(x)
    assert np.array_equal(data.numpy(), ggml_quantize("q4_0", x.numpy())) and st.exact == st.near == 0


def test_qat_export_end_to_end(gptq_llama_dir, tmp_path, capsys):
    from quantkit.cli import main
    f32 = tmp_path / "f32.gguf"
    api.quantize(str(gptq_llama_dir), str(f32), format="gguf:f32", show_progress=False)
    qat = tmp_path / "qat-f32.gguf"
    with GGUFSource(str(f32)) as src:
        plan = [(t.name, t.shape, "f32") for t in src.tensors()]
        vals = {}
        for t in src.tensors():
            v = src.load(t.name)
            if len(t.shape) == 2 and t.name.startswith("blk."):
                v = project(v.reshape(-1, 32), len(vals)).reshape(v.shape)
            vals[t.name] = v.numpy().astype(np.float32)
        write_gguf_file(str(qat), src.spec.arch, src.metadata, plan, lambda n: vals[n].view(np.uint8))
    out = tmp_path / "q4_0.gguf"
    assert main(["quantize", str(qat), "--format", "gguf:q4_0", "--qat", "--pure", "--json", "-o", str(out)]) == 0
    import json
    rep = json.loads(capsys.readouterr().out)
    blk = [n for n in vals if n.startswith("blk.") and vals[n].ndim == 2]
    assert all(rep["tensors"][n]["path"] == "qat" for n in blk)
    with GGUFSource(str(out)) as g:
        for n in blk:
            raw, typ = g.raw(n)
            assert typ == "q4_0"
            got = ggml_dequantize("q4_0", np.asarray(raw), vals[n].shape[-1])
            assert np.array_equal(got, vals[n]), n
    n_blk = sum(vals[n].size // 32 for n in blk)
    assert rep["blocks"] > n_blk and rep["blocks_exact_share"] >= n_blk / rep["blocks"]
    assert rep["llama_cpp_exact_share"] < 0.1
