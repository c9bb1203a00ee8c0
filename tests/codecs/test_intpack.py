"""int32 packing: exact round trips for every width and odd shapes, against two references:
AutoGPTQ's pack loop (transcribed below as a slow, obvious implementation: 2/4/8 bits and the
3-bit cross-word layout) and compressed-tensors' own pack_to_int32 (dense, bits 1..8)."""

import numpy as np
import pytest
import torch

from helpers.intpack import autogptq_pack_rows
from quantkit.codecs import legacy
from quantkit.codecs.intpack import pack_int32, packed_length, unpack_int32
from quantkit.codecs.registry import qtype


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matches_autogptq_qweight_layout(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (96, 5), generator=g)            # [in, out], packed along in
    ours = pack_int32(codes, bits, dim=0)
    ref = autogptq_pack_rows(codes.numpy(), bits)
    assert ours.shape == (96 * bits // 32, 5)
    assert np.array_equal(ours.numpy(), ref)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("cols", [1, 7, 31, 32, 33, 100, 256])
def test_matches_compressed_tensors_and_round_trips(bits, cols):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    g = torch.Generator().manual_seed(1000 * bits + cols)
    codes = torch.randint(0, 2**bits, (3, cols), generator=g)
    ours = pack_int32(codes, bits, dim=1)
    assert ours.dtype == torch.int32 and ours.shape == (3, packed_length(cols, bits))
    ref = pack_to_int32((codes - 2 ** (bits - 1)).to(torch.int8), bits)
    assert torch.equal(ours, ref)
    back = unpack_int32(ours, bits, cols, dim=1)
    assert torch.equal(back, codes.to(torch.int32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape,dim", [((37, 3), 0), ((2, 5, 70), 2), ((64, 11), 1), ((1, 1), 0)])
def test_round_trip_odd_shapes_any_dim(bits, shape, dim):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, shape, generator=g)
    codes.view(-1)[0] = 2**bits - 1                  # the extreme codes survive (sign bit of the word)
    codes.view(-1)[-1] = 0
    packed = pack_int32(codes, bits, dim=dim)
    assert packed.shape[dim] == packed_length(shape[dim], bits)
    assert torch.equal(unpack_int32(packed, bits, shape[dim], dim=dim), codes.to(torch.int32))


def test_all_ones_words_are_minus_one():
    codes = torch.full((32, 2), 7)
    assert torch.equal(pack_int32(codes, 3, dim=0), torch.full((3, 2), -1, dtype=torch.int32))


def test_bad_input():
    with pytest.raises(ValueError, match="out of range"):
        pack_int32(torch.tensor([16]), 4)
    with pytest.raises(ValueError, match="out of range"):
        pack_int32(torch.tensor([-1]), 4)
    with pytest.raises(ValueError, match="cannot pack"):
        pack_int32(torch.tensor([1]), 9)
    with pytest.raises(ValueError, match="words cannot hold"):
        unpack_int32(torch.zeros(2, dtype=torch.int32), 4, 20)


@pytest.mark.parametrize("fmt", legacy.FORMATS, ids=lambda f: f.name)
def test_legacy_blocks_from_given_scales_equal_llama_cpp_layout(fmt):
    """Take llama.cpp-exact bytes, decode codes/d/m from them, re-encode: identical bytes."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 64, generator=g)
    name = fmt.name
    ref = qtype(name).quantize_rows(x).reshape(-1, qtype(name).type_size)
    deq = qtype(name).dequantize_rows(ref, 32)                         # [16, 32]
    d = ref[:, fmt.layout.d].contiguous().view(torch.float16).float().reshape(-1)
    offset, has_min = fmt.offset, fmt.has_min
    m = ref[:, fmt.layout.m].contiguous().view(torch.float16).float().reshape(-1) if has_min else None
    base = m[:, None] if has_min else 0.0
    codes = torch.where(d[:, None] != 0, (deq - base) / torch.where(d == 0, 1, d)[:, None], 0.0)
    codes = torch.round(codes).to(torch.int32) + offset
    assert torch.equal(legacy.encode_from_codes(fmt, codes, d, m), ref)
