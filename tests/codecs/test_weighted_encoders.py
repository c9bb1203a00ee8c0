"""Importance-weighted encoders (quantize_rows(x, imatrix=qw)) against llama.cpp's own
`ggml_quantize_chunk(..., quant_weights)`: Q4_0, Q4_1, Q5_0, Q5_1 (quantize_row_*_impl, weights
from the row-wide mean square) and Q2_K .. Q6_K (quantize_row_*_K_impl), byte for byte, on
random, heavy-tailed and real rows, all-zero and one-huge-value blocks, zero importance."""

import numpy as np
import pytest
import torch

import llama_cpp  # noqa: F401  (a declared dependency: its absence must fail, not skip)

from helpers.ggml_reference import ggml_dequantize, ggml_quantize  # noqa: E402
from quantkit.codecs.registry import qtype  # noqa: E402

TYPES = ["q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]
N = 768  # 3 super-blocks, 24 legacy blocks


def _case(name: str, g: np.random.Generator):
    x = g.standard_normal((48, N)).astype(np.float32)
    qw = (g.random(N) ** 3 * 20).astype(np.float32)          # skewed, like activation energies
    if name == "heavy":
        x = g.standard_t(2, size=(48, N)).astype(np.float32)
    elif name == "zeros":
        x[::3, :256] = 0.0                                      # all-zero super-blocks
        x[1] = 0.0                                              # an all-zero row (sigma2 = 0)
        x[2, 32:64] = 0.0                                       # an all-zero block of 32
        x[4, 16:32] = 0.0                                       # an all-zero sub-block of 16
    elif name == "huge":
        x[:, 7::256] *= 1e4                                     # one huge value per super-block
        x[:, 40::64] *= 1e3
    elif name == "zero_weights":
        qw[:64] = 0.0                                           # unused columns: importance 0
        qw[::7] = 0.0
    elif name == "scaled":
        x *= np.float32(1e-3)
        qw = qw * np.float32(1e6)
    elif name == "ints":
        x = g.integers(-8, 8, size=(48, N)).astype(np.float32)  # exact ties
    return x, qw


@pytest.mark.parametrize("case", ["normal", "heavy", "zeros", "huge", "zero_weights", "scaled", "ints"])
@pytest.mark.parametrize("qt", TYPES)
def test_weighted_bytes_equal_llama_cpp(qt, case):
    x, qw = _case(case, np.random.default_rng(hash((qt, case)) % 2**32))
    ref = ggml_quantize(qt, x, imatrix=qw)
    ours = qtype(qt).quantize_rows(torch.from_numpy(x), imatrix=torch.from_numpy(qw)).numpy()
    assert ours.shape == ref.shape
    rows = np.flatnonzero((ours != ref).any(axis=1))
    assert rows.size == 0, f"{qt}/{case}: rows {rows[:8].tolist()} differ"
    # the weights change the bytes (the weighted path is taken, not the reference one)
    if case in ("normal", "heavy"):
        assert not np.array_equal(ours, ggml_quantize(qt, x))


def test_weighted_on_real_weights(bundled_gguf):
    """Gemma-3-270M's own weights with an importance vector shaped like real activations."""
    from quantkit.models.gguf import GGUFSource

    src = GGUFSource(bundled_gguf)
    try:
        data, typ = src.raw("blk.0.attn_output.weight")
        shape = tuple(src.tensor_info("blk.0.attn_output.weight").shape)
        n = shape[-1]
        x = ggml_dequantize(qtype(typ).name, np.asarray(data).reshape(-1), n)[:96]
    finally:
        src.close()
    g = np.random.default_rng(5)
    qw = (np.exp(g.standard_normal(n) * 2)).astype(np.float32)
    for qt in TYPES:
        ours = qtype(qt).quantize_rows(torch.from_numpy(x), imatrix=torch.from_numpy(qw)).numpy()
        assert np.array_equal(ours, ggml_quantize(qt, x, imatrix=qw)), qt


def test_weighted_threads_and_chunks_agree():
    """Rows split over worker threads in chunks give the same bytes as one call."""
    g = np.random.default_rng(3)
    x = g.standard_normal((300, 512)).astype(np.float32)
    qw = g.random(512).astype(np.float32)
    for qt in ("q4_0", "q4_k"):
        t = qtype(qt)
        a = t.quantize_rows(torch.from_numpy(x), imatrix=torch.from_numpy(qw), threads=1)
        b = t.quantize_rows(torch.from_numpy(x), imatrix=torch.from_numpy(qw), threads=2)
        assert torch.equal(a, b)
        assert np.array_equal(a.numpy(), ggml_quantize(qt, x, imatrix=qw))


def test_weighted_refuses_wrong_length_and_ignores_for_q8_0():
    x = torch.randn(4, 256)
    with pytest.raises(ValueError, match="importance weights of 128 values"):
        qtype("q4_k").quantize_rows(x, imatrix=torch.ones(128))
    q8 = qtype("q8_0")
    assert not q8.imatrix_used
    assert torch.equal(q8.quantize_rows(x, imatrix=torch.rand(256)), q8.quantize_rows(x))
