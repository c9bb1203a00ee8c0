"""Integer packing: b-bit codes into int32 words (GPTQ, compressed-tensors).

One layout serves every width: along the packed dimension the codes form a little-endian
bitstream, code k at bits [k*b, k*b + b) of the stream, word w holding stream bits
[32w, 32w + 32). For b = 2, 4, 8 that is "code k in word k // (32/b) at shift b*(k % (32/b))",
AutoGPTQ's layout; for b = 3 it is AutoGPTQ/GPTQModel's cross-word layout (10 codes, then
code 10 split as 2 low bits at the top of word 0 and its high bit at the bottom of word 1, and
so on: 32 codes in exactly 3 words), and it is compressed-tensors' dense pack_to_int32 for every
b in 1..8. A tail that does not fill a word is zero-padded: ceil(n*b/32) words for n codes.

Codes are unsigned (0 .. 2**b - 1); compressed-tensors' signed codes are offset by 2**(b-1)
by its caller (models.gpu_formats).
"""

from __future__ import annotations

import math

import torch


PACK_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
_MASK32 = 0xFFFFFFFF


def packed_length(n: int, bits: int) -> int:
    """Words needed for n codes of `bits` bits."""
    return math.ceil(n * bits / 32)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> the same bits as int32 (two's complement)."""
    words = words & _MASK32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_int32(codes: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Unsigned b-bit codes -> int32 words along `dim` (ceil(n*b/32) words for n codes)."""
    if bits not in PACK_BITS:
        raise ValueError(f"cannot pack {bits}-bit codes (supported: {', '.join(map(str, PACK_BITS))})")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    x = codes.movedim(dim, -1).to(torch.int64)
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= 1 << bits):
        raise ValueError(f"codes out of range for {bits} bits: [{int(x.min())}, {int(x.max())}]")
    n = x.shape[-1]
    n_words = packed_length(n, bits)
    pad = (-n) % 32
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    groups = x.reshape(*x.shape[:-1], (n + pad) // 32, 32)  # 32 codes -> exactly `bits` words
    words = torch.zeros(*groups.shape[:-1], bits, dtype=torch.int64)
    for k in range(32):
        start = k * bits
        w, off = divmod(start, 32)
        v = groups[..., k]
        words[..., w] |= (v << off) & _MASK32
        if off + bits > 32:                              # the code crosses into the next word
            words[..., w + 1] |= v >> (32 - off)
    out = words.reshape(*x.shape[:-1], groups.shape[-2] * bits)[..., :n_words]
    return _to_int32(out).movedim(-1, dim).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, n: int, dim: int = -1) -> torch.Tensor:
    """int32 words along `dim` -> n unsigned codes (int32) along `dim`; the exact inverse of pack_int32."""
    if bits not in PACK_BITS:
        raise ValueError(f"cannot unpack {bits}-bit codes (supported: {', '.join(map(str, PACK_BITS))})")
    if packed.dtype != torch.int32:
        raise ValueError(f"packed words must be int32, got {packed.dtype}")
    x = packed.movedim(dim, -1).to(torch.int64) & _MASK32
    if x.shape[-1] != packed_length(n, bits):
        raise ValueError(f"{x.shape[-1]} words cannot hold exactly {n} codes of {bits} bits "
                         f"(expected {packed_length(n, bits)})")
    n_groups = math.ceil(n / 32)
    pad = n_groups * bits - x.shape[-1]
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    words = x.reshape(*x.shape[:-1], n_groups, bits)
    mask = (1 << bits) - 1
    codes = []
    for k in range(32):
        w, off = divmod(k * bits, 32)
        v = words[..., w] >> off
        if off + bits > 32:
            v = v | (words[..., w + 1] << (32 - off))
        codes.append(v & mask)
    out = torch.stack(codes, dim=-1).reshape(*x.shape[:-1], n_groups * 32)[..., :n]
    return out.to(torch.int32).movedim(-1, dim).contiguous()

