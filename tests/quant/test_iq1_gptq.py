"""GPTQ onto IQ1_S and IQ1_M (codecs.iq1_grid): with an identity Hessian and no scale search the
bytes are llama.cpp's own (IQ1_S with all-ones importance weights, which llama.cpp requires);
the stored bytes decode in llama.cpp to exactly the solver's values; on correlated inputs GPTQ
lowers the Hessian-weighted error well below round-to-nearest with the Hessian's diagonal as
importance matrix."""

import numpy as np
import pytest
import torch

from helpers.ggml_reference import ggml_dequantize, ggml_quantize
from quantkit.codecs.registry import gptq_types, qtype
from quantkit.quant.gguf_gptq import GPTQ_TYPES
from quantkit.quant.gptq import GPTQConfig, accumulate_hessian, new_hessian, quantize_weight

TYPES = ["iq1_s", "iq1_m"]


def _w(out_f=48, in_f=512, seed=0):
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("qt", TYPES)
def test_identity_hessian_without_search_is_llama_cpp(qt):
    W = _w(seed=1)
    W[0, :256] = 0.0                                  # an all-zero super-block
    W[1, 40] = 3.0                                    # one huge value
    W[2, 64:96] = 0.0                                 # an all-zero sub-block
    assert qt in gptq_types() and qt in GPTQ_TYPES
    res = quantize_weight(W, torch.eye(512), qt, GPTQConfig(scale_search=False))
    ones = np.ones(512, dtype=np.float32) if qtype(qt).needs_imatrix else None
    ref = ggml_quantize(qt, W.numpy(), imatrix=ones)
    assert np.array_equal(res.weight.to_bytes().numpy(), ref)
    back = ggml_dequantize(qt, ref.reshape(-1), 512)
    assert np.array_equal(res.dequantized.numpy(), back.reshape(W.shape))


def _correlated(in_f=512, n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(in_f, in_f // 8, generator=g)
    X = A @ torch.randn(in_f // 8, n, generator=g) + 0.1 * torch.randn(in_f, n, generator=g)
    X[:4] *= 10
    return X.t().contiguous()


# 48 x 512 weights, RTN with the Hessian's diagonal as importance matrix / GPTQ (scale search on),
# measured tr(ΔW H ΔWᵀ): iq1_s 9.0x, iq1_m 9.3x; output error ||X ΔWᵀ|| about the square root.
@pytest.mark.parametrize("qt,tr_factor,out_factor", [("iq1_s", 6.0, 2.4), ("iq1_m", 6.0, 2.4)])
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
    back = ggml_dequantize(qt, res.weight.to_bytes().numpy().reshape(-1), 512)
    assert np.array_equal(res.dequantized.numpy(), back.reshape(W.shape))


@pytest.mark.parametrize("qt", TYPES)
def test_bad_input(qt):
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_weight(_w(in_f=288), torch.eye(288), qt)
    with pytest.raises(ValueError, match="act-order"):
        quantize_weight(_w(), torch.eye(512), qt, GPTQConfig(act_order=True))
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
