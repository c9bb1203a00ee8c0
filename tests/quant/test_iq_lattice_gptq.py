"""GPTQ onto IQ3_S, IQ3_XXS, IQ2_XXS / IQ2_XS / IQ2_S and IQ1_S / IQ1_M, whose groups of 4 or 8
columns take lattice points (plus signs, or IQ1's shift) together: with an identity Hessian and no scale search the bytes are llama.cpp's own; the stored bytes decode (in
llama.cpp too) to exactly the solver's values; on correlated inputs GPTQ lowers the
Hessian-weighted error well below round-to-nearest with the Hessian's diagonal as importance
matrix."""

import numpy as np
import pytest
import torch

from helpers.ggml_reference import ggml_dequantize, ggml_quantize
from quantkit.codecs.registry import gptq_types, qtype
from quantkit.quant.gguf_gptq import GPTQ_TYPES
from quantkit.quant.gptq import GPTQConfig, accumulate_hessian, new_hessian, quantize_weight

TYPES = ["iq3_s", "iq3_xxs", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_s", "iq1_m"]


def _w(out_f=48, in_f=512, seed=0):
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("qt", TYPES)
def test_identity_hessian_without_search_is_llama_cpp(qt):
    W = _w(seed=1)
    W[0, :256] = 0.0                                  # an all-zero super-block
    W[1, 40] = 3.0                                    # one huge value
    if qt.startswith("iq1"):                          # an all-zero sub-block (IQ3_S: the test below)
        W[2, 64:96] = 0.0
    assert qt in gptq_types() and qt in GPTQ_TYPES
    res = quantize_weight(W, torch.eye(512), qt, GPTQConfig(scale_search=False))
    # the types llama.cpp refuses without an importance matrix: its bytes with all-ones weights
    ones = np.ones(512, dtype=np.float32) if qtype(qt).needs_imatrix else None
    ref = ggml_quantize(qt, W.numpy(), imatrix=ones)
    assert np.array_equal(res.weight.to_bytes().numpy(), ref)
    assert torch.equal(res.dequantized, qtype(qt).dequantize(torch.from_numpy(ref), W.shape))
    back = ggml_dequantize(qt, ref.reshape(-1), 512)
    assert np.array_equal(res.dequantized.numpy(), back.reshape(W.shape))


def test_zero_sub_block_is_stored_in_place():
    """llama.cpp's IQ3_S encoder moves the next sub-blocks' points into an all-zero sub-block's
    place; GPTQ stores every sub-block in its own place, so llama.cpp decodes the solver's values."""
    W = _w(seed=2)
    W[3, 32:64] = 0.0
    res = quantize_weight(W, torch.eye(512), "iq3_s", GPTQConfig(scale_search=False))
    ours = res.weight.to_bytes().numpy()
    ref = ggml_quantize("iq3_s", W.numpy())
    diff = np.flatnonzero((ours != ref).any(axis=1))
    assert diff.tolist() == [3]
    back = ggml_dequantize("iq3_s", ours.reshape(-1), 512)
    assert np.array_equal(back, res.dequantized.numpy())


def _correlated(in_f=512, n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(in_f, in_f // 8, generator=g)
    X = A @ torch.randn(in_f // 8, n, generator=g) + 0.1 * torch.randn(in_f, n, generator=g)
    X[:4] *= 10
    return X.t().contiguous()


# 48 x 512 weights, RTN with the Hessian's diagonal as importance matrix / GPTQ, measured
# tr(ΔW H ΔWᵀ) (without the scale search): iq3_s 18.9x (13.7x), iq3_xxs 14.1x (10.3x),
# iq2_s 11.6x (11.3x), iq2_xs 11.8x (10.4x), iq2_xxs 10.5x (9.7x); with the search iq1_s 9.0x,
# iq1_m 9.3x (each group of 8 scored by its full within-group Hessian form); output error ||X ΔWᵀ|| about the square root.
@pytest.mark.parametrize("qt,tr_factor,out_factor", [
    ("iq3_s", 10.0, 3.0), ("iq3_xxs", 7.0, 2.5), ("iq2_s", 7.0, 2.5), ("iq2_xs", 7.0, 2.5), ("iq2_xxs", 7.0, 2.5),
    ("iq1_s", 6.0, 2.4), ("iq1_m", 6.0, 2.4)])
def test_gptq_lowers_hessian_weighted_error(qt, tr_factor, out_factor):
    W = _w(seed=3)
    X = _correlated()
    H = new_hessian(512)
    n = 0
    for chunk in X.split(1000):
        n = accumulate_hessian(chunk, H, n)
    res = quantize_weight(W, H, qt, GPTQConfig())
    q = qtype(qt)
    rtn = q.dequantize_rows(q.quantize_rows(W, imatrix=torch.diagonal(H)), 512)
    tr = lambda Wq: float(((W - Wq) @ H * (W - Wq)).sum())  # noqa: E731
    out = lambda Wq: float((X @ (W - Wq).t()).norm())  # noqa: E731
    assert tr(res.dequantized) * tr_factor < tr(rtn), (tr(res.dequantized), tr(rtn))
    assert out(res.dequantized) * out_factor < out(rtn), (out(res.dequantized), out(rtn))
    assert torch.equal(res.dequantized, q.dequantize(res.weight.to_bytes(), W.shape))
    back = ggml_dequantize(qt, res.weight.to_bytes().numpy().reshape(-1), 512)
    assert np.array_equal(res.dequantized.numpy(), back.reshape(W.shape))


@pytest.mark.parametrize("qt", ["iq3_s", "iq3_xxs", "iq2_xs", "iq1_s"])
def test_bad_input(qt):
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_weight(_w(in_f=288), torch.eye(288), qt)
    with pytest.raises(ValueError, match="act-order"):
        quantize_weight(_w(), torch.eye(512), qt, GPTQConfig(act_order=True))
    with pytest.raises(ValueError, match="multiple of"):
        quantize_weight(_w(), torch.eye(512), qt, GPTQConfig(block_size=130))
    W = _w()
    W[2, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_weight(W, torch.eye(512), qt)


@pytest.mark.usefixtures("one_thread")
def test_gguf_iq1_s_file_by_gptq_runs_in_llama_cpp(gptq_llama_dir, tmp_path):
    """GPTQ writes file type IQ1_S without an importance matrix (its Hessians take that place):
    llama-quantize's with-imatrix mix, the decoder linears solved onto IQ1_S, and llama.cpp
    loads and generates from it."""
    from quantkit import api
    from quantkit.models.gguf import GGUFSource
    from quantkit.runtimes.llama_cpp import LlamaCpp
    out, imx, rtn = tmp_path / "gptq.gguf", tmp_path / "imx.gguf", tmp_path / "rtn.gguf"
    api.quantize(str(gptq_llama_dir), out, format="gguf:iq1_s", method="gptq", nsamples=4, seqlen=64,
                 save_imatrix=imx, show_progress=False)
    api.quantize(str(gptq_llama_dir), rtn, format="gguf:iq1_s", imatrix=imx, show_progress=False)
    with GGUFSource(out) as a, GGUFSource(rtn) as b:
        types = [(t.name, t.type) for t in a.tensors()]
        assert types == [(t.name, t.type) for t in b.tensors()]
    assert sum(t == "iq1_s" for _, t in types) > 0
    rt = LlamaCpp(str(out), n_ctx=128, n_threads=2)
    try:
        gen = rt.generate("The history of the city", max_tokens=8)
    finally:
        rt.close()
    assert len(gen.tokens) >= 1
