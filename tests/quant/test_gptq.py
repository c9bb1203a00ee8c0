"""GPTQ: equals RTN exactly when the Hessian has no off-diagonal terms (integer grids and
llama.cpp's block grids, legacy and K-quants, the latter byte for byte with llama.cpp's encoder
when the scale search is off); the block scale search never loses to llama.cpp's rule; beats
RTN on correlated inputs by a stated factor; dampening fallback on singular / indefinite
Hessians."""

import warnings

import pytest
import torch

from quantkit.codecs import kquants, legacy
from quantkit.codecs.registry import qtype

KQUANT_TYPES = [f.name for f in kquants.FORMATS]
LEGACY_TYPES = [f.name for f in legacy.FORMATS]
from quantkit.quant.gptq import GPTQConfig, accumulate_hessian, new_hessian, quantize_weight
from quantkit.quant.rtn import QuantSpec, quantize_rtn


def _w(out_f=48, in_f=256, seed=0):
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("bits,gs,sym,act", [(4, 128, True, False), (3, 32, False, False), (2, 64, False, True),
                                              (8, -1, True, True), (5, 1024, False, False), (6, 32, True, True)])
def test_identity_hessian_equals_rtn(bits, gs, sym, act):
    in_f = 2048 if gs == 1024 else 256
    W = _w(in_f=in_f)
    spec = QuantSpec(bits, gs, sym)
    res = quantize_weight(W, torch.eye(in_f), spec, GPTQConfig(act_order=act, scale_search=False))
    ref = quantize_rtn(W, spec)
    assert torch.equal(res.weight.q, ref.q)
    assert torch.equal(res.weight.scales, ref.scales) and torch.equal(res.weight.zeros, ref.zeros)
    assert torch.equal(res.dequantized, ref.dequantize())
    assert res.damp == 0.01


def test_diagonal_hessian_with_act_order_equals_rtn():
    """Columns visited in a shuffled order, static groups: still no cross-column update."""
    W = _w()
    H = torch.diag(torch.rand(256, generator=torch.Generator().manual_seed(1)) + 0.1)
    res = quantize_weight(W, H, QuantSpec(4, 32, False), GPTQConfig(act_order=True, scale_search=False))
    assert torch.equal(res.weight.q, quantize_rtn(W, QuantSpec(4, 32, False)).q)


@pytest.mark.parametrize("bits,gs,sym,act", [(4, 128, True, False), (4, 128, True, True), (3, 32, False, False),
                                              (2, 64, True, False), (8, -1, False, True)])
def test_integer_scale_search_never_worse_than_min_max(bits, gs, sym, act):
    """With a diagonal Hessian each group's search minimises the weighted error it is judged by
    (min/max is a candidate); the codes are round-to-nearest on the chosen scale and zero."""
    W = _w(seed=8)
    W[0, :64] = 0.0                                   # all-zero groups keep a usable scale
    W[1, 3] = 1.0                                     # an outlier worth clipping
    h = torch.rand(256, generator=torch.Generator().manual_seed(9)) * 10 + 0.1
    spec = QuantSpec(bits, gs, sym)
    plain = quantize_weight(W, torch.diag(h), spec, GPTQConfig(act_order=act, scale_search=False))
    res = quantize_weight(W, torch.diag(h), spec, GPTQConfig(act_order=act))
    gw = spec.group_width(256)
    err = lambda Wq: ((W - Wq) ** 2 * h).reshape(48, -1, gw).sum(-1)  # noqa: E731 - per group
    assert bool((err(res.dequantized) <= err(plain.dequantized) * (1 + 1e-5) + 1e-12).all())
    if bits <= 4:               # at 8 bits clipping rarely pays: never worse is the claim there
        assert float(err(res.dequantized).sum()) < 0.95 * float(err(plain.dequantized).sum())
    s = res.weight.scales.float().repeat_interleave(gw, dim=1)
    z = res.weight.zeros.repeat_interleave(gw, dim=1)
    assert torch.equal(res.weight.q, (torch.round(W / s) + z).clamp(0, spec.maxq).to(torch.int32))
    assert torch.equal(res.dequantized, res.weight.dequantize())
    assert not bool(res.weight.q[0, :64].ne(z[0, :64]).any())      # zeros stay exactly zero


