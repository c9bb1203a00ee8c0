"""llama.cpp's legacy block types (Q8_0, Q5_1, Q5_0, Q4_1, Q4_0) in torch, and their GPTQ grid.

Pure functions on block-shaped tensors: each format's `encode(x[n, 32]) -> uint8[n, type_size]`
and `decode(b[n, type_size]) -> float32[n, 32]`. Every rounding step follows ggml-quants.c's
`quantize_row_*_ref` (the path llama-quantize takes without an importance matrix), operation by
operation in float32, so the bytes are llama.cpp's bytes:

- the scale is taken from the first element of largest magnitude (strict `<` in C: first wins);
- `d` is stored as fp16 (round to nearest even) but the inverse `id = 1/d` uses the float32 d;
- `(int8_t)(x*id + 8.5f)` truncates toward zero; `roundf` rounds half away from zero.

A C build may contract `x*id + 8.5f` into one fused multiply-add; where that happens the result
can differ at exact .5 ties (a measured, bounded share of blocks; see tests/test_codecs_ggml.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from gguf import GGMLQuantizationType as T

from .bits import (BlockLayout, absmax_signed, f16_bytes, f16_from, high_bits, pack_nibbles, safe_inverse, u8,
                   unpack_high_bits, unpack_nibbles)
from .kquant_scales import make_qkx2_search, make_qx_search, qkx2_levels, qx_levels, rowsum_seq, sqrtf

BLOCK = 32

# Largest float below 0.5: trunc(v + copysign(HALF_DOWN, v)) is C's roundf (halves away from
# zero) for every float, including 0.49999997 where floor(v + 0.5) would give 1.
HALF_DOWN = torch.tensor(0.49999997, dtype=torch.float32)


def _roundf_to_int8(v: torch.Tensor) -> torch.Tensor:
    """C's roundf, then the (int8) store; the conversion truncates toward zero."""
    return v.add_(torch.copysign(HALF_DOWN, v)).to(torch.int8)


def _trunc_u8(v: torch.Tensor, top: int | None) -> torch.Tensor:
    """(int8_t)(v) for 0 <= v < 32.5, then MIN(top, .): the C casts truncate toward zero.
    Kept as int8 (a fast conversion in torch; float->uint8 is 4x slower): the nibble packing
    gives the same bits, and the bytes are viewed as uint8."""
    q = v.to(torch.int8)
    return q.clamp_(max=top) if top is not None else q


def _minmax(x, levels):
    mn = x.min(dim=1).values
    mx = x.max(dim=1).values
    d = (mx - mn) / levels
    return mn, d, safe_inverse(d)


@dataclass(frozen=True)
class LegacyFormat:
    """One legacy block type: value = (code - offset) * d (+ m), code in 0..levels."""
    ggml: T
    levels: int                    # largest code
    offset: int                    # subtracted from the code (q8_0: its int8 codes stored + 128)
    layout: BlockLayout
    encode: Callable[[torch.Tensor], torch.Tensor] = None   # quantize_row_*_ref over blocks [n, 32]

    @property
    def name(self) -> str:
        return self.ggml.name.lower()

    @property
    def has_min(self) -> bool:
        return "m" in self.layout.fields

    @property
    def int8(self) -> bool:
        """Codes stored as int8 bytes (Q8_0): scale from the absolute maximum, C's roundf."""
        qs = self.layout.qs
        return qs.stop - qs.start == BLOCK


