"""llama.cpp's non-linear 4-bit types IQ4_NL and IQ4_XS in torch.

Both store 4-bit indices into the 16-level codebook `kvalues_iq4nl` (ggml-common.h) times a
block scale. IQ4_NL: blocks of 32 with an fp16 scale. IQ4_XS: super-blocks of 256 with an fp16
super-block scale and a 6-bit signed scale per 32-value sub-block.

The encoder is quantize_row_iq4_nl_impl (ggml-quants.c), the path `ggml_quantize_chunk` and
llama-quantize take for both types, with and without importance weights (ntry = 7), operation
by operation in float32 so the bytes are llama.cpp's:

- weights: x^2, or with importance weights qw * sqrt(sigma2 + x^2), sigma2 = 2/n * sum x^2 over
  the super-block, summed left to right;
- the block scale: a weighted least-squares fit of the codes chosen at 1/d = 127/max, then at
  the 15 inverse scales (t - 127)/max, t = -7..7, keeping the fit with the largest sumqx^2/sumq2
  (strict, the earliest wins); sumqx and sumq2 are sums left to right over the 32 values, so they
  are accumulated column by column (one tensor op per column, over every block and candidate);
- best_index_int8: the nearest codebook value, ties to the upper one. The codebook's midpoints
  are multiples of 0.5 and, near each midpoint, llama.cpp's float differences are exact, so the
  choice is a table lookup on floor(2 * x) (`_LUT_Q`, `_LUT_I`).
- IQ4_XS: the sub-block scales on a 6-bit grid under d = -max_scale/32 (max_scale: the first
  scale of largest magnitude), nearest_int (ties to even), the codes re-chosen at d * l.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType as T

from .bits import BlockLayout, absmax_signed, f16_bytes, f16_from, pack_nibbles, safe_inverse, u8, unpack_nibbles

KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
VALUES = torch.tensor(KVALUES, dtype=torch.float32)
SUB = 32                                    # values per scale: an IQ4_NL block, an IQ4_XS sub-block
SUPER = 256                                 # values per IQ4_XS super-block
NTRY = 7
GROUP_MAX_EPS = torch.tensor(1e-15, dtype=torch.float32)

NL_LAYOUT = BlockLayout(T.IQ4_NL, ("d", 2), ("qs", SUB // 2))
XS_LAYOUT = BlockLayout(T.IQ4_XS, ("d", 2), ("scales_h", 2), ("scales_l", SUPER // 64), ("qs", SUPER // 2))

# floor(2x), clamped to [-256, 255] and offset by 256 -> the nearest level's index and value.
_MID2 = [KVALUES[i] + KVALUES[i + 1] for i in range(15)]          # 2 * midpoints, integers
_K = torch.arange(-256, 256)
_LUT_I = sum((_K >= m).to(torch.int64) for m in _MID2)
_LUT_Q = VALUES[_LUT_I].contiguous()
_TRIES = torch.arange(-NTRY, NTRY + 1, dtype=torch.float32) + KVALUES[0]   # itry + values[0]


def _lut_index(x2: torch.Tensor) -> torch.Tensor:
    """2*x (float32; consumed) -> int64 index into _LUT_I / _LUT_Q (through int32: torch's
    float -> int64 conversion is some 20x slower than float -> int32 -> int64)."""
    i = x2.floor_().clamp_(-256, 255).add_(256).to(torch.int32)
    return i.clamp_(0, 511).to(torch.int64)                # NaN (unchecked input): a valid index


def _lookup(lut: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """lut[idx] (index_select on the flat index: some 10x faster than advanced indexing)."""
    return lut.index_select(0, idx.reshape(-1)).reshape(idx.shape)


def best_index(x: torch.Tensor, inv2: torch.Tensor) -> torch.Tensor:
    """best_index_int8(16, kvalues_iq4nl, inv * x) for inv2 = 2 * inv (broadcast): int64 codes."""
    return _lookup(_LUT_I, _lut_index(x * inv2))


def nearest_level(x2: torch.Tensor) -> torch.Tensor:
    """The codebook value nearest to x, given 2*x (float32; consumed)."""
    return _lookup(_LUT_Q, _lut_index(x2))


def _seq_sum(cols: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0, left to right in float32 from 0 (C's `s += v` loop)."""
    s = torch.zeros_like(cols[0])
    for j in range(cols.shape[0]):
        s.add_(cols[j])
    return s


def sqrtf(v: torch.Tensor) -> torch.Tensor:
    """C's sqrtf, correctly rounded: through float64 (torch's float32 sqrt is off by an ulp at
    times; the float64 root rounded to float32 is the correctly rounded float32 root)."""
    return torch.sqrt(v.double()).float()


