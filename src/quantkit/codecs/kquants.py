"""llama.cpp's K-quants (Q6_K, Q5_K, Q4_K, Q3_K, Q2_K) in vectorized torch, bit-exact.

`quantize_<type>(x[n, 256]) -> uint8[n, type_size]` reproduces ggml-quants.c's
`quantize_row_<type>_ref`, which is what `quantize_<type>` (and so llama-quantize) runs when no
importance matrix is given; `dequantize_<type>` reproduces `dequantize_row_<type>`. The C code
walks one super-block at a time; here every loop over candidate scales, and every coordinate
descent step, runs over all sub-blocks of a chunk at once, while the arithmetic inside follows
the C expression by expression in float32. What makes the bytes equal:

- sums are accumulated in C's order (element 0, then 1, ...) starting from 0.0f, never with a
  pairwise/vectorized reduction, which rounds differently (`_seqsum`);
- ggml's `nearest_int` (add 1.5*2^23 and keep the mantissa) rounds half to even; where its
  argument is provably small (|v| < 2^22) `torch.round` is the same function, elsewhere
  (x/d with d read back from fp16) the bit trick is emulated exactly (`_nearest_int`);
- `a / b` is always tensor / tensor or tensor / python-scalar: torch evaluates `scalar / tensor`
  as `reciprocal(tensor) * scalar`, two roundings;
- torch.sqrt on large float32 tensors goes through MKL's vector math and is not correctly
  rounded; C's sqrtf is, so square roots are taken with numpy (`_sqrtf`);
- C's integer conversions are kept (`(uint8_t)nearest_int(..)` wraps modulo 256 before MIN(63,
  ..), `int8_t` scales wrap), as are strict comparisons ("the first largest wins": argmax);
- super-block scales go through fp16 with round-to-nearest-even (GGML_FP32_TO_FP16) and the
  final quants are computed from the fp16 value read back, as in C.

The reference C is compiled for baseline x86-64 without -ffast-math, so it has no fused
multiply-adds and no reassociation: every float op rounds once, as torch's elementwise ops do.
"""

from __future__ import annotations

import numpy as np
import torch

from .registry import qtype

QK_K = 256
K_TYPES = ("q6_k", "q5_k", "q4_k", "q3_k", "q2_k")

# Super-blocks per chunk: temporaries of a few MB stay in cache; the per-op Python overhead
# (a few hundred ops per chunk) stays small next to the arithmetic.
CHUNK_BLOCKS = 2048

_MAGIC = 12582912.0                        # 1.5 * 2**23, nearest_int's rounding constant
_GROUP_MAX_EPS = float(np.float32(1e-15))  # GROUP_MAX_EPS = 1e-15f


def _f32(v) -> float:
    """A python float holding exactly the float32 value of v (so torch uses that value)."""
    return float(np.float32(v))


def _nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int, bit for bit (also outside its asserted range): float32 -> int32."""
    return ((v + _MAGIC).view(torch.int32) & 0x7FFFFF) - 0x400000


def _wrap_i8(v: torch.Tensor) -> torch.Tensor:
    """C's int -> int8_t conversion (modulo 256)."""
    return ((v + 128) & 0xFF) - 128


def _seqsum(p: torch.Tensor) -> torch.Tensor:
    """sum over dim 0 in C's order `s = 0; s += p[0]; s += p[1]; ...` in float32."""
    s = p[0] + 0.0
    for i in range(1, p.shape[0]):
        s += p[i]
    return s


def _seqsum_from_first(p: torch.Tensor) -> torch.Tensor:
    """`s = p[0]; s += p[1]; ...` (a C sum initialised with its first term)."""
    s = p[0].clone()
    for i in range(1, p.shape[0]):
        s += p[i]
    return s


def _div(num: float, t: torch.Tensor) -> torch.Tensor:
    """float32 num / t with one rounding (torch's `num / t` is reciprocal(t) * num)."""
    return torch.full_like(t, num) / t


def _sqrtf(t: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.sqrt(t.numpy()))


def _first_absmax(x: torch.Tensor):
    """Per column of x[n, M]: the first element of largest magnitude (with sign) and |it|."""
    idx = x.abs().argmax(dim=0, keepdim=True)
    v = x.gather(0, idx)[0]
    return v, v.abs()


