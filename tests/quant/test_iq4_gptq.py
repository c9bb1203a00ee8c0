"""GPTQ onto IQ4_NL and IQ4_XS: with the scale search on, a block's scales are llama.cpp's
importance-weighted search (with an identity Hessian and no damping, llama.cpp's own bytes given
an all-ones importance matrix); on correlated inputs GPTQ beats round-to-nearest even when that
uses the Hessian's diagonal as its importance matrix, by a stated factor."""

import numpy as np
import pytest
import torch

from helpers.ggml_reference import ggml_quantize
from quantkit.codecs.registry import gptq_types, qtype
from quantkit.quant.gptq import GPTQConfig, accumulate_hessian, new_hessian, quantize_weight

TYPES = ["iq4_nl", "iq4_xs"]


def _w(out_f=48, in_f=512, seed=0):
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("qt", TYPES)
def test_identity_hessian_with_search_is_llama_cpp_with_an_imatrix(qt):
    W = _w(seed=1)
    W[0, :256] = 0.0
    W[1, 40] = 3.0
    assert qt in gptq_types()
    res = quantize_weight(W, torch.eye(512), qt, GPTQConfig(damp=0.0))
    ref = ggml_quantize(qt, W.numpy(), imatrix=np.ones(512, dtype=np.float32))
    assert np.array_equal(res.weight.to_bytes().numpy(), ref)
    assert torch.equal(res.dequantized, qtype(qt).dequantize(torch.from_numpy(ref), W.shape))


def _correlated(in_f=512, n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(in_f, in_f // 8, generator=g)
    X = A @ torch.randn(in_f // 8, n, generator=g) + 0.1 * torch.randn(in_f, n, generator=g)
    X[:4] *= 10
    return X.t().contiguous()


# Relative output error ||X (W - Ŵ)ᵀ|| / ||X Wᵀ||, 48 x 512 weights, measured: RTN with the
# Hessian's diagonal as importance matrix / GPTQ: iq4_nl 4.0x (act-order 4.6x), iq4_xs 3.8x (4.6x).
@pytest.mark.parametrize("qt,act", [("iq4_nl", False), ("iq4_xs", True)])
def test_gptq_beats_rtn_with_imatrix_on_correlated_inputs(qt, act):
    W = _w(seed=3)
    X = _correlated()
    H = new_hessian(512)
    n = 0
    for chunk in X.split(1000):
        n = accumulate_hessian(chunk, H, n)
    res = quantize_weight(W, H, qt, GPTQConfig(act_order=act))
    rtn = qtype(qt).dequantize_rows(qtype(qt).quantize_rows(W, imatrix=torch.diagonal(H)), 512)
    err = lambda Wq: float((X @ (W - Wq).t()).norm() / (X @ W.t()).norm())  # noqa: E731
    assert err(res.dequantized) * 3.0 < err(rtn), (err(res.dequantized), err(rtn))
    assert torch.equal(res.dequantized, res.weight.dequantize())
    assert torch.equal(res.weight.dequantize(), qtype(qt).dequantize(res.weight.to_bytes(), W.shape))


def test_grid_bad_input():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_weight(_w(in_f=288), torch.eye(288), "iq4_xs")
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_weight(_w(in_f=48), torch.eye(48), "iq4_nl")
    W = _w()
    W[2, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_weight(W, torch.eye(512), "iq4_nl")
    W = _w()
    W[2, 7] = 1e9                                     # the super-block scale overflows fp16
    with pytest.raises(ValueError, match="overflows fp16"):
        quantize_weight(W, torch.eye(512), "iq4_xs")


@pytest.mark.parametrize("ft", ["iq4_xs", "iq4_nl", "iq3_s", "iq3_m", "iq2_m", "iq2_xs"])
def test_gptq_iq_file_types_take_the_with_imatrix_mix(bundled_gguf, ft):
    """GPTQ onto an IQ file type writes llama-quantize --imatrix's tensor types (so the same
    bytes): on the bundled model IQ4_XS / IQ4_NL without an importance matrix would bump the
    first layers' ffn_down to Q5_K; a K-quant or legacy file type keeps its round-to-nearest mix."""
    from quantkit.models.gguf import GGUFSource
    from quantkit.models.imatrix_file import Imatrix, ImatrixEntry
    from quantkit.quant.gguf_export import plan_gguf
    src = GGUFSource(bundled_gguf)
    try:
        imx = Imatrix(datasets=["x.txt"], chunk_count=1, chunk_size=512)
        for t in src.tensors():
            if t.name.startswith("blk.") and len(t.shape) == 2:
                imx.entries[t.name] = ImatrixEntry(np.ones((1, t.shape[-1]), np.float32), np.array([512.0]))
        _, gptq = plan_gguf(src, ft, calibrated=True)
        _, with_imatrix = plan_gguf(src, ft, imatrix=imx)
        assert [(n, t) for n, _, t in gptq] == [(n, t) for n, _, t in with_imatrix]
        if ft in ("iq4_xs", "iq4_nl"):
            _, rtn = plan_gguf(src, ft)
            assert dict((n, t) for n, _, t in rtn)["blk.0.ffn_down.weight"] == "q5_k"
            assert dict((n, t) for n, _, t in gptq)["blk.0.ffn_down.weight"] == ft
        _, q4 = plan_gguf(src, "q4_0", calibrated=True)
        _, q4_rtn = plan_gguf(src, "q4_0")
        assert q4 == q4_rtn
    finally:
        src.close()
