"""llama.cpp's ternary types TQ1_0 and TQ2_0 (BitNet b1.58, TriLMs) and the 1-bit Q1_0, in torch.

TQ1_0 / TQ2_0 (quantize_row_tq*_ref, the path llama-quantize takes; importance weights are
ignored): per super-block of 256, d = max|x| as fp16, each value to lroundf(x / d) in {-1, 0, 1}
(the inverse 1/d in float32; a non-finite x/d, where 1/d overflows, becomes 0 as the C
conversion of lroundf's out-of-range result does), stored +1 as trits: TQ1_0 packs five trits
per byte as ceil(q * 256 / 243) of their base-3 number (four in the last 4 bytes, shifted to the
top trit), TQ2_0 four 2-bit fields per byte.

Q1_0 (quantize_row_q1_0_ref): blocks of 128, d = (sum |x|, left to right) / 128 as fp16, and a
sign bit per value (1 where x >= 0); decoded as +d / -d.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T

from .bits import BlockLayout, f16_bytes, f16_from, safe_inverse

QK = 256
TQ1_LAYOUT = BlockLayout(T.TQ1_0, ("qs", 48), ("qh", 4), ("d", 2))
TQ2_LAYOUT = BlockLayout(T.TQ2_0, ("qs", 64), ("d", 2))
Q1_BLOCK = 128
Q1_LAYOUT = BlockLayout(T.Q1_0, ("d", 2), ("qs", Q1_BLOCK // 8))

_POW3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32)
_BITS = torch.arange(8, dtype=torch.int32)


def _trits(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x float32 [n, 256] -> (d float32 [n], lroundf(x/d) + 1 as uint8 [n, 256] in 0..2)."""
    d = torch.maximum(x.amax(dim=1), x.amin(dim=1).neg_()).abs_()      # max |x|, +0 for zeros
    inv = safe_inverse(d)
    inv = torch.where(torch.isinf(inv), torch.zeros_like(inv), inv)      # C: lroundf(inf) -> 0 after the cast
    v = x * inv[:, None]
    t = (v >= 0.5).view(torch.uint8).add_(1)
    return d, t.sub_((v <= -0.5).view(torch.uint8))


def _base3(t: torch.Tensor) -> torch.Tensor:
    """Trits uint8 [n, k, m] -> uint8 [n, m]: sum_i t[:, i] 3^(k-1-i) (the first most significant)."""
    q = t[:, 0].clone()
    for i in range(1, t.shape[1]):
        q.mul_(3).add_(t[:, i])
    return q


def _ceil243(q: torch.Tensor) -> torch.Tensor:
    return ((q.to(torch.int32) * 256 + 242) // 243).to(torch.uint8)


def encode_tq1(x: torch.Tensor) -> torch.Tensor:
    """TQ1_0: float32 [n, 256] -> uint8 [n, 54]."""
    n = x.shape[0]
    d, t = _trits(x)
    a = _base3(t[:, :160].reshape(n, 5, 32))
    b = _base3(t[:, 160:240].reshape(n, 5, 16))
    h = _base3(t[:, 240:].reshape(n, 4, 4)).mul_(3)
    return torch.cat([_ceil243(a), _ceil243(b), _ceil243(h), f16_bytes(d)], dim=1)


def encode_tq2(x: torch.Tensor) -> torch.Tensor:
    """TQ2_0: float32 [n, 256] -> uint8 [n, 66]."""
    n = x.shape[0]
    d, t = _trits(x)
    t = t.reshape(n, 2, 4, 32)
    q = t[:, :, 0] | (t[:, :, 1] << 2) | (t[:, :, 2] << 4) | (t[:, :, 3] << 6)
    return torch.cat([q.reshape(n, 64), f16_bytes(d)], dim=1)


def _unpack_trits(b: torch.Tensor, count: int) -> torch.Tensor:
    """Bytes uint8 [n, k] holding `count` trits each -> int32 [n, count, k] in 0..2, top trit first."""
    q = (b.to(torch.int32)[:, None, :] * _POW3[None, :count, None]) & 255
    return (q * 3) >> 8


def decode_tq1(b: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 54] -> float32 [n, 256], dequantize_row_tq1_0."""
    n = b.shape[0]
    qs = b[:, TQ1_LAYOUT.qs]
    t = torch.cat([_unpack_trits(qs[:, :32], 5).reshape(n, 160), _unpack_trits(qs[:, 32:], 5).reshape(n, 80),
                   _unpack_trits(b[:, TQ1_LAYOUT.qh], 4).reshape(n, 16)], dim=1)
    return (t - 1).float() * f16_from(b[:, TQ1_LAYOUT.d])[:, None]


def decode_tq2(b: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 66] -> float32 [n, 256], dequantize_row_tq2_0."""
    n = b.shape[0]
    qs = b[:, TQ2_LAYOUT.qs].to(torch.int32).reshape(n, 2, 1, 32)
    t = (qs >> (2 * torch.arange(4, dtype=torch.int32))[None, None, :, None]) & 3
    return (t.reshape(n, QK) - 1).float() * f16_from(b[:, TQ2_LAYOUT.d])[:, None]


def encode_q1(x: torch.Tensor) -> torch.Tensor:
    """Q1_0: float32 [n, 128] -> uint8 [n, 18]."""
    n = x.shape[0]
    a = x.abs().t().contiguous()
    s = torch.zeros(n)
    for j in range(Q1_BLOCK):                      # the C loop's order: left to right in float32
        s.add_(a[j])
    bits = (x >= 0).to(torch.int32).reshape(n, Q1_BLOCK // 8, 8)
    qs = (bits << _BITS).sum(dim=2).to(torch.uint8)
    return torch.cat([f16_bytes(s / Q1_BLOCK), qs], dim=1)


def decode_q1(b: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 18] -> float32 [n, 128], dequantize_row_q1_0."""
    n = b.shape[0]
    d = f16_from(b[:, Q1_LAYOUT.d])[:, None]
    bits = ((b[:, Q1_LAYOUT.qs].to(torch.int32)[:, :, None] >> _BITS) & 1).reshape(n, Q1_BLOCK)
    return torch.where(bits.bool(), d, -d)
