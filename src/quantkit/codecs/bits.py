"""Bit and float helpers every block codec shares, and the byte layout of a block.

A block's fields (scales, mins, packed codes) are named once in `BlockLayout` with their
widths from ggml-common.h; the byte offsets follow from the order, and the total is checked
against gguf-py's GGML_QUANT_SIZES, so no offset is typed by hand.
"""

from __future__ import annotations

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


class BlockLayout:
    """The fields of one block of `ggml`, in storage order: `layout.d` is the slice of bytes
    holding field `d`. Built from (name, bytes) pairs; their sum must be the type size."""

    def __init__(self, ggml: GGMLQuantizationType, *fields: tuple[str, int]):
        start = 0
        self.fields: dict[str, slice] = {}
        for name, width in fields:
            self.fields[name] = slice(start, start + width)
            start += width
        block_size, type_size = GGML_QUANT_SIZES[ggml]
        if start != type_size:
            raise AssertionError(f"{ggml.name}: fields of {start} bytes, the format says {type_size}")
        self.block_size = block_size
        self.type_size = type_size

    def __getattr__(self, name: str) -> slice:
        try:
            return self.__dict__["fields"][name]
        except KeyError:
            raise AttributeError(name) from None


def u8(t: torch.Tensor) -> torch.Tensor:
    """View a contiguous tensor's bytes as uint8 [n, k*itemsize]."""
    t = t.contiguous()
    return t.view(torch.uint8).reshape(t.shape[0], -1)


def f16_bytes(v: torch.Tensor) -> torch.Tensor:
    """GGML_FP32_TO_FP16 (round to nearest even) of v [n]: the bytes uint8 [n, 2]."""
    return u8(v.to(torch.float16).reshape(-1, 1))


def fp16(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GGML_FP32_TO_FP16 of v [n]: the fp16 bytes [n, 2] and the value read back (float32)."""
    h = v.to(torch.float16)
    return h.reshape(-1, 1).view(torch.uint8), h.float()


def f16_from(b: torch.Tensor) -> torch.Tensor:
    """fp16 bytes uint8 [n, 2] -> float32 [n]."""
    return b.contiguous().view(torch.float16).reshape(-1).float()


def safe_inverse(d: torch.Tensor) -> torch.Tensor:
    """1/d, and 0 where d is 0 (ggml's `id = d ? 1.0f/d : 0.0f`)."""
    nz = d != 0
    return torch.where(nz, 1.0 / torch.where(nz, d, torch.ones_like(d)), torch.zeros_like(d))


def absmax_signed(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Along `dim`: the first element of largest magnitude, with its sign, and that magnitude
    (ggml's `if (fabsf(v) > amax)` loop: strict, so the first wins). The max and min decide,
    except where +a and -a are both present; only there are positions looked at."""
    mx = x.amax(dim=dim)
    mn = x.amin(dim=dim)
    neg = -mn
    v = torch.where(neg > mx, mn, mx)
    tie = (mx == neg) & (mx > 0)
    if bool(tie.any()):
        if dim == 0:
            cols = tie.nonzero()[:, 0]
            sub = x[:, cols]
            v[cols] = sub.gather(0, sub.abs().argmax(dim=0, keepdim=True))[0]
        else:
            rows = x[tie]
            v[tie] = rows.gather(1, rows.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    return v, torch.maximum(mx, neg)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """q [n, 32] in 0..15 (int8 or wider) -> uint8 [n, 16]: byte j holds q[j] (low) and q[j+16]
    (high), as ggml's legacy blocks store them."""
    b = q[:, :16] | (q[:, 16:] << 4)
    return b.view(torch.uint8) if b.dtype == torch.int8 else b.to(torch.uint8)


def unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """pack_nibbles' inverse: uint8 [n, 16] -> int32 [n, 32]."""
    qs = qs.to(torch.int32)
    return torch.cat([qs & 15, qs >> 4], dim=1)


def high_bits(q: torch.Tensor) -> torch.Tensor:
    """Bit 4 of each of 32 values packed into a little-endian uint32 (bit j = value j): [n, 4]."""
    bits = ((q >> 4) & 1).to(torch.int64)
    word = (bits << torch.arange(32, dtype=torch.int64)).sum(dim=1)
    return u8(word.reshape(-1, 1))[:, :4]


def unpack_high_bits(qh: torch.Tensor) -> torch.Tensor:
    """high_bits' inverse: uint8 [n, 4] -> int32 [n, 32] of 0/1."""
    # a one-row slice is contiguous but may start at an offset not divisible by 4: copy it then
    qh = qh.contiguous() if qh.storage_offset() % 4 == 0 else qh.clone(memory_format=torch.contiguous_format)
    word = qh.view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # [n, 1]
    return ((word >> torch.arange(32, dtype=torch.int64)) & 1).to(torch.int32)