def _positive_max(t: torch.Tensor) -> torch.Tensor:
    """`m = 0; for v: if (v > m) m = v` per row of t[nb, k] (+0.0 when nothing is positive)."""
    m = t.max(dim=1).values
    return torch.where(m > 0, m, torch.zeros_like(m))


def _fp16(v: torch.Tensor):
    """GGML_FP32_TO_FP16 (round to nearest even): the fp16 bytes [n, 2] and the value read back."""
    h = v.to(torch.float16)
    return h.reshape(-1, 1).view(torch.uint8), h.float()


def _cols(x: torch.Tensor, sub: int) -> torch.Tensor:
    """x[nb, 256] -> [sub, nb*256/sub]: column m is sub-block m, element i of it in row i."""
    return x.reshape(-1, sub).t().contiguous()


def _rows(c: torch.Tensor, nb: int) -> torch.Tensor:
    return c.t().reshape(nb, QK_K)


# ----------------------------------------------------------------------------- scale searches

def _make_qx_quants_rmse1(x: torch.Tensor, nmax: int):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL) over columns of x[n, M].

    Returns (scale [M], L [n, M] float holding nmax + l). Instead of copying L on every improved
    candidate, the winning inverse scale is kept and L recomputed from it at the end (same value).
    """
    maxv, amax = _first_absmax(x)
    zero = amax < _GROUP_MAX_EPS
    safe_max = torch.where(zero, torch.ones_like(maxv), maxv)
    w = x * x
    wx = w * x

    def sums(iscale):
        l = (x * iscale).round_().clamp_(-nmax, nmax - 1)   # |x*iscale| <= ~33: round == nearest_int
        sumlx = _seqsum(wx * l)
        wl = w * l
        wl *= l
        return sumlx, _seqsum(wl)

    iscale = _div(float(-nmax), safe_max)
    best_iscale = iscale
    sumlx, suml2 = sums(iscale)
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        num = -(np.float32(nmax) + np.float32(0.1) * np.float32(step))
        iscale = _div(float(num), safe_max)
        sumlx, suml2 = sums(iscale)
        cand = sumlx / suml2
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        scale = torch.where(better, cand, scale)
        best = torch.where(better, cand * sumlx, best)
        best_iscale = torch.where(better, iscale, best_iscale)
    L = (x * best_iscale).round_().clamp_(-nmax, nmax - 1) + nmax
    L = torch.where(zero, torch.zeros_like(L), L)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, L


def _make_qkx2_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                      nstep: int, use_mad: bool):
    """make_qkx2_quants over columns of x[n, M] with weights w[n, M].

    Returns (scale [M], the_min [M] (= -min >= 0), L [n, M] float in 0..nmax). Note the C loop
    updates `min` when a candidate wins, and later candidates use the updated min both in their
    inverse scale and in x - min: the state is carried per column here exactly so.
    """
    mn = x.min(dim=0).values
    mx = x.max(dim=0).values
    sum_w = _seqsum_from_first(w)
    sum_x = _seqsum_from_first(w * x)
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    flat = mx == mn
    one = torch.ones_like(mn)

    def error(scale, lv, minv):
        diff = scale * lv
        diff += minv
        diff -= x
        diff = diff.abs_() if use_mad else diff.mul_(diff)
        return _seqsum(w * diff)

    rng = torch.where(flat, one, mx - mn)
    iscale = _div(float(nmax), rng)
    scale = _div(1.0, iscale)
    L = (iscale * (x - mn)).round_().clamp_(0, nmax)      # |.| <= nmax: round == nearest_int
    best_error = error(scale, L, mn)
    sel_iscale, sel_min = iscale, mn
    cur_min = mn
    for step in range(nstep + 1):
        num = (np.float32(rmin) + np.float32(rdelta) * np.float32(step)) + np.float32(nmax)
        iscale = _div(float(num), torch.where(flat, one, mx - cur_min))
        laux = (iscale * (x - cur_min)).round_().clamp_(0, nmax)
        wl = w * laux
        sum_l = _seqsum(wl)
        sum_xl = _seqsum(wl * x)
        wl *= laux
        sum_l2 = _seqsum(wl)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        cur_error = error(this_scale, laux, this_min)
        better = (D > 0) & (cur_error < best_error)
        sel_iscale = torch.where(better, iscale, sel_iscale)
        sel_min = torch.where(better, cur_min, sel_min)
        best_error = torch.where(better, cur_error, best_error)
        scale = torch.where(better, this_scale, scale)
        cur_min = torch.where(better, this_min, cur_min)
    L = (sel_iscale * (x - sel_min)).round_().clamp_(0, nmax)
    L = torch.where(flat, torch.zeros_like(L), L)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale, -cur_min, L


def _make_q3_quants_rmse(x: torch.Tensor, nmax: int):
    """make_q3_quants(n, nmax, x, L, do_rmse=true) over columns of x[n, M].

    The coordinate descent visits elements in order and each accepted change moves the sums
    the next element sees, so it runs element by element, vectorized over columns. Columns that
    stop changing are left in the loop: a pass without change is a fixed point, so further
    passes change nothing, as C's early break assumes.
    Returns (scale [M], L [n, M] float: nmax + l, or 0 for an all-zero column).
    """
    maxv, amax = _first_absmax(x)
    zero = amax < _GROUP_MAX_EPS
    safe_max = torch.where(zero, torch.ones_like(maxv), maxv)
    iscale = _div(float(-nmax), safe_max)
    L = (x * iscale).round_().clamp_(-nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx = _seqsum(wx * L)
    wl = w * L
    wl *= L
    suml2 = _seqsum(wl)
    for _ in range(5):
        changed = torch.zeros_like(zero)
        for i in range(x.shape[0]):
            li, wi, wxi, xi = L[i], w[i], wx[i], x[i]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            ratio = xi * sl2 / slx          # may be huge when slx is tiny: exact nearest_int
            new_l = _nearest_int(ratio).clamp_(-nmax, nmax - 1).float()
            slx_new = slx + wxi * new_l
            sl2_new = sl2 + wi * new_l * new_l
            accept = ((slx > 0) & (new_l != li) & (sl2_new > 0)
                      & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new))
            L[i] = torch.where(accept, new_l, li)
            sumlx = torch.where(accept, slx_new, sumlx)
            suml2 = torch.where(accept, sl2_new, suml2)
            changed |= accept
        if not bool(changed.any()):
            break
    L += nmax
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    L = torch.where(zero, torch.zeros_like(L), L)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, L


# ----------------------------------------------------------------------------- packing helpers

def _pack_2bit(L: torch.Tensor) -> torch.Tensor:
    """L[nb, 256] in 0..3 -> qs[nb, 64]: byte 32h + l holds L[128h + l + 32k] at bits 2k."""
    q = L.reshape(-1, 2, 4, 32)
    out = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    return out.reshape(-1, 64).to(torch.uint8)


def _unpack_2bit(qs: torch.Tensor) -> torch.Tensor:
    q = qs.to(torch.int32).reshape(-1, 2, 1, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32).reshape(1, 1, 4, 1)
    return ((q >> shifts) & 3).reshape(-1, QK_K)


def _pack_k4_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """The 12-byte 6-bit scale/min layout of Q4_K and Q5_K (get_scale_min_k4's inverse)."""
    lo_s, hi_s = ls[:, :4], ls[:, 4:]
    lo_m, hi_m = lm[:, :4], lm[:, 4:]
    b0 = lo_s | ((hi_s >> 4) << 6)
    b4 = lo_m | ((hi_m >> 4) << 6)
    b8 = (hi_s & 0xF) | ((hi_m & 0xF) << 4)
    return torch.cat([b0, b4, b8], dim=1).to(torch.uint8)


def _unpack_k4_scales(b: torch.Tensor):
    b = b.to(torch.int32)
    b0, b4, b8 = b[:, :4], b[:, 4:8], b[:, 8:12]
    sc = torch.cat([b0 & 63, (b8 & 0xF) | ((b0 >> 6) << 4)], dim=1)
    m = torch.cat([b4 & 63, (b8 >> 4) | ((b4 >> 6) << 4)], dim=1)
    return sc, m


def _f16_from(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).reshape(-1).float()


# ----------------------------------------------------------------------------- Q6_K

def _q6_k(x: torch.Tensor) -> torch.Tensor:
    nb = x.shape[0]
    xs = _cols(x, 16)
    scale, L = _make_qx_quants_rmse1(xs, 32)
    sc = scale.reshape(nb, 16)
    max_scale, max_abs = _first_absmax(sc.t())
    zero_block = max_abs < _GROUP_MAX_EPS
    iscale = _div(-128.0, torch.where(zero_block, torch.ones_like(max_scale), max_scale))
    d_bytes, d = _fp16(_div(1.0, iscale))
    q_sc = _wrap_i8(_nearest_int(iscale[:, None] * sc).clamp_(max=127))
    dl = (d[:, None] * q_sc.float()).reshape(-1)
    nz = dl != 0
    lf = _nearest_int(xs / torch.where(nz, dl, torch.ones_like(dl))).clamp_(-32, 31) + 32
    Li = torch.where(nz, lf, L.to(torch.int32))
    Li = _rows(Li, nb).reshape(nb, 2, 4, 32)
    lo = Li & 0xF
    ql = torch.cat([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], dim=2)
    hi = Li >> 4
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    out = torch.cat([ql.reshape(nb, 128).to(torch.uint8), qh.reshape(nb, 64).to(torch.uint8),
                     q_sc.to(torch.int8).view(torch.uint8), d_bytes], dim=1)
    out[zero_block] = 0
    return out


def _dq6_k(b: torch.Tensor) -> torch.Tensor:
    nb = b.shape[0]
    ql = b[:, :128].to(torch.int32).reshape(nb, 2, 64)
    qh = b[:, 128:192].to(torch.int32).reshape(nb, 2, 1, 32)
    sc = b[:, 192:208].contiguous().view(torch.int8).float()
    d = _f16_from(b[:, 208:210])
    lo = torch.stack([ql[:, :, :32] & 0xF, ql[:, :, 32:] & 0xF, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4], dim=2)
    hi = (qh >> torch.tensor([0, 2, 4, 6], dtype=torch.int32).reshape(1, 1, 4, 1)) & 3
    q = ((lo | (hi << 4)) - 32).reshape(nb, 16, 16).float()
    return ((d[:, None] * sc)[:, :, None] * q).reshape(nb, QK_K)


# ----------------------------------------------------------------------------- Q4_K / Q5_K

def _q45_k(x: torch.Tensor, nmax: int, rmin: float, nstep: int):
    """The common part of quantize_row_q4_K_ref / q5_K_ref: scales, mins, header, L[nb, 256]."""
    nb = x.shape[0]
    xs = _cols(x, 32)
    av_x = _sqrtf(_seqsum(xs * xs) / 32.0)
    w = av_x[None] + xs.abs()
    scale, the_min, L = _make_qkx2_quants(xs, w, nmax, rmin, 0.1, nstep, False)
    sc, mins = scale.reshape(nb, 8), the_min.reshape(nb, 8)
    max_scale, max_min = _positive_max(sc), _positive_max(mins)
    one = torch.ones_like(max_scale)
    inv_scale = torch.where(max_scale > 0, _div(63.0, torch.where(max_scale > 0, max_scale, one)), 0 * one)
    inv_min = torch.where(max_min > 0, _div(63.0, torch.where(max_min > 0, max_min, one)), 0 * one)
    ls = (_nearest_int(inv_scale[:, None] * sc) & 0xFF).clamp_(max=63)
    lm = (_nearest_int(inv_min[:, None] * mins) & 0xFF).clamp_(max=63)
    d_bytes, d = _fp16(max_scale / 63.0)
    m_bytes, dmin = _fp16(max_min / 63.0)
    dl = (d[:, None] * ls.float()).reshape(-1)
    ml = (dmin[:, None] * lm.float()).reshape(-1)
    nz = dl != 0
    lf = _nearest_int((xs + ml) / torch.where(nz, dl, torch.ones_like(dl))).clamp_(0, nmax)
    Li = _rows(torch.where(nz, lf, L.to(torch.int32)), nb)
    header = torch.cat([d_bytes, m_bytes, _pack_k4_scales(ls, lm)], dim=1)
    return header, Li


def _q4_k(x: torch.Tensor) -> torch.Tensor:
    header, L = _q45_k(x, 15, -1.0, 20)
    q = L.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128).to(torch.uint8)
    return torch.cat([header, qs], dim=1)