@pytest.mark.parametrize("name", LEGACY_TYPES + ["iq4_nl", "iq4_xs"])
def test_identity_hessian_on_llama_cpp_grid_gives_llama_cpp_bytes(name):
    W = _w(seed=2)
    W[0, :32] = 0.0                                   # an all-zero block
    W[1, 40] = 3.0                                    # one huge value
    res = quantize_weight(W, torch.eye(256), name, GPTQConfig(scale_search=False))
    assert torch.equal(res.weight.to_bytes(), qtype(name).quantize_rows(W))
    assert torch.equal(res.dequantized, qtype(name).dequantize_rows(qtype(name).quantize_rows(W), 256))


@pytest.mark.parametrize("name", KQUANT_TYPES)
def test_identity_hessian_on_k_quant_grid_gives_llama_cpp_bytes(name):
    """Super-block scales from llama.cpp's reference encoder, codes re-rounded by GPTQ onto
    them: with nothing to compensate, every code is llama.cpp's (its final rounding is also
    round-to-nearest on the same grid)."""
    W = _w(out_f=16, in_f=512, seed=5)
    W[0, :256] = 0.0
    res = quantize_weight(W, torch.eye(512), name)
    ref = qtype(name).quantize_rows(W)
    assert torch.equal(res.weight.to_bytes(), ref)
    assert torch.equal(res.dequantized, qtype(name).dequantize(ref.reshape(-1), W.shape))


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q5_0", "q5_1"])
def test_scale_search_never_worse_than_llama_cpp_rule(name):
    """With a diagonal Hessian the search minimises exactly the weighted error it is judged
    by, and llama.cpp's own scale is one of its candidates."""
    W = _w(seed=6)
    h = torch.rand(256, generator=torch.Generator().manual_seed(7)) * 10 + 0.1
    H = torch.diag(h)
    plain = quantize_weight(W, H, name, GPTQConfig(scale_search=False)).dequantized
    searched = quantize_weight(W, H, name).dequantized
    err = lambda Wq: ((W - Wq) ** 2 * h).reshape(48, 8, 32).sum(-1)  # noqa: E731 - per block
    assert bool((err(searched) <= err(plain) * (1 + 1e-5) + 1e-12).all())
    assert float(err(searched).sum()) < 0.93 * float(err(plain).sum())


