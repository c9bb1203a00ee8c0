"""quantkit's legacy-type encoders against llama.cpp's own (libggml-base through ctypes).

Exact: every byte equals llama.cpp's for F32, F16, BF16, Q8_0, Q5_1, Q5_0, Q4_1, Q4_0 on random
rows, all-zero blocks, one huge value per block, negative-only blocks, tiny magnitudes and
exact-tie grids. Decoders equal ggml's to the bit.
"""

import numpy as np
import pytest
import torch

from helpers.ggml_reference import ggml_dequantize, ggml_quantize
from quantkit.codecs import legacy
from quantkit.codecs.registry import qtype

TYPES = ["f32", "f16", "bf16"] + [f.name for f in legacy.FORMATS]


def _cases(seed=0):
    g = np.random.default_rng(seed)
    n = 256
    normal = g.standard_normal((64, n)).astype(np.float32)
    zeros = normal.copy()
    zeros[::3, :32] = 0.0                       # all-zero blocks
    zeros[5] = 0.0                              # an all-zero row
    huge = normal.copy()
    huge[:, ::32] *= 1e4                        # one huge value in every block
    neg = -np.abs(normal)                       # negative-only blocks
    pos = np.abs(normal) + 3.0                  # positive-only, offset (min/max types)
    tiny = normal * 1e-8
    # exact ties: multiples of 1/16 with amax chosen so x*id lands on .5 boundaries
    ties = (g.integers(-16, 17, size=(64, n)) / 2.0).astype(np.float32)
    heavy = (g.standard_t(2, size=(64, n))).astype(np.float32)
    wide = (normal * 1e3).astype(np.float32)
    return {"normal": normal, "zeros": zeros, "huge": huge, "neg": neg, "pos": pos, "tiny": tiny,
            "ties": ties, "heavy": heavy, "wide": wide}


CASES = _cases()


@pytest.mark.parametrize("qt", TYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_bytes_equal_llama_cpp(qt, case):
    x = CASES[case]
    ours = qtype(qt).quantize_rows(torch.from_numpy(x)).numpy()
    ref = ggml_quantize(qt, x)
    assert ours.shape == ref.shape
    # Exact for every type, Q4_0/Q5_0 included: this build of llama.cpp does not fuse
    # x*id + 8.5f into an FMA, so no .5 tie lands differently (0 of 327,680 blocks in a
    # 5 x 2048 x 1024 sweep, benchmarks/export_speed.py).
    differ = (ours != ref).any(axis=1)
    assert not differ.any(), f"{qt}/{case}: {int(differ.sum())} of {len(differ)} rows differ"


@pytest.mark.parametrize("qt", TYPES)
def test_dequantize_equals_ggml(qt):
    x = CASES["normal"]
    ref = ggml_quantize(qt, x)
    ours = qtype(qt).dequantize_rows(torch.from_numpy(ref), x.shape[1]).numpy()
    assert np.array_equal(ours.view(np.uint32), ggml_dequantize(qt, ref, x.shape[1]).view(np.uint32))


@pytest.mark.parametrize("qt", ["q8_0", "q5_1", "q5_0", "q4_1", "q4_0"])
def test_reconstruction_error_bound(qt):
    """Round trip error stays within the format's step: |x - x̂| <= d (one quantization step)."""
    x = torch.from_numpy(CASES["normal"])
    xhat = qtype(qt).dequantize_rows(qtype(qt).quantize_rows(x), x.shape[1])
    blocks = x.reshape(-1, 32)
    levels = {"q8_0": 127, "q5_1": 31, "q5_0": 16, "q4_1": 15, "q4_0": 8}[qt]
    span = blocks.abs().amax(1) if qt in ("q8_0", "q5_0", "q4_0") else blocks.amax(1) - blocks.amin(1)
    step = span / levels
    err = (blocks - xhat.reshape(-1, 32)).abs().amax(1)
    assert bool((err <= step * 1.01 + 1e-6).all())


def test_row_not_divisible_by_block_is_refused():
    with pytest.raises(ValueError, match="multiple of the block size 32"):
        qtype("q4_0").quantize_rows(torch.zeros(2, 48))


@pytest.mark.parametrize("qt", ["f16", "bf16"])
def test_float_types_nan_inf_overflow_equal_llama_cpp(qt):
    x = CASES["normal"].copy()
    x[0, :6] = [np.nan, np.inf, -np.inf, 3.4e38, -1e-40, 65520.0]   # NaN, Inf, bf16/f16 overflow, subnormal
    ours = qtype(qt).quantize_rows(torch.from_numpy(x)).numpy()
    assert np.array_equal(ours, ggml_quantize(qt, x))


@pytest.mark.parametrize("qt", TYPES)
def test_check_finite_refuses_nan_and_inf(qt):
    from quantkit.codecs.parallel import NonFiniteError
    x = torch.from_numpy(CASES["normal"]).repeat(200, 1)      # several chunks
    x[-3, 7] = float("nan") if qt != "q4_0" else float("inf")
    with pytest.raises(NonFiniteError):
        qtype(qt).quantize_rows(x, check_finite=True)
    qtype(qt).quantize_rows(x)                                         # without the check: no error


def _plain_sym_search(w, imp, levels, offset):
    """GPTQ's block scale search for q4_0 / q5_0 written as plain expressions: the reference
    for the in-place version in codecs.legacy."""
    from quantkit.codecs.bits import safe_inverse
    imp = imp.clamp_min(0)[None, None, :]
    x = w[:, None, :]
    amax = w.gather(1, w.abs().argmax(dim=1, keepdim=True))
    d0 = amax / -offset
    d = d0 * legacy.SYM_FACTORS[None, :]
    L = torch.trunc(x * safe_inverse(d)[..., None] + (offset + 0.5)).clamp(0, levels) - offset
    num = (imp * x * L).sum(-1)
    den = (imp * L * L).sum(-1)
    d_ls = torch.where(den > 0, num / den.clamp_min(1e-30), d)
    d = torch.cat([d0, d_ls], dim=1).half().float()
    L = torch.trunc(x * safe_inverse(d)[..., None] + (offset + 0.5)).clamp(0, levels) - offset
    err = (imp * (x - L * d[..., None]) ** 2).sum(-1)
    err = torch.where(torch.isfinite(d), err, torch.full_like(err, float("inf")))
    return d.gather(1, err.argmin(dim=1, keepdim=True)).squeeze(1)


@pytest.mark.parametrize("levels,offset", [(15, 8), (31, 16)])
def test_block_scale_search_equals_plain_expressions(levels, offset):
    """Bit for bit, on transposed views (as GPTQ passes them), all-zero blocks, integer-valued
    weights and importances with zeros."""
    g = torch.Generator().manual_seed(levels)
    for trial in range(60):
        rows = int(torch.randint(1, 300, (), generator=g))
        w = torch.randn(32, rows, generator=g) * float(torch.rand((), generator=g) * 0.1)
        if trial % 4 == 0:
            w[:, :3] = 0
        if trial % 5 == 0:
            w = (w * 200).round()
        imp = torch.rand(32, generator=g) * 3
        if trial % 3 == 0:
            imp[:8] = 0
        mn, d = legacy.search_block_scale(w.t(), imp, levels, offset, False)
        assert torch.equal(d, _plain_sym_search(w.t(), imp, levels, offset))
        assert not mn.any()
