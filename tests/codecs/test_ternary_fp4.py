"""quantkit's TQ1_0, TQ2_0, Q1_0, MXFP4 and NVFP4 codecs against llama.cpp's own, byte for byte.

Encoding equals `ggml_quantize_chunk` on random tensors (several seeds, rows of 256 and 512),
heavy-tailed ones, exact rounding ties, maxima just below powers of two (MXFP4's log2f),
all-zero, one-huge-value, subnormal and overflowing blocks, and Gemma-3-270M's weights; given
importance weights, llama.cpp ignores them and so does quantkit (the same bytes). Decoding
equals ggml's dequantize_row to the bit, on encoded and on random bytes.
"""

import numpy as np
import pytest
import torch

import llama_cpp  # noqa: F401  (a declared dependency: its absence must fail, not skip)

from helpers.ggml_reference import ggml_dequantize, ggml_quantize  # noqa: E402
from quantkit.codecs.registry import qtype  # noqa: E402

TYPES = ["tq1_0", "tq2_0", "q1_0", "mxfp4", "nvfp4"]


def _cases(seed: int, n: int) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    f32 = np.float32
    normal = g.standard_normal((48, n)).astype(f32)
    small = normal[:16]
    c = {"normal": normal, "heavy": g.standard_t(2, size=(16, n)).astype(f32),
         "cauchy": g.standard_cauchy(size=(16, n)).astype(f32)}
    z = small.copy()
    z[::3, :256] = 0.0
    z[4, ::2] = 0.0
    z[7, :256] = -0.0
    z[8, :64] = 1e-39                                 # subnormal blocks
    z[9, 64:128] = -3e-45
    c["zeros"] = z
    h = small.copy()
    h[:, 7::32] *= 1e4
    c["huge"] = h
    h = small.copy()
    h[:, 5::64] = 6.0e4
    h[:3, 9::64] = -1.0e30
    h[3, 11] = 3.0e38
    c["overflow"] = h
    c["tiny"] = small * f32(1e-8)
    c["ties"] = (g.integers(-24, 25, size=(16, n)) / 4).astype(f32)          # x/d on .5 and on midpoints
    c["levels"] = g.choice([-2.0, -1.0, 0.0, 1.0, 2.0], size=(16, n)).astype(f32)
    p = small.copy()                                  # block maxima just below / at powers of two
    k = g.integers(-30, 30, (16, n // 16))
    p[:, ::16] = np.ldexp(1.0 - np.ldexp(1.0, -g.integers(20, 26, (16, n // 16))), k).astype(f32)
    p[::2, 1::16] = np.ldexp(1.0, k[::2]).astype(f32)
    c["pow2"] = p
    c["e8m0_tiny"] = np.concatenate([small[:8] * f32(2.0 ** -126), small[8:] * f32(2.0 ** -125)])  # E8M0 0, 1, 255
    c["mixed_scales"] = (small * np.exp(g.uniform(-20, 20, (16, n // 16))).repeat(16, 1)).astype(f32)
    c["sparse"] = (small * (g.random((16, n)) < 0.05)).astype(f32)
    return c


def _check(qt: str, x: np.ndarray, what: str) -> np.ndarray:
    ours = qtype(qt).quantize_rows(torch.from_numpy(x)).numpy()
    ref = ggml_quantize(qt, x)
    ts = qtype(qt).type_size
    assert ours.shape == ref.shape == (x.shape[0], qtype(qt).row_bytes(x.shape[1]))
    differ = int((ours.reshape(-1, ts) != ref.reshape(-1, ts)).any(axis=1).sum())
    assert differ == 0, f"{qt}/{what}: {differ} blocks differ"
    return ref


@pytest.mark.parametrize("qt", TYPES)
@pytest.mark.parametrize("seed,n", [(0, 512), (1, 256), (2, 512)])
def test_bytes_equal_llama_cpp(qt, seed, n):
    for case, x in _cases(seed, n).items():
        _check(qt, x, case)


@pytest.mark.parametrize("qt", TYPES)
def test_importance_weights_are_ignored_as_in_llama_cpp(qt):
    x = _cases(4, 512)["normal"]
    w = np.random.default_rng(4).random(512).astype(np.float32)
    assert not qtype(qt).imatrix_used and not qtype(qt).needs_imatrix
    ref = ggml_quantize(qt, x, imatrix=w)
    assert np.array_equal(ref, ggml_quantize(qt, x))
    assert np.array_equal(qtype(qt).quantize_rows(torch.from_numpy(x), imatrix=torch.from_numpy(w)).numpy(), ref)


def test_bytes_equal_llama_cpp_on_real_weights(bundled_gguf):
    from quantkit.models.gguf import GGUFSource

    src = GGUFSource(bundled_gguf)
    try:
        for name in ("blk.0.attn_output.weight", "blk.0.ffn_down.weight"):
            data, typ = src.raw(name)
            n = int(src.tensor_info(name).shape[-1])
            x = ggml_dequantize(qtype(typ).name, np.asarray(data).reshape(-1), n)[:96]
            for qt in TYPES:
                _check(qt, x, name)
    finally:
        src.close()


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("qt", TYPES)
def test_dequantize_equals_ggml(qt):
    for case, x in _cases(5, 512).items():
        data = ggml_quantize(qt, x)
        ours = qtype(qt).dequantize(torch.from_numpy(data), x.shape).numpy()
        assert np.array_equal(_bits(ours), _bits(ggml_dequantize(qt, data, 512))), case


@pytest.mark.parametrize("qt", TYPES)
def test_dequantize_random_bytes_equals_ggml(qt):
    """Every bit pattern of codes and scales (fp16 scales kept finite; E8M0 and UE4M3 bytes all)."""
    g = np.random.default_rng(6)
    q = qtype(qt)
    b = g.integers(0, 256, size=(1024, q.type_size), dtype=np.uint8)
    f16_at = {"tq1_0": 52, "tq2_0": 64, "q1_0": 0}.get(qt)
    if f16_at is not None:
        h = g.integers(0, 0x7C00, size=1024).astype(np.uint16) | (g.integers(0, 2, size=1024).astype(np.uint16) << 15)
        b[:, f16_at:f16_at + 2] = h.view(np.uint8).reshape(-1, 2)
    if qt == "mxfp4":
        b[:, 0] = np.arange(1024) % 255                 # every exponent but 0xFF (NaN)
    ours = q.dequantize_blocks(torch.from_numpy(b)).numpy()
    ref = ggml_dequantize(qt, b.reshape(1, -1), 1024 * q.block_size).reshape(1024, q.block_size)
    assert np.array_equal(_bits(ours), _bits(ref))


@pytest.mark.parametrize("qt", TYPES)
def test_chunks_threads_and_empty(qt):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(1024, 160, generator=g).t()        # [160, 1024], non-contiguous, several chunks
    ref = ggml_quantize(qt, np.ascontiguousarray(x.numpy()))
    for threads in (1, 2):
        assert np.array_equal(qtype(qt).quantize_rows(x, threads=threads).numpy(), ref)
    assert qtype(qt).quantize_rows(torch.zeros(0, 512)).shape == (0, qtype(qt).row_bytes(512))
    with pytest.raises(ValueError, match="multiple of the block size"):
        qtype(qt).quantize_rows(torch.randn(2, 256 + 16))


@pytest.mark.parametrize("qt", TYPES + ["iq4_nl", "iq4_xs"])
def test_non_finite_input(qt):
    """NaN / Inf: refused with check_finite (the GGUF writer's path); without it, bytes of the
    right shape (no crash), as llama.cpp writes some bytes too."""
    from quantkit.codecs.parallel import NonFiniteError
    x = torch.randn(4, 512)
    x[1, 3] = float("nan")
    x[2, 300] = float("inf")
    with pytest.raises(NonFiniteError):
        qtype(qt).quantize_rows(x, check_finite=True)
    assert qtype(qt).quantize_rows(x).shape == (4, qtype(qt).row_bytes(512))
    assert qtype(qt).quantize_rows(x, imatrix=torch.ones(512)).shape == (4, qtype(qt).row_bytes(512))
