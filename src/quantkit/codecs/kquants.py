"""llama.cpp's K-quants (Q6_K, Q5_K, Q4_K, Q3_K, Q2_K) in vectorized torch, bit-exact.

Each format's `encode(x[n, 256]) -> uint8[n, type_size]` reproduces ggml-quants.c's
`quantize_row_<type>_ref`, which is what `quantize_<type>` (and so llama-quantize) runs when no
importance matrix is given (the arithmetic, and what makes its bytes equal, in
codecs/kquant_scales.py); `decode` reproduces `dequantize_row_<type>`. Every K-quant block
decodes as value = s[sub] * (L - off) - m[sub] with codes L in 0..nmax, which is also the grid
GPTQ rounds onto (`KGrid`).

Speed, measured on the 2-core development machine while other jobs loaded it (load 4-6): a
640 x 262144 tensor (168M values) to Q6_K in 23-28 s wall, 15 s of CPU time, where llama.cpp's
own single-threaded quantize_q6_K took 14 s wall; the other types cost 1.0-1.3x Q6_K's CPU
time; decoding 168M values takes 1.4 s. Chunks of CHUNK_BLOCKS super-blocks run on worker
threads with torch's intra-op threading off (codecs/parallel.py). See benchmarks/kquants_speed.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from gguf import GGMLQuantizationType as T

from .bits import BlockLayout, f16_from, fp16
from .kquant_scales import (GROUP_MAX_EPS, clamped_levels, div, first_absmax, make_q3_quants_rmse,
                            make_qkx2_search, make_qp_search, make_qx_search, nearest_int, positive_max, qkx2_levels,
                            qx_levels, rowsum_seq, seqsum_into, sqrtf, wrap_i8)

QK_K = 256

# Super-blocks per chunk: temporaries of a few MB stay in cache; the per-op Python overhead
# (a few hundred ops per chunk) stays small next to the arithmetic.
CHUNK_BLOCKS = 1024

# Field widths from ggml-common.h (block_q6_K ...); offsets and the total follow from them.
Q6_K_LAYOUT = BlockLayout(T.Q6_K, ("ql", QK_K // 2), ("qh", QK_K // 4), ("scales", QK_K // 16), ("d", 2))
Q5_K_LAYOUT = BlockLayout(T.Q5_K, ("d", 2), ("dmin", 2), ("scales", 12), ("qh", QK_K // 8), ("qs", QK_K // 2))
Q4_K_LAYOUT = BlockLayout(T.Q4_K, ("d", 2), ("dmin", 2), ("scales", 12), ("qs", QK_K // 2))
Q3_K_LAYOUT = BlockLayout(T.Q3_K, ("hmask", QK_K // 8), ("qs", QK_K // 4), ("scales", 12), ("d", 2))
Q2_K_LAYOUT = BlockLayout(T.Q2_K, ("scales", QK_K // 16), ("qs", QK_K // 4), ("d", 2), ("dmin", 2))


def _cols(x: torch.Tensor, sub: int) -> torch.Tensor:
    """x[nb, 256] -> [sub, nb*256/sub]: column m is sub-block m, element i of it in row i."""
    return x.reshape(-1, sub).t().contiguous()


def _rows_u8(L: torch.Tensor, nb: int) -> torch.Tensor:
    """Levels [sub, M] (int, small) -> uint8 [nb, 256] in element order."""
    return L.to(torch.uint8).t().reshape(nb, QK_K)


# ----------------------------------------------------------------------------- packing

def _pack_2bit(L: torch.Tensor) -> torch.Tensor:
    """L[nb, 256] in 0..3 -> qs[nb, 64]: byte 32h + l holds L[128h + l + 32k] at bits 2k."""
    q = L.reshape(-1, 2, 4, 32)
    out = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    return out.reshape(-1, 64)


def _unpack_2bit(qs: torch.Tensor) -> torch.Tensor:
    """qs uint8 [nb, 64] -> levels uint8 [nb, 256] (the inverse of _pack_2bit)."""
    q = qs.contiguous().reshape(-1, 2, 1, 32)
    return torch.cat([q & 3, (q >> 2) & 3, (q >> 4) & 3, q >> 6], dim=2).reshape(-1, QK_K)


def _bits8(b: torch.Tensor) -> torch.Tensor:
    """b uint8 [nb, 32] -> [nb, 256] uint8 0/1: element 32k + j is bit k of b[j]."""
    q = b.contiguous().reshape(-1, 1, 32)
    return torch.cat([(q >> k) & 1 for k in range(8)], dim=1).reshape(-1, QK_K)


def _pack_k4_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """The 12-byte 6-bit scale/min layout of Q4_K and Q5_K (get_scale_min_k4's inverse)."""
    lo_s, hi_s = ls[:, :4], ls[:, 4:]
    lo_m, hi_m = lm[:, :4], lm[:, 4:]
    b0 = lo_s | ((hi_s >> 4) << 6)
    b4 = lo_m | ((hi_m >> 4) << 6)
    b8 = (hi_s & 0xF) | ((hi_m & 0xF) << 4)
    return torch.cat([b0, b4, b8], dim=1).to(torch.uint8)


def _unpack_k4_scales(b: torch.Tensor):
    b = b.contiguous()
    b0, b4, b8 = b[:, :4], b[:, 4:8], b[:, 8:12]
    sc = torch.cat([b0 & 63, (b8 & 0xF) | ((b0 >> 6) << 4)], dim=1)
    m = torch.cat([b4 & 63, (b8 >> 4) | ((b4 >> 6) << 4)], dim=1)
    return sc, m


def _q6_k(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    """quantize_row_q6_K_ref; with qw [nb, 256], quantize_row_q6_K_impl (the importance weights
    go to make_qx_quants as they are)."""
    nb = x.shape[0]
    xs = _cols(x, 16)
    scale, best_iscale, zero = make_qx_search(xs, 32, None if qw is None else _cols(qw, 16))
    sc = scale.reshape(nb, 16)
    max_scale, max_abs = first_absmax(sc.t())
    zero_block = max_abs < GROUP_MAX_EPS
    iscale = div(-128.0, torch.where(zero_block, 1.0, max_scale))
    d_bytes, d = fp16(div(1.0, iscale))
    q_sc = wrap_i8(nearest_int(iscale[:, None] * sc).clamp_(max=127))
    dl = (d[:, None] * q_sc.float()).reshape(-1)
    nz = dl != 0
    L = clamped_levels(xs / torch.where(nz, dl, 1.0), -32, 31)
    if not bool(nz.all()):   # `if (!d) continue;`: make_qx_quants' levels stay
        cols = (~nz).nonzero()[:, 0]
        L[:, cols] = qx_levels(xs[:, cols], best_iscale[cols], zero[cols], 32)
    out = torch.cat([_pack_q6_codes(_rows_u8(L, nb)), q_sc.to(torch.int8).view(torch.uint8), d_bytes], dim=1)
    if bool(zero_block.any()):
        out[zero_block] = 0
    return out


def _pack_q6_codes(Lb: torch.Tensor) -> torch.Tensor:
    """levels uint8 [nb, 256] in 0..63 -> ql (128 bytes) + qh (64 bytes)."""
    nb = Lb.shape[0]
    Lb = Lb.reshape(nb, 2, 4, 32)
    lo = Lb & 0xF
    ql = torch.cat([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], dim=2)
    hi = Lb >> 4
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    return torch.cat([ql.reshape(nb, 128), qh.reshape(nb, 64)], dim=1)


def _q6_codes(b: torch.Tensor) -> torch.Tensor:
    """levels uint8 [nb, 256] in 0..63 (_pack_q6_codes' inverse)."""
    nb = b.shape[0]
    # contiguous copies first: torch's uint8 shifts are slow on strided views
    ql = b[:, Q6_K_LAYOUT.ql].contiguous().reshape(nb, 2, 1, 64)
    qh = b[:, Q6_K_LAYOUT.qh].contiguous().reshape(nb, 2, 1, 32)
    lo = torch.cat([ql[..., :32] & 0xF, ql[..., 32:] & 0xF, ql[..., :32] >> 4, ql[..., 32:] >> 4], dim=2)
    hi = torch.cat([(qh & 3) << 4, ((qh >> 2) & 3) << 4, ((qh >> 4) & 3) << 4, (qh >> 6) << 4], dim=2)
    return (lo | hi).reshape(nb, QK_K)


def _q45_k(x: torch.Tensor, nmax: int, rmin: float, nstep: int):
    """The common part of quantize_row_q4_K_ref / q5_K_ref: header bytes and levels uint8[nb, 256]."""
    nb = x.shape[0]
    xs = _cols(x, 32)
    av_x = sqrtf(seqsum_into(xs * xs, torch.empty(xs.shape[1])) / 32.0)
    w = xs.abs().add_(av_x)
    scale, the_min, sel_iscale, sel_min, flat = make_qkx2_search(xs, w, nmax, rmin, 0.1, nstep, False)
    sc, mins = scale.reshape(nb, 8), the_min.reshape(nb, 8)
    max_scale, max_min = positive_max(sc), positive_max(mins)
    inv_scale = torch.where(max_scale > 0, div(63.0, torch.where(max_scale > 0, max_scale, 1.0)), 0.0)
    inv_min = torch.where(max_min > 0, div(63.0, torch.where(max_min > 0, max_min, 1.0)), 0.0)
    # (uint8_t)nearest_int(..) wraps modulo 256 before MIN(63, ..)
    ls = (nearest_int(inv_scale[:, None] * sc) & 0xFF).clamp_(max=63)
    lm = (nearest_int(inv_min[:, None] * mins) & 0xFF).clamp_(max=63)
    d_bytes, d = fp16(max_scale / 63.0)
    m_bytes, dmin = fp16(max_min / 63.0)
    dl = (d[:, None] * ls.float()).reshape(-1)
    ml = (dmin[:, None] * lm.float()).reshape(-1)
    nz = dl != 0
    L = clamped_levels((xs + ml).div_(torch.where(nz, dl, 1.0)), 0, nmax)
    if not bool(nz.all()):
        cols = (~nz).nonzero()[:, 0]
        L[:, cols] = qkx2_levels(xs[:, cols], sel_iscale[cols], sel_min[cols], flat[cols], nmax)
    header = torch.cat([d_bytes, m_bytes, _pack_k4_scales(ls, lm)], dim=1)
    return header, _rows_u8(L, nb)


def _pack_q4_codes(L: torch.Tensor) -> torch.Tensor:
    q = L.reshape(-1, 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def _pack_high_bits(hb: torch.Tensor) -> torch.Tensor:
    """hb [nb, 256] of 0/1 -> 32 bytes: bit k of byte j is element 32k + j (_bits8's inverse)."""
    hb = hb.reshape(-1, 8, 32)
    out = hb[:, 0].clone()
    for k in range(1, 8):
        out |= hb[:, k] << k
    return out


def _pack_q5_codes(L: torch.Tensor) -> torch.Tensor:
    """levels [nb, 256] in 0..31 -> qh (32 bytes) + ql (128 bytes)."""
    return torch.cat([_pack_high_bits(L >> 4), _pack_q4_codes(L & 0xF)], dim=1)


def _q4_k(x: torch.Tensor) -> torch.Tensor:
    header, L = _q45_k(x, 15, -1.0, 20)
    return torch.cat([header, _pack_q4_codes(L)], dim=1)


def _q5_k(x: torch.Tensor) -> torch.Tensor:
    header, L = _q45_k(x, 31, -0.5, 15)
    return torch.cat([header, _pack_q5_codes(L)], dim=1)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    q = qs.contiguous().reshape(-1, 4, 1, 32)
    return torch.cat([q & 0xF, q >> 4], dim=2).reshape(-1, QK_K)


def _q3_k(x: torch.Tensor) -> torch.Tensor:
    nb = x.shape[0]
    xs = _cols(x, 16)
    scale, L0 = make_q3_quants_rmse(xs, 4)
    sc = scale.reshape(nb, 16)
    max_scale, _ = first_absmax(sc.t())
    has = max_scale != 0
    iscale = div(-32.0, torch.where(has, max_scale, 1.0))
    l = wrap_i8(nearest_int(iscale[:, None] * sc)).clamp_(-32, 31) + 32
    l = l.masked_fill_(~has[:, None], 0)
    return _q3_finish(xs, L0, l, torch.where(has, div(1.0, iscale), 0.0))


def _q3_finish(xs: torch.Tensor, L0: torch.Tensor, l: torch.Tensor, d_block: torch.Tensor) -> torch.Tensor:
    """Q3_K's bytes from the sub-blocks xs [16, M], their search's levels L0, the 6-bit scale
    codes l [nb, 16] (0..63, 32 = zero) and the super-block scale before fp16."""
    nb = l.shape[0]
    d_bytes, d = fp16(d_block)
    dl = (d[:, None] * (l - 32).float()).reshape(-1)
    nz = dl != 0
    L = clamped_levels(xs / torch.where(nz, dl, 1.0), -4, 3)
    if not bool(nz.all()):
        L = torch.where(nz, L, L0)
    lo, hi = l[:, :8], l[:, 8:]
    s_lo = (lo & 0xF) | ((hi & 0xF) << 4)
    g = (l >> 4).reshape(nb, 4, 4)               # scale 4g + k: bits 2g..2g+1 of byte 8 + k
    s_hi = g[:, 0] | (g[:, 1] << 2) | (g[:, 2] << 4) | (g[:, 3] << 6)
    return torch.cat([_pack_q3_codes(_rows_u8(L, nb)), s_lo.to(torch.uint8), s_hi.to(torch.uint8), d_bytes], dim=1)


def _weights(x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """qw * sqrtf(sigma2 + x*x) per element of x [nb, 256], sigma2 [nb] per super-block."""
    return sqrtf(sigma2[:, None] + x * x).mul_(qw)


def _q3_k_weighted(x: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """quantize_row_q3_K_impl: make_qx_quants with the weights on every 16-sub-block, then on the
    16 scales with weights their sub-block's weight sums."""
    nb = x.shape[0]
    xs, ws = _cols(x, 16), _cols(_weights(x, qw, (2 * rowsum_seq(x * x)) / 256.0), 16)
    sw = seqsum_into(ws, torch.empty(ws.shape[1])).reshape(nb, 16).t().contiguous()
    scale, iscale, zero = make_qx_search(xs, 4, ws)
    sc = scale.reshape(nb, 16).t().contiguous()
    d_block, iscale2, zero2 = make_qx_search(sc, 32, sw)
    l = qx_levels(sc, iscale2, zero2, 32).t()
    return _q3_finish(xs, qx_levels(xs, iscale, zero, 4), l, d_block)


def _q2_k_weighted(x: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """quantize_row_q2_K_impl: make_qkx3_quants per 16-sub-block, make_qp_quants on the scales
    and the mins, then every value re-rounded on the stored grid."""
    nb = x.shape[0]
    xs, ws = _cols(x, 16), _cols(_weights(x, qw, rowsum_seq(x * x) / 256.0), 16)
    sw = seqsum_into(ws, torch.empty(ws.shape[1])).reshape(nb, 16).t().contiguous()
    scale, the_min, sel_iscale, sel_min, flat = make_qkx2_search(xs, ws, 3, -0.9, 0.05, 36, False)
    dm, ls = make_qp_search(scale.reshape(nb, 16).t().contiguous(), sw, 15)
    mm, lm = make_qp_search(the_min.reshape(nb, 16).t().contiguous(), sw, 15)
    scales = (ls.t() | (lm.t() << 4)) & 0xFF
    d_bytes, d = fp16(dm)
    m_bytes, dmin = fp16(mm)
    L = _requantize(xs, d[:, None] * (scales & 0xF).float(), dmin[:, None] * (scales >> 4).float(), 3,
                    (sel_iscale, sel_min, flat))
    return torch.cat([scales.to(torch.uint8), _pack_2bit(_rows_u8(L, nb)), d_bytes, m_bytes], dim=1)


def _requantize(xs, dl, ml, nmax, search):
    """`l = MAX(0, MIN(nmax, nearest_int((x + m)/d)))` per sub-block (columns of xs) with d = dl,
    m = ml [nb, subs]; a sub-block with d = 0 keeps its make_qkx3_quants levels."""
    dl, ml = dl.reshape(-1), ml.reshape(-1)
    nz = dl != 0
    L = clamped_levels((xs + ml).div_(torch.where(nz, dl, 1.0)), 0, nmax)
    if not bool(nz.all()):
        cols = (~nz).nonzero()[:, 0]
        sel_iscale, sel_min, flat = search
        L[:, cols] = qkx2_levels(xs[:, cols], sel_iscale[cols], sel_min[cols], flat[cols], nmax)
    return L


def _q45_k_weighted(x: torch.Tensor, qw: torch.Tensor, nmax: int):
    """quantize_row_q4_K_impl / q5_K_impl: header bytes and levels uint8 [nb, 256]."""
    nb = x.shape[0]
    xs, ws = _cols(x, 32), _cols(_weights(x, qw, (2 * rowsum_seq(x * x)) / 256.0), 32)
    sw = seqsum_into(ws, torch.empty(ws.shape[1])).reshape(nb, 8).t().contiguous()
    scale, the_min, sel_iscale, sel_min, flat = make_qkx2_search(xs, ws, nmax, -0.9, 0.05, 36, False)
    d_block, ls = make_qp_search(scale.reshape(nb, 8).t().contiguous(), sw, 63)
    m_block, lm = make_qp_search(the_min.reshape(nb, 8).t().contiguous(), sw, 63)
    ls, lm = ls.t(), lm.t()
    if nmax == 31:                                   # Q5_K clamps the codes, Q4_K stores them as they are
        ls, lm = ls.clamp(max=63), lm.clamp(max=63)
    packed = _pack_k4_scales(ls & 0xFF, lm & 0xFF)
    sc, m = _unpack_k4_scales(packed)                # get_scale_min_k4 of the stored bytes
    d_bytes, d = fp16(d_block)
    m_bytes, dmin = fp16(m_block)
    L = _requantize(xs, d[:, None] * sc.float(), dmin[:, None] * m.float(), nmax, (sel_iscale, sel_min, flat))
    return torch.cat([d_bytes, m_bytes, packed], dim=1), _rows_u8(L, nb)


def _q4_k_weighted(x: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    header, L = _q45_k_weighted(x, qw, 15)
    return torch.cat([header, _pack_q4_codes(L)], dim=1)


def _q5_k_weighted(x: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    header, L = _q45_k_weighted(x, qw, 31)
    return torch.cat([header, _pack_q5_codes(L)], dim=1)


def encode_rows_weighted(fmt: "KFormat", x: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """quantize_<type>(x, quant_weights=qw): x float32 [rows, n], qw float32 [n] (n a multiple
    of 256) -> uint8 [rows, n/256 * type_size], llama.cpp's bytes."""
    rows, n = x.shape
    if n % QK_K:
        raise ValueError(f"{fmt.name}: rows of {n} are not a multiple of {QK_K}")
    xb = x.reshape(-1, QK_K)
    qb = qw.reshape(1, -1).expand(rows, n).reshape(-1, QK_K)
    return fmt.encode_weighted(xb, qb).reshape(rows, -1)


def _pack_q3_codes(Lb: torch.Tensor) -> torch.Tensor:
    """levels [nb, 256] in 0..7 -> hmask (32 bytes; L > 3: bit k of byte m for element 32k + m)
    + the low two bits (64 bytes)."""
    return torch.cat([_pack_high_bits(Lb >> 2), _pack_2bit(Lb & 3)], dim=1)


def _q2_k(x: torch.Tensor) -> torch.Tensor:
    nb = x.shape[0]
    xs = _cols(x, 16)
    scale, the_min, sel_iscale, sel_min, flat = make_qkx2_search(xs, xs.abs(), 3, -0.5, 0.1, 15, True)
    sc, mins = scale.reshape(nb, 16), the_min.reshape(nb, 16)
    max_scale, max_min = positive_max(sc), positive_max(mins)
    has_s, has_m = max_scale > 0, max_min > 0
    iscale = div(15.0, torch.where(has_s, max_scale, 1.0))
    imin = div(15.0, torch.where(has_m, max_min, 1.0))
    ls = nearest_int(iscale[:, None] * sc).masked_fill_(~has_s[:, None], 0)
    lm = nearest_int(imin[:, None] * mins).masked_fill_(~has_m[:, None], 0)
    scales = (ls | (lm << 4)) & 0xFF                 # stored through uint8_t
    d_bytes, d = fp16(torch.where(has_s, max_scale / 15.0, 0.0))
    m_bytes, dmin = fp16(torch.where(has_m, max_min / 15.0, 0.0))
    dl = (d[:, None] * (scales & 0xF).float()).reshape(-1)
    ml = (dmin[:, None] * (scales >> 4).float()).reshape(-1)
    nz = dl != 0
    L = clamped_levels((xs + ml).div_(torch.where(nz, dl, 1.0)), 0, 3)
    if not bool(nz.all()):
        cols = (~nz).nonzero()[:, 0]
        L[:, cols] = qkx2_levels(xs[:, cols], sel_iscale[cols], sel_min[cols], flat[cols], 3)
    return torch.cat([scales.to(torch.uint8), _pack_2bit(_rows_u8(L, nb)), d_bytes, m_bytes], dim=1)


# ----------------------------------------------------------------------------- codes and grids
# Where each format keeps its codes, and each sub-block's (s, m) in the float32 arithmetic of
# dequantize_row_<type>: value = s * (L - off) - m exactly.

def _q5_codes(b: torch.Tensor) -> torch.Tensor:
    return _nibbles(b[:, Q5_K_LAYOUT.qs]) | (_bits8(b[:, Q5_K_LAYOUT.qh]) << 4)


def _q4_codes(b: torch.Tensor) -> torch.Tensor:
    return _nibbles(b[:, Q4_K_LAYOUT.qs])


def _q3_codes(b: torch.Tensor) -> torch.Tensor:
    return _unpack_2bit(b[:, Q3_K_LAYOUT.qs]) | (_bits8(b[:, Q3_K_LAYOUT.hmask]) << 2)


def _q2_codes(b: torch.Tensor) -> torch.Tensor:
    return _unpack_2bit(b[:, Q2_K_LAYOUT.qs])


def _q6_grid(b: torch.Tensor):
    L = Q6_K_LAYOUT
    return f16_from(b[:, L.d])[:, None] * b[:, L.scales].contiguous().view(torch.int8).float(), None


def _k4_grid(b: torch.Tensor):
    """Q4_K and Q5_K: 6-bit scales and mins (get_scale_min_k4) times d and dmin."""
    L = Q4_K_LAYOUT
    d, dmin = f16_from(b[:, L.d]), f16_from(b[:, L.dmin])
    sc, m = _unpack_k4_scales(b[:, L.scales])
    return d[:, None] * sc.float(), dmin[:, None] * m.float()


def _q3_grid(b: torch.Tensor):
    L = Q3_K_LAYOUT
    s = b[:, L.scales].contiguous()
    low = torch.cat([s[:, :8] & 0xF, s[:, :8] >> 4], dim=1)
    g = s[:, 8:12]
    high = torch.cat([g & 3, (g >> 2) & 3, (g >> 4) & 3, g >> 6], dim=1)   # scale 4k + j: byte 8 + j
    return f16_from(b[:, L.d])[:, None] * (low | (high << 4)).float().sub_(32.0), None


def _q2_grid(b: torch.Tensor):
    L = Q2_K_LAYOUT
    s = b[:, L.scales].contiguous()
    d, dmin = f16_from(b[:, L.d]), f16_from(b[:, L.dmin])
    return d[:, None] * (s & 0xF).float(), dmin[:, None] * (s >> 4).float()


@dataclass(frozen=True)
class KFormat:
    """One K-quant type: value = s[sub] * (L - off) - m[sub], codes L in 0..nmax."""
    ggml: T
    layout: BlockLayout
    sub: int                                                     # values per sub-block
    nmax: int                                                    # largest code
    off: int                                                     # subtracted from the code
    codes: slice                                                 # the bytes holding the codes
    pack: Callable[[torch.Tensor], torch.Tensor]                 # codes uint8 [nb, 256] -> those bytes
    unpack: Callable[[torch.Tensor], torch.Tensor]               # block bytes -> codes uint8 [nb, 256]
    grid: Callable[[torch.Tensor], tuple]                        # block bytes -> (s, m or None) [nb, 256/sub]
    encode: Callable[[torch.Tensor], torch.Tensor]               # quantize_row_<type>_ref over [nb, 256]
    encode_weighted: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # quantize_row_<type>_impl (x, qw)

    @property
    def name(self) -> str:
        return self.ggml.name.lower()

    def decode(self, b: torch.Tensor) -> torch.Tensor:
        """dequantize_row_<type> over blocks uint8 [nb, type_size] -> float32 [nb, 256]."""
        nb = b.shape[0]
        s, m = self.grid(b)
        y = self.unpack(b).reshape(nb, QK_K // self.sub, self.sub).float()
        if self.off:
            y.sub_(float(self.off))
        # in place: a broadcast over the innermost dim is several times slower in a new tensor
        y.mul_(s[:, :, None])
        if m is not None:
            y.sub_(m[:, :, None])
        return y.reshape(nb, QK_K)

    def subblock_grid(self, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, m) float32 [nb, 256 / sub] of blocks b; m is zero where the format has none."""
        s, m = self.grid(b)
        return s, torch.zeros_like(s) if m is None else m

    def repack(self, b: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
        """Blocks b uint8 [nb, type_size] with their codes replaced by L [nb, 256] (0..nmax); the
        scales (and mins) are kept: decode(repack(b, L)) == s * (L - off) - m of subblock_grid(b)."""
        L = L.to(torch.int64)
        if L.numel() and (int(L.min()) < 0 or int(L.max()) > self.nmax):
            raise ValueError(f"{self.name} codes out of range 0..{self.nmax}")
        out = b.clone()
        out[:, self.codes] = self.pack(L.to(torch.uint8).reshape(-1, QK_K))
        return out


Q6_K = KFormat(T.Q6_K, Q6_K_LAYOUT, 16, 63, 32, slice(Q6_K_LAYOUT.ql.start, Q6_K_LAYOUT.qh.stop),
               _pack_q6_codes, _q6_codes, _q6_grid, _q6_k, _q6_k)
Q5_K = KFormat(T.Q5_K, Q5_K_LAYOUT, 32, 31, 0, slice(Q5_K_LAYOUT.qh.start, Q5_K_LAYOUT.qs.stop),
               _pack_q5_codes, _q5_codes, _k4_grid, _q5_k, _q5_k_weighted)
Q4_K = KFormat(T.Q4_K, Q4_K_LAYOUT, 32, 15, 0, Q4_K_LAYOUT.qs, _pack_q4_codes, _q4_codes, _k4_grid, _q4_k,
               _q4_k_weighted)
Q3_K = KFormat(T.Q3_K, Q3_K_LAYOUT, 16, 7, 4, slice(Q3_K_LAYOUT.hmask.start, Q3_K_LAYOUT.qs.stop),
               _pack_q3_codes, _q3_codes, _q3_grid, _q3_k, _q3_k_weighted)
Q2_K = KFormat(T.Q2_K, Q2_K_LAYOUT, 16, 3, 0, Q2_K_LAYOUT.qs, _pack_2bit, _q2_codes, _q2_grid, _q2_k,
               _q2_k_weighted)


# ----------------------------------------------------------------------------- GPTQ grid

@dataclass(frozen=True)
class KParams:
    """One super-block per row: llama.cpp's bytes for it, each sub-block's (s, m) [rows, 256/sub],
    and the encoder's own codes [rows, 256] (kept where s = 0)."""
    blocks: torch.Tensor
    s: torch.Tensor
    m: torch.Tensor
    own: torch.Tensor


@dataclass
class KBlocks:
    """A weight as llama.cpp K-quant bytes: data uint8 [out, row_bytes] of type `qtype`."""
    qtype: object                       # the registered type (codecs.registry.QuantType)
    data: torch.Tensor
    shape: tuple[int, int]

    @property
    def name(self) -> str:
        return self.qtype.name

    def to_bytes(self) -> torch.Tensor:
        return self.data

    def split_rows(self, rows: list[int]) -> list["KBlocks"]:
        return [KBlocks(self.qtype, d, (r, self.shape[1])) for d, r in zip(self.data.split(rows), rows)]

    def dequantize(self) -> torch.Tensor:
        return self.qtype.dequantize(self.data.reshape(-1), self.shape)


class KGrid:
    """A K-quant super-block of 256 for GPTQ: when GPTQ reaches a super-block, llama.cpp's
    reference quantizer (bit-exact) encodes the partially updated weights; the sub-block scales
    and mins of those bytes are then fixed and every column is rounded onto them, and the final
    codes are written back into the bytes."""

    width = QK_K
    codes_dtype = None                  # the bytes hold the codes: no separate code matrix

    def __init__(self, qtype, fmt: KFormat, in_features: int):
        if in_features % QK_K:
            raise ValueError(f"{fmt.name} needs rows that are a multiple of {QK_K}, got {in_features}")
        self.qtype, self.format = qtype, fmt
        self.off, self.sub, self.nmax = fmt.off, fmt.sub, fmt.nmax

    def params(self, w: torch.Tensor, imp: torch.Tensor | None = None) -> KParams:
        w = w.float().contiguous()
        if not torch.isfinite(w).all():
            raise ValueError("weights contain NaN or Inf")
        b = self.qtype.quantize_rows(w)
        s, m = self.format.subblock_grid(b)
        return KParams(b, s, m, self.format.unpack(b).float())

    def round(self, w: torch.Tensor, p: KParams, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """As llama.cpp's final rounding: nearest_int((x + m) / s), a true division; a sub-block
        with s = 0 keeps the encoder's own code (its values are -m whatever the code)."""
        sj, mj = p.s[:, j // self.sub], p.m[:, j // self.sub]
        nz = sj != 0
        q = torch.round((w + mj) / torch.where(nz, sj, torch.ones_like(sj))) + self.off
        q = torch.where(nz, q.clamp(0, self.nmax), p.own[:, j])
        return q, (q - self.off) * sj - mj

    def stored(self, params: list[KParams], codes: torch.Tensor) -> KBlocks:
        blocks = torch.stack([p.blocks for p in params], dim=1).reshape(-1, params[0].blocks.shape[1])
        data = self.format.repack(blocks, codes.reshape(-1, QK_K))
        return KBlocks(self.qtype, data.reshape(codes.shape[0], -1), tuple(codes.shape))

    def join(self, pieces: list[KBlocks], codes, shape: tuple[int, int]) -> KBlocks:
        return KBlocks(self.qtype, torch.cat([p.data for p in pieces]), shape)


FORMATS = (Q6_K, Q5_K, Q4_K, Q3_K, Q2_K)
