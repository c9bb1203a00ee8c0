"""Property tests (hypothesis, derandomized) over every codec in codecs.registry and the int32
packing: encoded values are fixed points of the codec, random bytes decode as gguf-py decodes
them, and pack/unpack is exact for every width and shape."""

import numpy as np
import pytest
import torch
from gguf import quants as gguf_quants
from hypothesis import given, settings
from hypothesis import strategies as st

from quantkit.codecs.intpack import PACK_BITS, pack_int32, packed_length, unpack_int32
from quantkit.codecs.registry import QTYPES, QuantType, can_encode, qtype

ENCODABLE = [n for n in QTYPES if can_encode(n)]
# gguf-py 0.19 has no Q1_0 decoder (quantkit's is tested against libggml in test_ternary_fp4.py)
OWN_DECODERS = [n for n, q in QTYPES.items() if type(q).decode_blocks is not QuantType.decode_blocks and n != "q1_0"]
FAST = settings(max_examples=12, deadline=None, derandomize=True)


def _rows(q, seed: int, rows: int, blocks: int, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, blocks * q.block_size, generator=g) * scale
    if seed % 3 == 0:                       # one huge value and an all-zero block
        x[0, 0] = scale * 1000
        x[-1, :q.block_size] = 0
    return x


@pytest.mark.parametrize("name", ENCODABLE)
@FAST
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 3), blocks=st.integers(1, 3),
       scale=st.sampled_from([1e-3, 0.05, 1.0, 37.0]))
def test_quantized_values_are_fixed_points(name, seed, rows, blocks, scale):
    """quantize -> dequantize -> quantize -> dequantize: the float and legacy types give the first
    dequantized values back (what they store they store again); the K-quants and IQ types search
    their scales afresh (llama.cpp's make_qkx/make_qx searches, the lattice's trial scales), so
    for them the second pass may move values but never by more than the first pass's error.
    Types that need an importance matrix get unit weights."""
    q = qtype(name)
    x = _rows(q, seed, rows, blocks, scale)
    qw = torch.ones(x.shape[1]) if q.needs_imatrix else None     # IQ2_XXS/XS, IQ1_S: not without weights
    b1 = q.quantize_rows(x, imatrix=qw)
    assert b1.shape == (rows, q.row_bytes(x.shape[1]))
    d1 = q.dequantize(b1.reshape(-1), tuple(x.shape))
    d2 = q.dequantize(q.quantize_rows(d1, imatrix=qw).reshape(-1), tuple(x.shape))
    assert torch.isfinite(d1).all()
    if not name.endswith("_k") and not name.startswith("iq"):   # the IQ lattices search scales too
        torch.testing.assert_close(d2, d1, rtol=1e-3, atol=1e-6 * scale)
    else:
        first = torch.linalg.vector_norm(d1 - x)
        assert torch.linalg.vector_norm(d2 - d1) <= first * 1.01 + 1e-6 * scale


@pytest.mark.parametrize("name", OWN_DECODERS)
@FAST
@given(data=st.binary(min_size=1, max_size=4))
def test_random_bytes_decode_as_gguf_py_decodes(name, data):
    """Any bytes (NaN and Inf scales included) decode to what gguf-py's reference decoder gives."""
    q = qtype(name)
    n_blocks = len(data)
    rng = np.random.default_rng(int.from_bytes(data, "little"))
    raw = rng.integers(0, 256, (n_blocks, q.type_size), dtype=np.uint8)
    ours = q.dequantize_blocks(torch.from_numpy(raw)).numpy().reshape(-1)
    ref = np.asarray(gguf_quants.dequantize(raw, q.ggml), dtype=np.float32).reshape(-1)
    assert ours.shape == ref.shape
    assert np.array_equal(np.isnan(ours), np.isnan(ref))
    finite = ~np.isnan(ref)
    assert np.array_equal(ours[finite], ref[finite]) or np.allclose(ours[finite], ref[finite], rtol=1e-6, atol=0)


@FAST
@given(bits=st.sampled_from(PACK_BITS), rows=st.integers(0, 4), n=st.integers(0, 200), seed=st.integers(0, 2**31 - 1),
       dim=st.sampled_from([0, -1]))
def test_pack_unpack_round_trip(bits, rows, n, seed, dim):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, n), generator=g, dtype=torch.int64)
    if dim == 0:
        codes = codes.T.contiguous()
    packed = pack_int32(codes, bits, dim=dim)
    assert packed.dtype == torch.int32 and packed.shape[dim] == packed_length(n, bits)
    back = unpack_int32(packed, bits, n, dim=dim)
    assert torch.equal(back.to(torch.int64), codes)


@FAST
@given(bits=st.sampled_from(PACK_BITS), n=st.integers(1, 64))
def test_pack_refuses_codes_out_of_range(bits, n):
    codes = torch.zeros(n, dtype=torch.int64)
    codes[n // 2] = 1 << bits
    with pytest.raises(ValueError, match="out of range"):
        pack_int32(codes, bits)
