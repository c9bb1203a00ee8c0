"""llama.cpp's FP4 types MXFP4 and NVFP4 in torch (quantize_row_mxfp4_ref / _nvfp4_ref, the
path llama-quantize takes; importance weights are ignored).

Both store E2M1 codes (`kvalues_fp4`, doubled: 0 1 2 3 4 6 8 12 and their negatives) times a
scale. MXFP4: blocks of 32 with an E8M0 exponent e = floor(log2 max|x|) - 2 + 127 and the scale
2^(e-128). NVFP4: blocks of 64 in four sub-blocks of 16, each with a UE4M3 scale of
max|x| / 6 (ggml_fp32_to_ue4m3: round half up on the mantissa, saturating at 0x7E) and the
value it decodes to, halved.

best_index_mxfp4 scans the 16 codes for the smallest |v*d - x|, the first one on a tie. Every
v*d is exact here (d has at most 4 significant bits), and so is each difference near a midpoint
between neighbouring levels, so the choice is the exact nearest level with ties to the smaller
magnitude (code 0 for zero, and for every value where d = 0): the count of midpoints m*d
strictly below |x|, the sign in bit 3. Far beyond the top level (NVFP4 where max|x|/6 saturates
the scale) the differences round and several can tie: there the first of the equal errors wins.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from .bits import BlockLayout

KVALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)
VALUES = torch.tensor(KVALUES, dtype=torch.float32)
_LEVELS = VALUES[:8]
# Below |x| = 2^22 d the differences |x| - v*d of neighbouring levels (4d apart at least beyond
# the top level) cannot round to equal values; above it the first of equal errors is searched.
_FAR = float(2 ** 22)
_MIDS = torch.tensor([0.5, 1.5, 2.5, 3.5, 5.0, 7.0, 10.0], dtype=torch.float32)

MX_BLOCK = 32
NV_BLOCK, NV_SUB = 64, 16
MX_LAYOUT = BlockLayout(T.MXFP4, ("e", 1), ("qs", MX_BLOCK // 2))
NV_LAYOUT = BlockLayout(T.NVFP4, ("d", NV_BLOCK // NV_SUB), ("qs", NV_BLOCK // 2))


def _e8m0_half_table() -> torch.Tensor:
    """ggml_e8m0_to_fp32_half for every byte: 2^(e-128) (denormal patterns for e < 2)."""
    e = np.arange(256, dtype=np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << 23).astype(np.uint32)
    return torch.from_numpy(bits.view(np.float32).copy())


def _ue4m3_table() -> torch.Tensor:
    """ggml_ue4m3_to_fp32 for every byte (the value times 0.5; 0 and 0x7F decode to 0)."""
    out = np.zeros(256, dtype=np.float32)
    for x in range(256):
        if x in (0, 0x7F):
            continue
        exp, man = (x >> 3) & 0xF, x & 7
        raw = math.ldexp(man, -9) if exp == 0 else math.ldexp(1.0 + man / 8.0, exp - 7)
        out[x] = np.float32(raw) * np.float32(0.5)
    return torch.from_numpy(out)


E8M0_HALF = _e8m0_half_table()
UE4M3 = _ue4m3_table()


def codes(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """best_index_mxfp4(x, d) for x float32 [..., k] and d broadcast to [..., 1] (any d, as
    NVFP4's): int32 codes. Each midpoint's test |x| > m*d is the sign bit of m*d - |x| (float
    subtractions and integer shifts: several times faster in torch than comparisons)."""
    ax = x.abs()
    mag = torch.zeros(ax.shape, dtype=torch.int32)
    for m in _MIDS.tolist():                   # m * d is exact (d has at most 4 significant bits)
        mag.sub_(torch.sub(d * m, ax).view(torch.int32) >> 31)
    mag = torch.where(d > 0, mag, torch.zeros_like(mag))   # d = 0: every error is |x|, the first code wins
    far = ax > d * _FAR
    if bool(far.any()):                         # far beyond the top level |x| - v*d rounds: equal errors
        axf, df = ax[far], d.expand_as(ax)[far]
        err = axf[:, None] - df[:, None] * _LEVELS
        mag[far] = (err == err[:, -1:]).to(torch.int32).argmax(dim=1).to(torch.int32)
    neg = x.view(torch.int32) >> 31                        # -1 where the sign bit is set
    return mag | (neg & (mag.neg() >> 31) & 8)             # the sign where the level is not 0


# MXFP4's d is a power of two and max|x| < 16 d, so 2|x|/d is exact and below 32: the code is
# a lookup on ceil(2|x|/d) (the midpoints are multiples of 0.5; ties go to the smaller level),
# the sign adding 33 to the index.
_C = torch.arange(33)
_MAG = sum((_C > 2 * m).to(torch.uint8) for m in _MIDS.tolist())
_MX_LUT = torch.cat([_MAG, torch.where(_MAG > 0, _MAG + 8, _MAG)]).to(torch.uint8)


def codes_pow2(x: torch.Tensor, ax: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """codes() for MXFP4: x float32 [n, 32], ax = |x|, e int32 [n] the E8M0 bytes (d = 2^(e-128),
    max|x| < 16 d). 2|x|/d is a product by a power of two (in two steps where 2/d overflows)."""
    tiny = e < 2
    biased = torch.where(tiny, 192 - e, 256 - e)                # 2/d = 2^(129-e); 2^(65-e) after * 2^64
    scale = (biased.to(torch.int32) << 23).view(torch.float32)
    y = ax * scale[:, None]
    if bool(tiny.any()):
        y[tiny] = ax[tiny] * 2.0 ** 64 * scale[tiny][:, None]
    c = y.ceil_().clamp_(max=32).to(torch.int32)
    idx = c.clamp_(min=0).add_((x.view(torch.int32) >> 31) & 33).to(torch.int64)   # clamp: NaN input
    return _MX_LUT.index_select(0, idx.view(-1)).view(idx.shape)


def _pack(q: torch.Tensor, half: int) -> torch.Tensor:
    """Codes [..., 2*half] -> bytes uint8 [..., half]: q[j] low nibble, q[j+half] high."""
    return (q[..., :half] | (q[..., half:] << 4)).to(torch.uint8)


def encode_mx(x: torch.Tensor) -> torch.Tensor:
    """MXFP4: float32 [n, 32] -> uint8 [n, 17]."""
    ax = x.abs()
    amax = ax.amax(dim=1)
    # floorf(log2f(amax)): the float64 logarithm rounded to float32 is log2f's value
    fl = torch.floor(torch.log2(amax.double()).float())
    e = torch.where(amax > 0, (fl - 2 + 127).to(torch.int32) & 255, torch.zeros_like(fl, dtype=torch.int32))
    q = codes_pow2(x, ax, e)
    return torch.cat([e.to(torch.uint8)[:, None], _pack(q, MX_BLOCK // 2)], dim=1)


def decode_mx(b: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 17] -> float32 [n, 32], dequantize_row_mxfp4."""
    d = E8M0_HALF[b[:, 0].long()]
    qs = b[:, MX_LAYOUT.qs].long()
    q = torch.cat([qs & 15, qs >> 4], dim=1)
    return VALUES[q] * d[:, None]


def fp32_to_ue4m3(s: torch.Tensor) -> torch.Tensor:
    """ggml_fp32_to_ue4m3 of s float32 [...] -> int32 codes 0..0x7E."""
    pos = s > 0
    s = torch.where(pos, s, torch.ones_like(s)).clamp(max=448.0)
    bits = s.view(torch.int32)
    exp0 = ((bits >> 23) & 0xFF) - 127 + 7
    sub = (s * 512.0 + 0.5).to(torch.int32).clamp(max=7)      # exp0 <= 0: man * 2^-9
    man = ((bits >> 20) & 7) + ((bits >> 19) & 1)             # round half up; may carry
    carry = man > 7
    exp = exp0 + carry.to(torch.int32)
    normal = torch.where(exp >= 15, 0x7E, (exp << 3) | torch.where(carry, 0, man))
    code = torch.where(exp0 <= 0, sub, normal)
    return torch.where(pos, code, 0)


def encode_nv(x: torch.Tensor) -> torch.Tensor:
    """NVFP4: float32 [n, 64] -> uint8 [n, 36]."""
    n = x.shape[0]
    xs = x.reshape(n, 4, NV_SUB)
    ue = fp32_to_ue4m3(xs.abs().amax(dim=2) / 6.0)
    d = UE4M3[ue.long()]
    q = codes(xs, d[..., None])
    return torch.cat([ue.to(torch.uint8), _pack(q, NV_SUB // 2).reshape(n, NV_BLOCK // 2)], dim=1)


def decode_nv(b: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 36] -> float32 [n, 64], dequantize_row_nvfp4."""
    n = b.shape[0]
    d = UE4M3[b[:, NV_LAYOUT.d].long()]
    qs = b[:, NV_LAYOUT.qs].long().reshape(n, 4, NV_SUB // 2)
    q = torch.cat([qs & 15, qs >> 4], dim=2)
    return (VALUES[q] * d[..., None]).reshape(n, NV_BLOCK)