def weights(xT: torch.Tensor, qwT: torch.Tensor | None, group: int) -> torch.Tensor:
    """xT float32 [group, n] (values along dim 0), qwT [group, n] or None -> weight[j] as
    quantize_row_iq4_nl_impl sets it: x^2, or qw * sqrt(sigma2 + x^2)."""
    sq = xT * xT
    if qwT is None:
        return sq
    sigma2 = _seq_sum(sq) * (2.0 / group)
    return qwT * sqrtf(sigma2[None, :] + sq)


_WORK = threading.local()


def _buffer(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A per-thread scratch tensor of `shape`, reused from call to call. The search's temporaries
    are a few MB per chunk: allocated afresh, each costs its page faults on first touch, which
    measured 3-5x the search's own arithmetic."""
    n = 1
    for s in shape:
        n *= s
    buf = getattr(_WORK, name, None)
    if buf is None or buf.numel() < n or buf.dtype != dtype:
        buf = torch.empty(n, dtype=dtype)
        setattr(_WORK, name, buf)
    return buf[:n].view(shape)


SEARCH_STEP = 1024      # blocks per search step: bounds the scratch buffers at ~12 MB per thread


def block_scales(xT: torch.Tensor, wT: torch.Tensor) -> torch.Tensor:
    """llama.cpp's scale search for blocks of 32 (ntry = 7): xT, wT float32 [32, n] -> d [n]."""
    n = xT.shape[1]
    if n <= SEARCH_STEP:
        return _block_scales(xT, wT)
    return torch.cat([_block_scales(xT[:, i:i + SEARCH_STEP], wT[:, i:i + SEARCH_STEP])
                      for i in range(0, n, SEARCH_STEP)])


def _block_scales(xT: torch.Tensor, wT: torch.Tensor) -> torch.Tensor:
    mx, amax = absmax_signed(xT, 0)
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)         # zero blocks: any finite search, d = 0
    ids = torch.empty(mx.shape[0], 2 * NTRY + 2)
    ids[:, 0] = 1.0 / ((-mx) / float(KVALUES[0]))
    ids[:, 1:] = _TRIES[None, :] / mx[:, None]
    shape = (SUB, mx.shape[0], 2 * NTRY + 2)
    a = torch.mul(xT[:, :, None], (ids * 2.0)[None], out=_buffer("a", shape, torch.float32))
    i32 = _buffer("i32", shape, torch.int32).copy_(a.floor_().clamp_(-256, 255).add_(256)).clamp_(0, 511)
    i64 = _buffer("i64", shape, torch.int64).copy_(i32)
    q = _buffer("q", shape, torch.float32)
    torch.index_select(_LUT_Q, 0, i64.view(-1), out=q.view(-1))              # the levels, [32, n, 16]
    wq = torch.mul(wT[:, :, None], q, out=_buffer("wq", shape, torch.float32))
    sqx = _seq_sum(torch.mul(wq, xT[:, :, None], out=a))
    sq2 = _seq_sum(wq.mul_(q))
    a, b = sqx[:, 0], sq2[:, 0]
    pos = b > 0
    d = torch.where(pos, a / torch.where(pos, b, torch.ones_like(b)), torch.zeros_like(a))
    best = d * a
    for c in range(1, 2 * NTRY + 2):
        a, b = sqx[:, c], sq2[:, c]
        dn = a / b
        take = (b > 0) & (a * a > best * b)
        d = torch.where(take, dn, d)
        best = torch.where(take, dn * a, best)
    return torch.where(zero, torch.zeros_like(d), d)