def pack(fmt: LegacyFormat, d: torch.Tensor, m: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    """Block bytes in fmt's layout from d (and m) float [n] and codes q [n, 32]: unsigned 0..levels
    (int8 for q8_0, the signed code). d and m are stored as fp16."""
    parts = [f16_bytes(d)]
    if fmt.has_min:
        parts.append(f16_bytes(m))
    if fmt.int8:
        parts.append(u8(q))
    elif "qh" in fmt.layout.fields:
        parts += [high_bits(q), pack_nibbles(q & 15)]
    else:
        parts.append(pack_nibbles(q))
    return torch.cat(parts, dim=1)


def decode(fmt: LegacyFormat, b: torch.Tensor) -> torch.Tensor:
    """Block bytes uint8 [n, type_size] -> float32 [n, 32], ggml's dequantize_row_*."""
    L = fmt.layout
    d = f16_from(b[:, L.d])[:, None]
    if fmt.int8:
        return b[:, L.qs].contiguous().view(torch.int8).float() * d
    q = unpack_nibbles(b[:, L.qs])
    if "qh" in L.fields:
        q = q | (unpack_high_bits(b[:, L.qh]) << 4)
    if fmt.has_min:
        return q.float() * d + f16_from(b[:, L.m])[:, None]
    return (q - fmt.offset).float() * d


def _q4_0(x):
    d = absmax_signed(x, 1)[0] / -8
    q = _trunc_u8((x * safe_inverse(d)[:, None]).add_(8.5), 15)
    return pack(Q4_0, d, None, q)


def _q5_0(x):
    d = absmax_signed(x, 1)[0] / -16
    q = _trunc_u8((x * safe_inverse(d)[:, None]).add_(16.5), 31)
    return pack(Q5_0, d, None, q)


def _q4_1(x):
    mn, d, idv = _minmax(x, 15)
    q = _trunc_u8((x - mn[:, None]).mul_(idv[:, None]).add_(0.5), 15)
    return pack(Q4_1, d, mn, q)


def _q5_1(x):
    mn, d, idv = _minmax(x, 31)
    # (uint8_t) cast without a clamp in C; values cannot exceed 31.5 here.
    q = _trunc_u8((x - mn[:, None]).mul_(idv[:, None]).add_(0.5), None)
    return pack(Q5_1, d, mn, q)


def _q8_0(x):
    d = x.abs().amax(dim=1) / 127
    q = _roundf_to_int8(x * safe_inverse(d)[:, None])
    return pack(Q8_0, d, None, q)


# Field widths from ggml-common.h (block_q4_0 ...); offsets and the total follow from them.
Q4_0 = LegacyFormat(T.Q4_0, 15, 8, BlockLayout(T.Q4_0, ("d", 2), ("qs", BLOCK // 2)), _q4_0)
Q4_1 = LegacyFormat(T.Q4_1, 15, 0, BlockLayout(T.Q4_1, ("d", 2), ("m", 2), ("qs", BLOCK // 2)), _q4_1)
Q5_0 = LegacyFormat(T.Q5_0, 31, 16, BlockLayout(T.Q5_0, ("d", 2), ("qh", 4), ("qs", BLOCK // 2)), _q5_0)
Q5_1 = LegacyFormat(T.Q5_1, 31, 0, BlockLayout(T.Q5_1, ("d", 2), ("m", 2), ("qh", 4), ("qs", BLOCK // 2)), _q5_1)
Q8_0 = LegacyFormat(T.Q8_0, 255, 128, BlockLayout(T.Q8_0, ("d", 2), ("qs", BLOCK)), _q8_0)


def encode_rows_weighted(fmt: LegacyFormat, x: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """quantize_<type>(x, quant_weights=qw) for Q4_0, Q4_1, Q5_0, Q5_1: x float32 [rows, n],
    qw float32 [n] -> uint8 [rows, n/32 * type_size], llama.cpp's bytes (quantize_row_*_impl).

    Each weight is qw[j] * sqrtf(sigma2 + x[j]^2) with sigma2 the mean square of the whole row;
    the symmetric types search the scale with make_qx_quants (nmax 8 or 16), the ones with a
    minimum with make_qkx3_quants (-0.9 + 0.05 k, k = 0..36), and keep that search's codes."""
    rows, n = x.shape
    if fmt.int8 or n % BLOCK:
        raise ValueError(f"{fmt.name}: no importance-weighted encoder for rows of {n}")
    sigma2 = rowsum_seq(x * x) / float(n)
    w = sqrtf(sigma2[:, None] + x * x).mul_(qw[None, :])
    xs = x.reshape(-1, BLOCK).t().contiguous()          # column m: block m, element i in row i
    ws = w.reshape(-1, BLOCK).t().contiguous()
    if fmt.has_min:
        scale, the_min, iscale, used_min, flat = make_qkx2_search(xs, ws, fmt.levels, -0.9, 0.05, 36, False)
        q = qkx2_levels(xs, iscale, used_min, flat, fmt.levels)
        out = pack(fmt, scale, -the_min, q.t().contiguous())
    else:
        scale, iscale, zero = make_qx_search(xs, fmt.offset, ws)
        q = qx_levels(xs, iscale, zero, fmt.offset)
        out = pack(fmt, scale, None, q.t().contiguous())
    return out.reshape(rows, -1)


def encode_from_codes(fmt: LegacyFormat, codes: torch.Tensor, d: torch.Tensor,
                      m: torch.Tensor | None = None) -> torch.Tensor:
    """codes int [n, 32] in 0..levels (unsigned; q8_0: int8 code + 128), d (and m for q4_1/q5_1)
    float [n] -> uint8 [n, type_size]: a block whose scale was fixed before its codes (GPTQ)."""
    if codes.dim() != 2 or codes.shape[1] != BLOCK:
        raise ValueError(f"codes must be [n, {BLOCK}], got {tuple(codes.shape)}")
    q = codes.to(torch.int32)
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > fmt.levels):
        raise ValueError(f"{fmt.name} codes out of range 0..{fmt.levels}")
    if fmt.has_min and m is None:
        raise ValueError(f"{fmt.name} needs the block minimum m")
    if fmt.int8:
        q = (q - fmt.offset).to(torch.int8)
    return pack(fmt, d, m, q)


# ---- GPTQ grid ---------------------------------------------------------------------------------
# GPTQ fixes each block's scale (and min) before the block's columns are quantized, then rounds
# every column onto that grid as quantize_row_*_ref rounds; the codes are written by
# encode_from_codes, so llama.cpp decodes the result at full speed.

def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C roundf: halves away from zero (floor(|x| + 0.5) would round 0.49999997 up in float32)."""
    t = torch.trunc(x)
    return t + torch.where((x - t).abs() >= 0.5, torch.sign(x), torch.zeros_like(x))


# Candidate scales of the block scale search, as multiples of the max-based scale.
SYM_FACTORS = torch.tensor([0.80, 0.84, 0.87, 0.90, 0.92, 0.94, 0.96, 0.98, 1.0, 1.02, 1.05])
_ASYM_SHRINK = torch.tensor([0.0, 0.03, 0.06, 0.1, 0.15])


def _search_sym(w: torch.Tensor, imp: torch.Tensor, levels: int, offset: int) -> torch.Tensor:
    # The same float operations, in the same order, as the plain expressions in the comments,
    # in place on two [rows, C, 32] buffers (no temporary per operation): GPTQ's hot spot.
    x = w[:, None, :]
    amax = w.gather(1, w.abs().argmax(dim=1, keepdim=True))          # signed, [rows, 1]
    d0 = amax / -offset                                               # llama.cpp's own scale
    d = d0 * SYM_FACTORS[None, :]                                    # [rows, C]
    L = _sym_levels(x, d, levels, offset)     # trunc(x / d + offset + 0.5).clamp(0, levels) - offset
    t = torch.mul(imp * x, L)
    num = t.sum(-1)                                                   # (imp * x * L).sum(-1)
    den = torch.mul(imp, L, out=t).mul_(L).sum(-1)                    # (imp * L * L).sum(-1)
    d_ls = torch.where(den > 0, num / den.clamp_min(1e-30), d)       # least-squares refit
    d = torch.cat([d0, d_ls], dim=1).half().float()                   # llama.cpp's rule stays a candidate
    L = _sym_levels(x, d, levels, offset)
    L.mul_(d[..., None])
    err = torch.sub(x, L, out=L).pow_(2).mul_(imp).sum(-1)            # (imp * (x - L * d) ** 2).sum(-1)
    err = torch.where(torch.isfinite(d), err, torch.full_like(err, float("inf")))
    best = err.argmin(dim=1, keepdim=True)
    return d.gather(1, best).squeeze(1)


def _sym_levels(x: torch.Tensor, d: torch.Tensor, levels: int, offset: int) -> torch.Tensor:
    """trunc(x / d + offset + 0.5).clamp(0, levels) - offset, as clamp then floor: the same
    values (floor is trunc on 0..levels), and torch's CPU floor is ~10x faster than its trunc."""
    L = torch.mul(x, safe_inverse(d)[..., None])
    return L.add_(offset + 0.5).clamp_(0, levels).floor_().sub_(offset)


def _search_asym(w: torch.Tensor, imp: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = w[:, None, :]
    lo, hi = w.min(dim=1).values, w.max(dim=1).values
    rng = (hi - lo)[:, None, None]
    a, b = torch.meshgrid(_ASYM_SHRINK, _ASYM_SHRINK, indexing="ij")
    mn = lo[:, None] + (rng[..., 0] * a.reshape(1, -1))                  # [rows, C]
    mx = hi[:, None] - (rng[..., 0] * b.reshape(1, -1))
    d = (mx - mn) / levels
    L = torch.trunc((x - mn[..., None]) * safe_inverse(d)[..., None] + 0.5).clamp(0, levels)
    # weighted least squares of x ≈ d L + m
    sw, sl, sx = imp.sum(-1), (imp * L).sum(-1), (imp * x).sum(-1)
    sll, slx = (imp * L * L).sum(-1), (imp * L * x).sum(-1)
    det = sw * sll - sl * sl
    ok = det > 1e-12 * sw * sll
    d_ls = (sw * slx - sl * sx) / torch.where(ok, det, torch.ones_like(det))
    m_ls = (sll * sx - sl * slx) / torch.where(ok, det, torch.ones_like(det))
    fit = ok & (d_ls > 0)
    d = torch.cat([d, torch.where(fit, d_ls, d)], dim=1).half().float()   # raw candidates stay
    mn = torch.cat([mn, torch.where(fit, m_ls, mn)], dim=1).half().float()
    L = torch.trunc((x - mn[..., None]) * safe_inverse(d)[..., None] + 0.5).clamp(0, levels)
    err = (imp * (x - (L * d[..., None] + mn[..., None])) ** 2).sum(-1)
    err = torch.where(torch.isfinite(d) & torch.isfinite(mn), err, torch.full_like(err, float("inf")))
    best = err.argmin(dim=1, keepdim=True)
    return mn.gather(1, best).squeeze(1), d.gather(1, best).squeeze(1)


def search_block_scale(w: torch.Tensor, imp: torch.Tensor, levels: int, offset: int, has_min: bool):
    """Per row of w [rows, 32]: the block scale d (and min mn) minimising Σ_j imp_j (w_j - ŵ_j)²
    over a few candidate grids, each refitted by weighted least squares given its codes, as
    llama.cpp's importance-matrix quantizers (make_qx_quants / make_qkx3_quants) do. Returns
    (mn, d) float32 [rows]; mn is zero for the symmetric types."""
    imp = imp.clamp_min(0).to(w.dtype)[None, None, :]
    w = w.contiguous()               # GPTQ passes a transposed view: strided broadcasts are slow
    if not has_min:
        return torch.zeros(w.shape[0]), _search_sym(w, imp, levels, offset)
    return _search_asym(w, imp, levels)


@dataclass(frozen=True)
class LegacyParams:
    """One block's grid per row, float32 [rows]: the min and inverse scale the codes are taken
    with, and d and m as stored (fp16 values)."""
    mn: torch.Tensor
    inv: torch.Tensor
    d16: torch.Tensor
    m16: torch.Tensor


@dataclass
class LegacyBlocks:
    """A weight on a llama.cpp block grid: codes uint8 [out, in] (unsigned; q8_0 stored +128),
    d and m float32 [out, in/32] (fp16 values)."""
    format: LegacyFormat
    codes: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None

    @property
    def name(self) -> str:
        return self.format.name

    def to_bytes(self) -> torch.Tensor:
        """uint8 [out, row_bytes]: the GGUF rows."""
        out_f, in_f = self.codes.shape
        out = None
        step = max(1, (1 << 22) // in_f)          # rows per encode: bounded temporaries
        for r0 in range(0, out_f, step):
            r1 = min(r0 + step, out_f)
            b = encode_from_codes(self.format, self.codes[r0:r1].reshape(-1, BLOCK), self.d[r0:r1].reshape(-1),
                                  None if self.m is None else self.m[r0:r1].reshape(-1))
            if out is None:
                out = torch.empty(out_f, b.numel() // (r1 - r0), dtype=torch.uint8)
            out[r0:r1] = b.reshape(r1 - r0, -1)
        return out if out is not None else torch.empty(0, 0, dtype=torch.uint8)

    def split_rows(self, rows: list[int]) -> list["LegacyBlocks"]:
        ms = self.m.split(rows) if self.m is not None else [None] * len(rows)
        return [LegacyBlocks(self.format, c, d, m)
                for c, d, m in zip(self.codes.split(rows), self.d.split(rows), ms)]

    def dequantize(self) -> torch.Tensor:
        out_f, in_f = self.codes.shape
        q = self.codes.reshape(out_f, -1, BLOCK).float()
        d = self.d[..., None]
        w = q * d + self.m[..., None] if self.format.has_min else (q - self.format.offset) * d
        return w.reshape(out_f, in_f)


class LegacyGrid:
    """GPTQ's view of a legacy block of 32, following quantize_row_*_ref: scale from the block
    (first element of largest magnitude, or min/max), d stored as fp16 while the codes use 1/d
    in float32, truncation after +8.5 (+16.5, +0.5), roundf for Q8_0. Later columns of a block,
    moved by GPTQ's updates, may fall outside the block's range: they clamp to the nearest code,
    which the reference never needs. With `search`, the scale (and min) come from
    search_block_scale instead of the max-based rule; the format is unchanged."""

    width = BLOCK
    codes_dtype = torch.uint8

    def __init__(self, fmt: LegacyFormat, in_features: int, search: bool = False):
        if in_features % BLOCK:
            raise ValueError(f"{fmt.name} needs rows that are a multiple of {BLOCK}, got {in_features}")
        self.format = fmt
        self.levels, self.offset, self.has_min = fmt.levels, fmt.offset, fmt.has_min
        self.search = search and not fmt.int8

    def params(self, w: torch.Tensor, imp: torch.Tensor | None = None) -> LegacyParams:
        w = w.float()
        if not torch.isfinite(w).all():
            raise ValueError("weights contain NaN or Inf")
        mn = torch.zeros(w.shape[0])
        if self.search and imp is not None:
            mn, d = search_block_scale(w, imp, self.levels, self.offset, self.has_min)
        elif self.has_min:
            mn = w.min(dim=1).values
            d = (w.max(dim=1).values - mn) / self.levels
        elif self.format.int8:
            d = w.abs().max(dim=1).values / 127
        else:
            amax = w.gather(1, w.abs().argmax(dim=1, keepdim=True)).squeeze(1)
            d = amax / -(self.offset)
        m16 = mn.half().float()
        d16 = d.half().float()
        if not (torch.isfinite(d16).all() and torch.isfinite(m16).all()):
            raise ValueError(f"a block's scale overflows fp16 (|w| up to {float(w.abs().max()):.3g})")
        return LegacyParams(mn, safe_inverse(d), d16, m16)

    def round(self, w: torch.Tensor, p: LegacyParams, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.format.int8:
            q = _roundf(w * p.inv).clamp(-128, 127) + 128
            return q, (q - 128) * p.d16
        if self.has_min:
            q = torch.trunc((w - p.mn) * p.inv + 0.5).clamp(0, self.levels)
            return q, q * p.d16 + p.m16
        q = torch.trunc(w * p.inv + (self.offset + 0.5)).clamp(0, self.levels)
        return q, (q - self.offset) * p.d16

    def stored(self, params: list[LegacyParams], codes: torch.Tensor) -> LegacyBlocks:
        d16 = torch.stack([p.d16 for p in params], dim=1)
        m16 = torch.stack([p.m16 for p in params], dim=1) if self.has_min else None
        return LegacyBlocks(self.format, codes.to(torch.uint8), d16, m16)

    def join(self, pieces: list[LegacyBlocks], codes: torch.Tensor, shape: tuple[int, int]) -> LegacyBlocks:
        return LegacyBlocks(self.format, codes, torch.cat([p.d for p in pieces]),
                            torch.cat([p.m for p in pieces]) if self.has_min else None)


FORMATS = (Q8_0, Q5_1, Q5_0, Q4_1, Q4_0)