def _q5_k(x: torch.Tensor) -> torch.Tensor:
    header, L = _q45_k(x, 31, -0.5, 15)
    q = L.reshape(-1, 4, 2, 32)
    ql = ((q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)).reshape(-1, 128).to(torch.uint8)
    hb = (q >> 4).reshape(-1, 8, 32)          # bit k of qh[j]: high bit of L[32k + j]
    qh = torch.zeros_like(hb[:, 0])
    for k in range(8):
        qh |= hb[:, k] << k
    return torch.cat([header, qh.to(torch.uint8), ql], dim=1)


def _dq45_k(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    nb = b.shape[0]
    d, dmin = _f16_from(b[:, 0:2]), _f16_from(b[:, 2:4])
    sc, m = _unpack_k4_scales(b[:, 4:16])
    d1 = d[:, None] * sc.float()
    m1 = dmin[:, None] * m.float()
    y = d1[:, :, None] * q.reshape(nb, 8, 32).float() - m1[:, :, None]
    return y.reshape(nb, QK_K)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    q = qs.to(torch.int32).reshape(-1, 4, 1, 32)
    return torch.cat([q & 0xF, q >> 4], dim=2).reshape(-1, QK_K)


def _dq4_k(b: torch.Tensor) -> torch.Tensor:
    return _dq45_k(b, _nibbles(b[:, 16:144]))


def _dq5_k(b: torch.Tensor) -> torch.Tensor:
    qh = b[:, 16:48].to(torch.int32).reshape(-1, 1, 32)
    high = (qh >> torch.arange(8, dtype=torch.int32).reshape(1, 8, 1)) & 1
    return _dq45_k(b, _nibbles(b[:, 48:176]) | (high.reshape(-1, QK_K) << 4))


# ----------------------------------------------------------------------------- Q3_K

def _q3_k(x: torch.Tensor) -> torch.Tensor:
    nb = x.shape[0]
    xs = _cols(x, 16)
    scale, L = _make_q3_quants_rmse(xs, 4)
    sc = scale.reshape(nb, 16)
    max_scale, _ = _first_absmax(sc.t())
    has = max_scale != 0
    iscale = _div(-32.0, torch.where(has, max_scale, torch.ones_like(max_scale)))
    l = _wrap_i8(_nearest_int(iscale[:, None] * sc)).clamp_(-32, 31) + 32
    l = torch.where(has[:, None], l, torch.zeros_like(l))
    d_bytes, d = _fp16(torch.where(has, _div(1.0, iscale), torch.zeros_like(iscale)))
    dl = (d[:, None] * (l - 32).float()).reshape(-1)
    nz = dl != 0
    lf = _nearest_int(xs / torch.where(nz, dl, torch.ones_like(dl))).clamp_(-4, 3) + 4
    Li = _rows(torch.where(nz, lf, L.to(torch.int32)), nb)
    hb = (Li >> 2).reshape(nb, 8, 32)            # L > 3: bit k of hmask[m] for element 32k + m
    hmask = torch.zeros_like(hb[:, 0])
    for k in range(8):
        hmask |= hb[:, k] << k
    lo, hi = l[:, :8], l[:, 8:]
    s_lo = (lo & 0xF) | ((hi & 0xF) << 4)
    g = (l >> 4).reshape(nb, 4, 4)               # scale 4g + k: bits 2g..2g+1 of byte 8 + k
    s_hi = g[:, 0] | (g[:, 1] << 2) | (g[:, 2] << 4) | (g[:, 3] << 6)
    return torch.cat([hmask.to(torch.uint8), _pack_2bit(Li & 3), s_lo.to(torch.uint8),
                      s_hi.to(torch.uint8), d_bytes], dim=1)


def _dq3_k(b: torch.Tensor) -> torch.Tensor:
    nb = b.shape[0]
    hm = b[:, :32].to(torch.int32).reshape(nb, 1, 32)
    q = _unpack_2bit(b[:, 32:96])
    s = b[:, 96:108].to(torch.int32)
    low = torch.cat([s[:, :8] & 0xF, s[:, :8] >> 4], dim=1)
    g = (s[:, 8:12].reshape(nb, 1, 4) >> torch.tensor([0, 2, 4, 6], dtype=torch.int32).reshape(1, 4, 1)) & 3
    scales = (low | (g.reshape(nb, 16) << 4)) - 32
    d = _f16_from(b[:, 108:110])
    high = ((hm >> torch.arange(8, dtype=torch.int32).reshape(1, 8, 1)) & 1).reshape(nb, QK_K)
    qv = (q - 4 * (1 - high)).reshape(nb, 16, 16).float()
    return ((d[:, None] * scales.float())[:, :, None] * qv).reshape(nb, QK_K)


# ----------------------------------------------------------------------------- Q2_K

def _q2_k(x: torch.Tensor) -> torch.Tensor:
    nb = x.shape[0]
    xs = _cols(x, 16)
    scale, the_min, L = _make_qkx2_quants(xs, xs.abs(), 3, -0.5, 0.1, 15, True)
    sc, mins = scale.reshape(nb, 16), the_min.reshape(nb, 16)
    max_scale, max_min = _positive_max(sc), _positive_max(mins)
    one = torch.ones_like(max_scale)
    has_s, has_m = max_scale > 0, max_min > 0
    iscale = _div(15.0, torch.where(has_s, max_scale, one))
    imin = _div(15.0, torch.where(has_m, max_min, one))
    ls = torch.where(has_s[:, None], _nearest_int(iscale[:, None] * sc), torch.zeros_like(sc, dtype=torch.int32))
    lm = torch.where(has_m[:, None], _nearest_int(imin[:, None] * mins), torch.zeros_like(sc, dtype=torch.int32))
    scales = (ls | (lm << 4)) & 0xFF
    d_bytes, d = _fp16(torch.where(has_s, max_scale / 15.0, 0 * one))
    m_bytes, dmin = _fp16(torch.where(has_m, max_min / 15.0, 0 * one))
    dl = (d[:, None] * (scales & 0xF).float()).reshape(-1)
    ml = (dmin[:, None] * (scales >> 4).float()).reshape(-1)
    nz = dl != 0
    lf = _nearest_int((xs + ml) / torch.where(nz, dl, torch.ones_like(dl))).clamp_(0, 3)
    Li = _rows(torch.where(nz, lf, L.to(torch.int32)), nb)
    return torch.cat([scales.to(torch.uint8), _pack_2bit(Li), d_bytes, m_bytes], dim=1)


def _dq2_k(b: torch.Tensor) -> torch.Tensor:
    nb = b.shape[0]
    s = b[:, :16].to(torch.int32)
    q = _unpack_2bit(b[:, 16:80]).reshape(nb, 16, 16).float()
    d, dmin = _f16_from(b[:, 80:82]), _f16_from(b[:, 82:84])
    dl = d[:, None] * (s & 0xF).float()
    ml = dmin[:, None] * (s >> 4).float()
    return (dl[:, :, None] * q - ml[:, :, None]).reshape(nb, QK_K)


# ----------------------------------------------------------------------------- public API

_ENCODERS = {"q6_k": _q6_k, "q5_k": _q5_k, "q4_k": _q4_k, "q3_k": _q3_k, "q2_k": _q2_k}
_DECODERS = {"q6_k": _dq6_k, "q5_k": _dq5_k, "q4_k": _dq4_k, "q3_k": _dq3_k, "q2_k": _dq2_k}


def _check_blocks(name: str, x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2 or x.shape[1] != QK_K:
        raise ValueError(f"{name}: expected blocks of shape [n, {QK_K}], got {tuple(x.shape)}")
    return x.detach().to(device="cpu", dtype=torch.float32).contiguous()


def quantize_blocks(name: str, x: torch.Tensor) -> torch.Tensor:
    """float32 [n, 256] -> uint8 [n, type_size], the bytes of quantize_row_<name>_ref."""
    q = qtype(name)
    if q.name not in _ENCODERS:
        raise KeyError(f"{name} is not a K-quant type handled here ({', '.join(K_TYPES)})")
    x = _check_blocks(q.name, x)
    enc = _ENCODERS[q.name]
    if x.shape[0] == 0:
        return torch.zeros((0, q.type_size), dtype=torch.uint8)
    parts = [enc(x[i:i + CHUNK_BLOCKS]) for i in range(0, x.shape[0], CHUNK_BLOCKS)]
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    assert out.shape == (x.shape[0], q.type_size)
    return out


def dequantize_blocks(name: str, data: torch.Tensor) -> torch.Tensor:
    """uint8 [n, type_size] -> float32 [n, 256], equal to ggml's dequantize_row_<name>."""
    q = qtype(name)
    if q.name not in _DECODERS:
        raise KeyError(f"{name} is not a K-quant type handled here ({', '.join(K_TYPES)})")
    data = data.detach().to("cpu").contiguous()
    if data.dtype != torch.uint8 or data.numel() % q.type_size:
        raise ValueError(f"{q.name}: expected uint8 data, a multiple of {q.type_size} bytes")
    data = data.reshape(-1, q.type_size)
    dec = _DECODERS[q.name]
    parts = [dec(data[i:i + 65536]) for i in range(0, data.shape[0], 65536)]
    if not parts:
        return torch.zeros((0, QK_K), dtype=torch.float32)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def quantize_q6_K(x: torch.Tensor) -> torch.Tensor:
    return quantize_blocks("q6_k", x)


def quantize_q5_K(x: torch.Tensor) -> torch.Tensor:
    return quantize_blocks("q5_k", x)


def quantize_q4_K(x: torch.Tensor) -> torch.Tensor:
    return quantize_blocks("q4_k", x)


def quantize_q3_K(x: torch.Tensor) -> torch.Tensor:
    return quantize_blocks("q3_k", x)


def quantize_q2_K(x: torch.Tensor) -> torch.Tensor:
    return quantize_blocks("q2_k", x)


def dequantize_q6_K(data: torch.Tensor) -> torch.Tensor:
    return dequantize_blocks("q6_k", data)


def dequantize_q5_K(data: torch.Tensor) -> torch.Tensor:
    return dequantize_blocks("q5_k", data)


def dequantize_q4_K(data: torch.Tensor) -> torch.Tensor:
    return dequantize_blocks("q4_k", data)


def dequantize_q3_K(data: torch.Tensor) -> torch.Tensor:
    return dequantize_blocks("q3_k", data)


def dequantize_q2_K(data: torch.Tensor) -> torch.Tensor:
    return dequantize_blocks("q2_k", data)


def is_kquant(name) -> bool:
    try:
        return qtype(name).name in _ENCODERS
    except KeyError:
        return False


def quantize(name: str, x2d: torch.Tensor) -> torch.Tensor:
    """float32 [rows, n] -> uint8 [rows, row_bytes] (n a multiple of 256), llama.cpp's bytes."""
    q = qtype(name)
    if x2d.dim() != 2:
        raise ValueError(f"{q.name}: expected a 2-D tensor, got shape {tuple(x2d.shape)}")
    rows, n = x2d.shape
    row_bytes = q.row_bytes(n)   # raises on a row that is not a multiple of 256
    return quantize_blocks(q.name, x2d.reshape(-1, QK_K) if rows * n else x2d.new_zeros((0, QK_K))).reshape(rows, row_bytes)


def dequantize(name: str, data: torch.Tensor, shape) -> torch.Tensor:
    """uint8 bytes of a tensor of `shape` (row-major, last dim contiguous) -> float32 `shape`."""
    q = qtype(name)
    shape = tuple(int(s) for s in shape)
    if data.numel() != q.nbytes(shape):
        raise ValueError(f"{q.name}: {data.numel()} bytes do not hold a tensor of shape {shape} "
                         f"({q.nbytes(shape)} bytes)")
    return dequantize_blocks(q.name, data).reshape(shape)


# Signatures matching codecs/ggml.py, for one dispatch over all types.
def quantize_rows(name: str, x: torch.Tensor) -> torch.Tensor:
    return quantize(name, x)


def dequantize_rows(name: str, data: torch.Tensor, n: int) -> torch.Tensor:
    q = qtype(name)
    data = data.contiguous().reshape(-1, q.row_bytes(n))
    return dequantize_blocks(q.name, data).reshape(data.shape[0], n)