def encode_nl(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    """IQ4_NL: x float32 [n, 32] (qw: importance weights [n, 32] or None) -> uint8 [n, 18]."""
    if not x.shape[0]:
        return torch.empty(0, NL_LAYOUT.type_size, dtype=torch.uint8)
    xT = x.t().contiguous()
    d = block_scales(xT, weights(xT, None if qw is None else qw.t().contiguous(), SUB))
    L = best_index(x, (safe_inverse(d) * 2.0)[:, None])
    return torch.cat([f16_bytes(d), pack_nibbles(L)], dim=1)


def xs_scales(d_sub: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sub-block scales float32 [n, 8] -> (super-block d float32 [n], 6-bit l int [n, 8] in
    -32..31, the sub-block scales d*l float32 [n, 8]) as quantize_row_iq4_nl_impl sets them."""
    ms, amax = absmax_signed(d_sub, 1)
    ms = torch.where(amax > 0, ms, torch.zeros_like(ms))
    d = -ms / 32.0
    l = torch.round(safe_inverse(d)[:, None] * d_sub).clamp_(-32, 31)
    return d, l, d[:, None] * l


def pack_xs(d: torch.Tensor, l: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """d float32 [n], l [n, 8] in -32..31, codes L [n, 256] in 0..15 -> uint8 [n, 136]."""
    n = d.shape[0]
    ls = l.to(torch.int32) + 32
    lo = ls & 15
    scales_l = (lo[:, 0::2] | (lo[:, 1::2] << 4)).to(torch.uint8)
    scales_h = ((ls >> 4) << (2 * torch.arange(8, dtype=torch.int32))).sum(dim=1).to(torch.int16)
    qs = pack_nibbles(L.reshape(n * 8, SUB)).reshape(n, SUPER // 2)
    return torch.cat([f16_bytes(d), u8(scales_h.reshape(-1, 1)), scales_l, qs], dim=1)


def encode_xs(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    """IQ4_XS: x float32 [n, 256] (qw [n, 256] or None) -> uint8 [n, 136]."""
    n = x.shape[0]
    if not n:
        return torch.empty(0, XS_LAYOUT.type_size, dtype=torch.uint8)
    xs = x.reshape(n * 8, SUB)
    xT = xs.t().contiguous()
    if qw is None:
        wT = xT * xT
    else:
        full = x.t().contiguous()
        sigma2 = _seq_sum(full * full) * (2.0 / SUPER)                           # [n]
        wT = qw.reshape(n * 8, SUB).t() * sqrtf(sigma2.repeat_interleave(8)[None, :] + xT * xT)
    d, l, dl = xs_scales(block_scales(xT, wT).reshape(n, 8))
    L = best_index(xs, (safe_inverse(dl.reshape(-1)) * 2.0)[:, None])
    return pack_xs(d, l, L.reshape(n, SUPER))


def decode_nl(b: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 18] -> float32 [n, 32], dequantize_row_iq4_nl."""
    d = f16_from(b[:, NL_LAYOUT.d])
    return d[:, None] * VALUES[unpack_nibbles(b[:, NL_LAYOUT.qs])]


def xs_sub_scales(b: torch.Tensor) -> torch.Tensor:
    """The 6-bit sub-block scales ls - 32 of IQ4_XS blocks uint8 [n, 136] -> int32 [n, 8]."""
    sh = b[:, XS_LAYOUT.scales_h].to(torch.int32)
    sh = sh[:, 0] | (sh[:, 1] << 8)
    sl = b[:, XS_LAYOUT.scales_l].to(torch.int32)
    lo = torch.stack([sl & 15, sl >> 4], dim=2).reshape(-1, 8)
    hi = (sh[:, None] >> (2 * torch.arange(8, dtype=torch.int32))) & 3
    return (lo | (hi << 4)) - 32


def decode_xs(b: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 136] -> float32 [n, 256], dequantize_row_iq4_xs."""
    n = b.shape[0]
    dl = f16_from(b[:, XS_LAYOUT.d])[:, None] * xs_sub_scales(b).float()          # [n, 8]
    q = VALUES[unpack_nibbles(b[:, XS_LAYOUT.qs].reshape(n * 8, SUB // 2))].reshape(n, 8, SUB)
    return (dl[:, :, None] * q).reshape(n, SUPER)


# ---- GPTQ grid -----------------------------------------------------------------------------------
# When GPTQ reaches a block (IQ4_NL: 32 columns; IQ4_XS: a super-block of 256) the scales come from
# llama.cpp's own search on the partially updated weights: unweighted (x^2, the bytes
# llama-quantize writes without an imatrix), or, with `search`, weighted by each column's
# importance as llama.cpp weights by an imatrix (qw * sqrt(sigma2 + x^2)). Every column is then
# rounded onto the nearest codebook level times its block's scale, as llama.cpp's final pass
# rounds (best_index_int8 at the float32 inverse scale); the stored scales are the fp16 ones.

@dataclass(frozen=True)
class IQ4Params:
    """One block (IQ4_NL) or super-block (IQ4_XS) per row: 2/scale float32 [rows, nsub] for the
    rounding, the decoded scale [rows, nsub] for the values, the stored fp16 d [rows], and the
    6-bit sub-block scales l [rows, 8] (IQ4_XS; None for IQ4_NL)."""
    inv2: torch.Tensor
    scale: torch.Tensor
    d: torch.Tensor
    l: torch.Tensor | None


@dataclass
class IQ4Blocks:
    """A weight on an IQ4 grid: codes uint8 [out, in] (0..15), d float32 [out, in/block] (fp16
    values), l [out, in/256] x 8 sub-block scales (IQ4_XS) or None."""
    xs: bool
    codes: torch.Tensor
    d: torch.Tensor
    l: torch.Tensor | None

    @property
    def name(self) -> str:
        return "iq4_xs" if self.xs else "iq4_nl"

    def to_bytes(self) -> torch.Tensor:
        out_f, in_f = self.codes.shape
        if self.xs:
            b = pack_xs(self.d.reshape(-1), self.l.reshape(-1, 8), self.codes.reshape(-1, SUPER))
        else:
            b = torch.cat([f16_bytes(self.d.reshape(-1)), pack_nibbles(self.codes.reshape(-1, SUB))], dim=1)
        return b.reshape(out_f, -1)

    def split_rows(self, rows: list[int]) -> list["IQ4Blocks"]:
        ls = self.l.split(rows) if self.l is not None else [None] * len(rows)
        return [IQ4Blocks(self.xs, c, d, l) for c, d, l in zip(self.codes.split(rows), self.d.split(rows), ls)]

    def dequantize(self) -> torch.Tensor:
        out_f, in_f = self.codes.shape
        if self.xs:
            s = (self.d[..., None] * self.l.reshape(out_f, -1, 8).float()).reshape(out_f, -1)
        else:
            s = self.d
        q = VALUES[self.codes.long()].reshape(out_f, -1, SUB)
        return (s[..., None] * q).reshape(out_f, in_f)


class IQ4Grid:
    """GPTQ's view of IQ4_NL (xs=False, groups of 32) or IQ4_XS (xs=True, super-blocks of 256)."""

    codes_dtype = torch.uint8

    def __init__(self, xs: bool, in_features: int, search: bool = False):
        self.xs = xs
        self.width = SUPER if xs else SUB
        if in_features % self.width:
            raise ValueError(f"{'iq4_xs' if xs else 'iq4_nl'} needs rows that are a multiple of {self.width}, "
                             f"got {in_features}")
        self.search = search

    def params(self, w: torch.Tensor, imp: torch.Tensor | None = None) -> IQ4Params:
        w = w.float().contiguous()
        if not torch.isfinite(w).all():
            raise ValueError("weights contain NaN or Inf")
        rows = w.shape[0]
        qw = None
        if self.search and imp is not None:
            qw = imp.float().clamp_min(0).reshape(1, -1).expand(rows, -1)
        xs = w.reshape(-1, SUB)
        xT = xs.t().contiguous()
        if qw is None:
            wT = xT * xT
        else:
            sigma2 = _seq_sum(w.t() * w.t()) * (2.0 / self.width)
            wT = qw.reshape(-1, SUB).t() * sqrtf(sigma2.repeat_interleave(self.width // SUB)[None, :] + xT * xT)
        d_sub = block_scales(xT, wT).reshape(rows, -1)
        if not self.xs:
            d16 = d_sub[:, 0].half().float()
            if not torch.isfinite(d16).all():
                raise ValueError(f"a block's scale overflows fp16 (|w| up to {float(w.abs().max()):.3g})")
            return IQ4Params(safe_inverse(d_sub) * 2.0, d16[:, None], d16, None)
        d, l, dl = xs_scales(d_sub)
        d16 = d.half().float()
        if not torch.isfinite(d16).all():
            raise ValueError(f"a super-block's scale overflows fp16 (|w| up to {float(w.abs().max()):.3g})")
        return IQ4Params(safe_inverse(dl) * 2.0, d16[:, None] * l, d16, l.to(torch.int8))

    def round(self, w: torch.Tensor, p: IQ4Params, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = j // SUB
        q = best_index(w.float(), p.inv2[:, s])
        return q.float(), p.scale[:, s] * VALUES[q]

    def stored(self, params: list[IQ4Params], codes: torch.Tensor) -> IQ4Blocks:
        d = torch.stack([p.d for p in params], dim=1)
        l = torch.stack([p.l for p in params], dim=1) if self.xs else None
        return IQ4Blocks(self.xs, codes.to(torch.uint8), d, l)

    def join(self, pieces: list[IQ4Blocks], codes: torch.Tensor, shape: tuple[int, int]) -> IQ4Blocks:
        return IQ4Blocks(self.xs, codes, torch.cat([p.d for p in pieces]),
                         torch.cat([p.l for p in pieces]) if self.xs else None)