def _correlated(in_f=256, n=4096, seed=0):
    """Activations with strongly correlated features and a few outlier channels, like an LLM's."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(in_f, in_f // 8, generator=g)
    X = A @ torch.randn(in_f // 8, n, generator=g) + 0.1 * torch.randn(in_f, n, generator=g)
    X[:4] *= 10
    return X.t().contiguous()                         # [tokens, in]


def _rel_err(W, Wq, X):
    return float((X @ (W - Wq).t()).norm() / (X @ W.t()).norm())


@pytest.mark.parametrize("grid,act,factor", [
    (QuantSpec(4, 128, True), False, 5.0),
    (QuantSpec(4, 128, True), True, 5.0),
    (QuantSpec(3, 128, False), True, 5.0),
    ("q4_0", False, 5.0),
    ("q4_1", True, 5.0),
    ("q4_k", False, 4.0),
    ("q3_k", True, 3.0),
    ("iq4_nl", False, 5.0),
    ("iq4_xs", True, 5.0),
])
def test_gptq_beats_rtn_on_correlated_inputs(grid, act, factor):
    W = _w(seed=3)
    X = _correlated()
    H = new_hessian(256)
    n = 0
    for chunk in X.split(1000):
        n = accumulate_hessian(chunk, H, n)
    res = quantize_weight(W, H, grid, GPTQConfig(act_order=act))
    if isinstance(grid, str) and grid in KQUANT_TYPES:
        rtn = qtype(grid).dequantize(qtype(grid).quantize_rows(W).reshape(-1), W.shape)
    elif isinstance(grid, str):
        rtn = qtype(grid).dequantize_rows(qtype(grid).quantize_rows(W), 256)
    else:
        rtn = quantize_rtn(W, grid).dequantize()
    e_gptq, e_rtn = _rel_err(W, res.dequantized, X), _rel_err(W, rtn, X)
    assert e_gptq * factor < e_rtn, (e_gptq, e_rtn)


def test_accumulate_hessian_is_the_running_mean():
    X = torch.randn(3, 50, 16, generator=torch.Generator().manual_seed(4))
    H = new_hessian(16)
    n = 0
    for x in X:                                       # batches of different shapes too
        n = accumulate_hessian(x, H, n)
    n = accumulate_hessian(torch.zeros(0, 16), H, n)
    flat = X.reshape(-1, 16).double()
    assert n == 150
    torch.testing.assert_close(H.double(), 2 * flat.t() @ flat / 150, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d", [300, 700, 1100])
def test_upper_triangle_hessian_equals_the_full_one(d):
    """The half-work update (tiles on and above the diagonal, then mirrored) is the running mean
    2/N Σ x xᵀ for widths under, between and over the 512-wide tiles."""
    from quantkit.quant.gptq import symmetrize_hessian
    X = torch.randn(3, 40, d, generator=torch.Generator().manual_seed(5))
    H, Hu = new_hessian(d), new_hessian(d)
    n = nu = 0
    for x in X:
        n = accumulate_hessian(x, H, n)
        nu = accumulate_hessian(x, Hu, nu, upper=True)
    symmetrize_hessian(Hu)
    assert n == nu == 120
    assert torch.equal(Hu, Hu.t())
    flat = X.reshape(-1, d).double()
    torch.testing.assert_close(Hu.double(), 2 * flat.t() @ flat / 120, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(Hu, H, rtol=1e-5, atol=1e-5)


def test_singular_hessian_raises_damp_with_a_warning():
    W = _w(in_f=64)
    H = torch.ones(64, 64)                            # rank 1: Cholesky hits a zero pivot
    with pytest.warns(RuntimeWarning, match="raising damp to 0.01"):
        res = quantize_weight(W, H, QuantSpec(4, 32, True), GPTQConfig(damp=0.0))
    assert res.damp == 0.01 and torch.isfinite(res.dequantized).all()


def test_indefinite_hessian_raises_default_damp():
    H = torch.ones(64, 64) - 0.05 * torch.eye(64)     # eigenvalue -0.05: 1% damping is not enough
    with pytest.warns(RuntimeWarning, match="raising damp to 0.1"):
        res = quantize_weight(_w(in_f=64), H, QuantSpec(4, 32, True))
    assert res.damp == pytest.approx(0.1)


def test_no_warning_when_positive_definite():
    X = _correlated(in_f=64, n=512)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = quantize_weight(_w(in_f=64), 2 * X.t() @ X / 512, QuantSpec(4, 32, True))
    assert res.damp == 0.01


def test_dead_inputs_get_zero_weight():
    X = _correlated(in_f=64, n=512)
    X[:, 10] = 0
    H = 2 * X.t() @ X / 512
    res = quantize_weight(_w(in_f=64), H, QuantSpec(4, -1, False))
    assert torch.equal(res.dequantized[:, 10], torch.zeros(48))


def test_bad_input():
    with pytest.raises(ValueError, match="NaN or Inf"):
        W = _w(in_f=64)
        W[3, 3] = float("inf")
        quantize_weight(W, torch.eye(64), QuantSpec(4, 32, True))
    with pytest.raises(ValueError, match="does not divide"):
        quantize_weight(_w(in_f=96), torch.eye(96), QuantSpec(4, 64, True))
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_weight(_w(in_f=64), torch.eye(64), "q4_k")
    with pytest.raises(ValueError, match="no GPTQ grid"):
        quantize_weight(_w(in_f=256), torch.eye(256), "q8_k")


@pytest.mark.parametrize("grid", [QuantSpec(4, 128, True), "q4_1"])
def test_hessian_shrink(grid):
    """shrink=1 drops every cross-column term: the result equals GPTQ on diag(H) exactly (no error
    compensation); shrink=0.5 lies between plain GPTQ and that on the calibration inputs."""
    W, X = _w(seed=5), _correlated()
    H = 2 * X.t() @ X / X.shape[0]
    full = quantize_weight(W, H, grid, GPTQConfig())
    half = quantize_weight(W, H, grid, GPTQConfig(shrink=0.5))
    one = quantize_weight(W, H, grid, GPTQConfig(shrink=1.0))
    diag = quantize_weight(W, torch.diag(torch.diagonal(H)), grid, GPTQConfig())
    assert torch.equal(one.dequantized, diag.dequantized)
    e_full, e_half, e_one = (_rel_err(W, r.dequantized, X) for r in (full, half, one))
    assert e_full < e_half < e_one, (e_full, e_half, e_one)
    with pytest.raises(ValueError, match="shrink must be in"):
        GPTQConfig(shrink=1.5)


@pytest.mark.parametrize("grid,act", [(QuantSpec(4, 128, True), True), ("q4_1", False), ("q4_k", False)])
def test_row_chunks_give_the_same_result(grid, act, monkeypatch):
    """Rows are solved in chunks sharing one factorisation (bounded memory on large layers): the
    result does not depend on the chunk size."""
    from quantkit.quant import gptq
    W, X = _w(out_f=40, seed=6), _correlated()
    H = 2 * X.t() @ X / X.shape[0]
    whole = quantize_weight(W, H, grid, GPTQConfig(act_order=act))
    monkeypatch.setattr(gptq, "CHUNK_ELEMENTS", 256 * 7)      # 7 rows per chunk, the last one short
    chunked = quantize_weight(W, H, grid, GPTQConfig(act_order=act))
    def stored(w):
        return w.to_bytes() if hasattr(w, "to_bytes") else w.q
    same = (stored(whole.weight) == stored(chunked.weight)).float().mean()
    err_w, err_c = _rel_err(W, whole.dequantized, X), _rel_err(W, chunked.dequantized, X)
    # BLAS may block a 7-row product differently from a 40-row one (last-bit differences that
    # can flip a rounding): nearly every code equal, the same error to 1%
    assert same > 0.99 and abs(err_w - err_c) < 0.01 * err_w, (float(same), err_w, err_c)


@pytest.mark.parametrize("n", [700, 1000])
def test_blockwise_triangular_inverse_matches_the_solve(n, monkeypatch):
    """Past TRI_INV_LEAF columns the Cholesky factor is inverted by halves (products instead of
    one triangular solve). Here the leaf is lowered to 128 so that uneven splits (700 = 384 + 316,
    then 256 + 128 and smaller) are exercised: the result is upper triangular with exact zeros
    below, within 1e-6 (relative to its largest entry) of a float64 inverse, as the plain solve
    is, and GPTQ's factor U from it satisfies Uᵀ U = (H + damp)^-1."""
    import quantkit.quant.gptq as gq
    g = torch.Generator().manual_seed(n)
    X = torch.randn(n, 2 * n, generator=g)
    H = X @ X.t() / n
    R = torch.linalg.cholesky((H + 0.01 * torch.eye(n)).flip(0, 1)).flip(0, 1)
    ref = torch.linalg.solve_triangular(R.double(), torch.eye(n, dtype=torch.float64), upper=True)
    out = torch.empty_like(R)
    gq.invert_upper(R, out, leaf=128)
    assert bool((out.tril(-1) == 0).all())
    scale = float(ref.abs().max())
    assert float((out.double() - ref).abs().max()) <= 1e-6 * scale
    plain = torch.linalg.solve_triangular(R, torch.eye(n), upper=True)
    assert float((plain.double() - ref).abs().max()) <= 1e-6 * scale       # the bound is the solve's own class
    monkeypatch.setattr(gq, "TRI_INV_LEAF", 128)
    U, damp = gq.inverse_cholesky([H.flip(0, 1).clone()], 0.01)
    Hinv = torch.linalg.inv((H + 0.01 * float(torch.diagonal(H).mean()) * torch.eye(n)).double())
    assert damp == 0.01
    assert float((U.double().t() @ U.double() - Hinv).abs().max()) <= 1e-5 * float(Hinv.abs().max())
