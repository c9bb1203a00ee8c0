"""llama.cpp's K-quants (Q6_K, Q5_K, Q4_K, Q3_K, Q2_K) in vectorized torch, bit-exact.

`quantize_<type>(x[n, 256]) -> uint8[n, type_size]` reproduces ggml-quants.c's
`quantize_row_<type>_ref`, which is what `quantize_<type>` (and so llama-quantize) runs when no
importance matrix is given; `dequantize_<type>` reproduces `dequantize_row_<type>`. The C code
walks one super-block at a time; here every loop over candidate scales, and every coordinate
descent step, runs over all sub-blocks of a chunk at once, while the arithmetic inside follows
the C expression by expression in float32. What makes the bytes equal:

- sums are accumulated in C's order (element 0, then 1, ...) starting from 0.0f, never with a
  pairwise/vectorized reduction, which rounds differently (`_seqsum_into`);
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
Inputs must be finite (the GGUF writer rejects NaN/Inf by tensor name first); finite values of
any magnitude, subnormals and overflow of x*x*x included, give llama.cpp's bytes.

Speed, measured on the 2-core development machine while other jobs loaded it (load 4-6): a
640 x 262144 tensor (168M values) to Q6_K in 23-28 s wall, 15 s of CPU time, where llama.cpp's
own single-threaded quantize_q6_K took 14 s wall; the other types cost 1.0-1.3x Q6_K's CPU
time; decoding 168M values takes 1.4 s. Chunks of CHUNK_BLOCKS super-blocks run on worker
threads with torch's intra-op threading off (codecs/parallel.py). See benchmarks/kquants_speed.py.
"""

from __future__ import annotations


import numpy as np
import torch

from .parallel import map_blocks
from .registry import qtype

QK_K = 256
KQUANT_TYPES = ("q6_k", "q5_k", "q4_k", "q3_k", "q2_k")

# Super-blocks per chunk: temporaries of a few MB stay in cache; the per-op Python overhead
# (a few hundred ops per chunk) stays small next to the arithmetic.
CHUNK_BLOCKS = 1024

_MAGIC = 12582912.0                        # 1.5 * 2**23, nearest_int's rounding constant
_GROUP_MAX_EPS = float(np.float32(1e-15))  # GROUP_MAX_EPS = 1e-15f


def _nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int, bit for bit (also outside its asserted range): float32 -> int32."""
    return ((v + _MAGIC).view(torch.int32) & 0x7FFFFF) - 0x400000


def _wrap_i8(v: torch.Tensor) -> torch.Tensor:
    """C's int -> int8_t conversion (modulo 256)."""
    return ((v + 128) & 0xFF) - 128


def _seqsum_first(p: torch.Tensor) -> torch.Tensor:
    """`s = p[0]; s += p[1]; ...` (a C sum initialised with its first term), float32."""
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
    """`amax = 0; max = 0; for v: if (fabsf(v) > amax) {amax = fabsf(v); max = v;}` per column
    of x[n, M]: the first element of largest magnitude, with its sign, and its magnitude. A NaN
    never compares greater (a sub-block scale is NaN where x*x*x overflowed)."""
    ax = x.abs()
    ax = torch.where(ax > 0, ax, torch.zeros_like(ax))
    idx = ax.argmax(dim=0, keepdim=True)
    amax = ax.gather(0, idx)[0]
    v = torch.where(amax > 0, x.gather(0, idx)[0], torch.zeros_like(amax))
    return v, amax


def _absmax_signed(x: torch.Tensor):
    """_first_absmax for finite data, faster: max and min decide, except where +a and -a are
    both present (then the first one wins, as C's strict `>` keeps it)."""
    mx = x.amax(dim=0)
    mn = x.amin(dim=0)
    neg = -mn
    amax = torch.maximum(mx, neg)
    v = torch.where(mx >= neg, mx, mn)
    tie = (mx == neg) & (mx > 0)
    if bool(tie.any()):
        cols = tie.nonzero()[:, 0]
        sub = x[:, cols]
        v[cols] = sub.gather(0, sub.abs().argmax(dim=0, keepdim=True))[0]
    return v, amax


def _positive_max(t: torch.Tensor) -> torch.Tensor:
    """`m = 0; for v: if (v > m) m = v` per row of t[nb, k] (+0.0 when nothing is positive)."""
    return torch.where(t > 0, t, torch.zeros_like(t)).max(dim=1).values


def _levels(v: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """MAX(lo, MIN(hi, nearest_int(v))) - lo as int32, in place on the temporary v."""
    b = v.add_(_MAGIC).view(torch.int32)
    return b.bitwise_and_(0x7FFFFF).clamp_(0x400000 + lo, 0x400000 + hi).sub_(0x400000 + lo)


def _fp16(v: torch.Tensor):
    """GGML_FP32_TO_FP16 (round to nearest even): the fp16 bytes [n, 2] and the value read back."""
    h = v.to(torch.float16)
    return h.reshape(-1, 1).view(torch.uint8), h.float()


def _cols(x: torch.Tensor, sub: int) -> torch.Tensor:
    """x[nb, 256] -> [sub, nb*256/sub]: column m is sub-block m, element i of it in row i."""
    return x.reshape(-1, sub).t().contiguous()


def _rows_u8(L: torch.Tensor, nb: int) -> torch.Tensor:
    """Levels [sub, M] (int, small) -> uint8 [nb, 256] in element order."""
    return L.to(torch.uint8).t().reshape(nb, QK_K)


def _seqsum_into(p, out: torch.Tensor) -> torch.Tensor:
    """out = sum of p's rows (a [n, M] tensor or a list of its rows) in C's order from 0.0f."""
    torch.add(p[0], 0.0, out=out)
    for row in p[1:]:
        out.add_(row)
    return out


# ----------------------------------------------------------------------------- scale searches

def _qx_numerators(nmax: int) -> torch.Tensor:
    """make_qx_quants' inverse-scale numerators in its order: -nmax, then -(nmax + 0.1f*is)."""
    nums = [np.float32(-nmax)] + [-(np.float32(nmax) + np.float32(0.1) * np.float32(s))
                                  for s in range(-9, 10) if s != 0]
    return torch.from_numpy(np.array(nums, dtype=np.float32)).reshape(-1, 1)


def _make_qx_search(x: torch.Tensor, nmax: int):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL) over the columns of x[n, M].

    Returns (scale, iscale, zero), each [M]: the returned scale, the inverse scale whose levels
    C leaves in L, and the all-zero columns (L = 0 there). L itself is only needed where the
    caller's fp16 scale turns out 0, so it is computed there only (`_qx_levels`).
    The 19 candidate sums are computed first; the choice among them, whose float rounding
    depends on the running best, is then replayed in C's order.
    """
    n, M = x.shape
    maxv, amax = _absmax_signed(x)
    zero = amax < _GROUP_MAX_EPS
    iscales = torch.div(_qx_numerators(nmax).expand(-1, M), torch.where(zero, 1.0, maxv))
    K = iscales.shape[0]
    w = x * x
    wx = w * x
    l = torch.empty_like(x)
    p = torch.empty_like(x)
    p_rows = list(p.unbind(0))
    sumlx = torch.empty((K, M), dtype=torch.float32)
    suml2 = torch.empty((K, M), dtype=torch.float32)
    for k in range(K):
        # |x*iscale| <= ~33 here, where torch.round (half to even) equals nearest_int.
        torch.mul(x, iscales[k], out=l).round_().clamp_(-nmax, nmax - 1)
        torch.mul(wx, l, out=p)
        _seqsum_into(p_rows, sumlx[k])
        torch.mul(w, l, out=p).mul_(l)
        _seqsum_into(p_rows, suml2[k])
    cand = sumlx / suml2
    cand[0] = torch.where(suml2[0] != 0, cand[0], 0.0)
    best = cand[0] * sumlx[0]
    best_k = torch.zeros((1, M), dtype=torch.int64)
    for k in range(1, K):
        s1, s2 = sumlx[k], suml2[k]
        better = (s2 > 0) & (s1 * s1 > best * s2)
        best = torch.where(better, cand[k] * s1, best)
        best_k[0].masked_fill_(better, k)
    scale = cand.gather(0, best_k)[0].masked_fill_(zero, 0.0)
    return scale, iscales.gather(0, best_k)[0], zero


def _qx_levels(x: torch.Tensor, iscale: torch.Tensor, zero: torch.Tensor, nmax: int) -> torch.Tensor:
    """The L that make_qx_quants leaves (nmax + l, or 0 for an all-zero column), int32."""
    l = (x * iscale).round_().clamp_(-nmax, nmax - 1).add_(nmax).to(torch.int32)
    return l.masked_fill_(zero, 0)


def _finite(iscale: torch.Tensor) -> torch.Tensor:
    """An inverse scale for `l = MAX(0, MIN(nmax, nearest_int(iscale*(x - min))))`.

    A finite iscale keeps |iscale*(x - min)| <= ~nmax, where torch.round equals nearest_int. When
    max - min is so small (subnormal) that iscale overflows to inf, C's nearest_int(inf) and
    nearest_int(NaN) (from inf*0) give -2^22 and 0, clamped to 0: iscale 0 gives the same L = 0.
    """
    return iscale.masked_fill_(torch.isinf(iscale), 0.0)


def _make_qkx2_search(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                      nstep: int, use_mad: bool):
    """make_qkx2_quants over the columns of x[n, M] with weights w[n, M].

    Returns (scale, the_min, iscale, min_used, flat), each [M]: the returned scale and -min,
    and the inverse scale and min from which C's L was computed (`_qkx2_levels`). The C loop
    updates `min` when a candidate wins, and later candidates use the updated min both in their
    inverse scale and in x - min: that state is carried per column exactly so.
    """
    mn = x.amin(dim=0)
    mx = x.amax(dim=0)
    sum_w = _seqsum_first(w)
    sum_x = _seqsum_first(w * x)
    # `if (min > 0) min = 0`; a -0.0 left here changes no byte (only |.| and x - min of zeros).
    mn.clamp_(max=0.0)
    flat = mx == mn
    t = torch.empty_like(x)
    e = torch.empty_like(x)
    wl = torch.empty_like(x)
    e_rows, wl_rows = list(e.unbind(0)), list(wl.unbind(0))

    def levels(iscale, minv):
        torch.sub(x, minv, out=t).mul_(iscale).round_().clamp_(0, nmax)

    def error(scale, minv):
        torch.mul(t, scale, out=e).add_(minv).sub_(x)
        e.abs_() if use_mad else e.mul_(e)
        e.mul_(w)
        return _seqsum_into(e_rows, torch.empty_like(scale))

    iscale = _div(float(nmax), torch.where(flat, 1.0, mx - mn))
    scale = _div(1.0, iscale)
    iscale = _finite(iscale)
    levels(iscale, mn)
    best_error = error(scale, mn)
    sel_iscale, sel_min, cur_min = iscale, mn, mn
    for step in range(nstep + 1):
        num = (np.float32(rmin) + np.float32(rdelta) * np.float32(step)) + np.float32(nmax)
        iscale = _finite(_div(float(num), torch.where(flat, 1.0, mx - cur_min)))
        levels(iscale, cur_min)
        torch.mul(w, t, out=wl)
        sum_l = _seqsum_into(wl_rows, torch.empty_like(mn))
        torch.mul(wl, x, out=e)
        sum_xl = _seqsum_into(e_rows, torch.empty_like(mn))
        wl.mul_(t)
        sum_l2 = _seqsum_into(wl_rows, torch.empty_like(mn))
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        if bool(pos.any()):
            this_min = torch.where(pos, 0.0, this_min)
            this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        cur_error = error(this_scale, this_min)
        better = (D > 0) & (cur_error < best_error)
        sel_iscale = torch.where(better, iscale, sel_iscale)
        sel_min = torch.where(better, cur_min, sel_min)
        best_error = torch.where(better, cur_error, best_error)
        scale = torch.where(better, this_scale, scale)
        cur_min = torch.where(better, this_min, cur_min)
    scale = scale.masked_fill(flat, 0.0)
    return scale, -cur_min, sel_iscale, sel_min, flat


def _qkx2_levels(x, iscale, minv, flat, nmax) -> torch.Tensor:
    l = (x - minv).mul_(iscale).round_().clamp_(0, nmax).to(torch.int32)
    return l.masked_fill_(flat, 0)


def _make_q3_quants_rmse(x: torch.Tensor, nmax: int):
    """make_q3_quants(n, nmax, x, L, do_rmse=true) over columns of x[n, M].

    The coordinate descent visits elements in order and each accepted change moves the sums
    the next element sees, so it runs element by element, vectorized over columns. Columns that
    stop changing are left in the loop: a pass without change is a fixed point, so further
    passes change nothing, as C's early break assumes.
    Returns (scale [M], L [n, M] int32: nmax + l, or 0 for an all-zero column).
    """
    maxv, amax = _absmax_signed(x)
    zero = amax < _GROUP_MAX_EPS
    iscale = _div(float(-nmax), torch.where(zero, 1.0, maxv))
    L = (x * iscale).round_().clamp_(-nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx = _seqsum_into(wx * L, torch.empty_like(maxv))
    suml2 = _seqsum_into((w * L).mul_(L), torch.empty_like(maxv))
    for _ in range(5):
        changed = torch.zeros_like(zero)
        for i in range(x.shape[0]):
            li, wi, wxi = L[i], w[i], wx[i]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            # x*sl2/slx is unbounded when slx is tiny: nearest_int emulated exactly.
            new_l = _levels(x[i] * sl2 / slx, -nmax, nmax - 1).sub_(nmax).float()
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
    scale = torch.where(suml2 > 0, sumlx / suml2, 0.0).masked_fill_(zero, 0.0)
    L = L.add_(nmax).to(torch.int32).masked_fill_(zero, 0)
    return scale, L


# ----------------------------------------------------------------------------- packing helpers

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


def _f16_from(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).reshape(-1).float()


# ----------------------------------------------------------------------------- Q6_K

def _q6_k(x: torch.Tensor) -> torch.Tensor:
    nb = x.shape[0]
    xs = _cols(x, 16)
    scale, best_iscale, zero = _make_qx_search(xs, 32)
    sc = scale.reshape(nb, 16)
    max_scale, max_abs = _first_absmax(sc.t())
    zero_block = max_abs < _GROUP_MAX_EPS
    iscale = _div(-128.0, torch.where(zero_block, 1.0, max_scale))
    d_bytes, d = _fp16(_div(1.0, iscale))
    q_sc = _wrap_i8(_nearest_int(iscale[:, None] * sc).clamp_(max=127))
    dl = (d[:, None] * q_sc.float()).reshape(-1)
    nz = dl != 0
    L = _levels(xs / torch.where(nz, dl, 1.0), -32, 31)
    if not bool(nz.all()):   # `if (!d) continue;`: make_qx_quants' levels stay
        cols = (~nz).nonzero()[:, 0]
        L[:, cols] = _qx_levels(xs[:, cols], best_iscale[cols], zero[cols], 32)
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
    ql = b[:, :128].contiguous().reshape(nb, 2, 1, 64)
    qh = b[:, 128:192].contiguous().reshape(nb, 2, 1, 32)
    lo = torch.cat([ql[..., :32] & 0xF, ql[..., 32:] & 0xF, ql[..., :32] >> 4, ql[..., 32:] >> 4], dim=2)
    hi = torch.cat([(qh & 3) << 4, ((qh >> 2) & 3) << 4, ((qh >> 4) & 3) << 4, (qh >> 6) << 4], dim=2)
    return (lo | hi).reshape(nb, QK_K)


def _dq6_k(b: torch.Tensor) -> torch.Tensor:
    nb = b.shape[0]
    sc = b[:, 192:208].contiguous().view(torch.int8).float()
    d = _f16_from(b[:, 208:210])
    q = _q6_codes(b).reshape(nb, 16, 16).float().sub_(32.0)
    # in place: a broadcast over the innermost dim is several times slower in a new tensor
    return q.mul_((d[:, None] * sc)[:, :, None]).reshape(nb, QK_K)


# ----------------------------------------------------------------------------- Q4_K / Q5_K

def _q45_k(x: torch.Tensor, nmax: int, rmin: float, nstep: int):
    """The common part of quantize_row_q4_K_ref / q5_K_ref: header bytes and levels uint8[nb, 256]."""
    nb = x.shape[0]
    xs = _cols(x, 32)
    av_x = _sqrtf(_seqsum_into(xs * xs, torch.empty(xs.shape[1])) / 32.0)
    w = xs.abs().add_(av_x)
    scale, the_min, sel_iscale, sel_min, flat = _make_qkx2_search(xs, w, nmax, rmin, 0.1, nstep, False)
    sc, mins = scale.reshape(nb, 8), the_min.reshape(nb, 8)
    max_scale, max_min = _positive_max(sc), _positive_max(mins)
    inv_scale = torch.where(max_scale > 0, _div(63.0, torch.where(max_scale > 0, max_scale, 1.0)), 0.0)
    inv_min = torch.where(max_min > 0, _div(63.0, torch.where(max_min > 0, max_min, 1.0)), 0.0)
    # (uint8_t)nearest_int(..) wraps modulo 256 before MIN(63, ..)
    ls = (_nearest_int(inv_scale[:, None] * sc) & 0xFF).clamp_(max=63)
    lm = (_nearest_int(inv_min[:, None] * mins) & 0xFF).clamp_(max=63)
    d_bytes, d = _fp16(max_scale / 63.0)
    m_bytes, dmin = _fp16(max_min / 63.0)
    dl = (d[:, None] * ls.float()).reshape(-1)
    ml = (dmin[:, None] * lm.float()).reshape(-1)
    nz = dl != 0
    L = _levels((xs + ml).div_(torch.where(nz, dl, 1.0)), 0, nmax)
    if not bool(nz.all()):
        cols = (~nz).nonzero()[:, 0]
        L[:, cols] = _qkx2_levels(xs[:, cols], sel_iscale[cols], sel_min[cols], flat[cols], nmax)
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


def _dq45_k(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    nb = b.shape[0]
    d, dmin = _f16_from(b[:, 0:2]), _f16_from(b[:, 2:4])
    sc, m = _unpack_k4_scales(b[:, 4:16])
    d1 = d[:, None] * sc.float()
    m1 = dmin[:, None] * m.float()
    y = q.reshape(nb, 8, 32).float().mul_(d1[:, :, None])
    return y.sub_(m1[:, :, None]).reshape(nb, QK_K)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    q = qs.contiguous().reshape(-1, 4, 1, 32)
    return torch.cat([q & 0xF, q >> 4], dim=2).reshape(-1, QK_K)


def _q4_codes(b: torch.Tensor) -> torch.Tensor:
    return _nibbles(b[:, 16:144])


def _q5_codes(b: torch.Tensor) -> torch.Tensor:
    return _nibbles(b[:, 48:176]) | (_bits8(b[:, 16:48]) << 4)


def _dq4_k(b: torch.Tensor) -> torch.Tensor:
    return _dq45_k(b, _q4_codes(b))


def _dq5_k(b: torch.Tensor) -> torch.Tensor:
    return _dq45_k(b, _q5_codes(b))


# ----------------------------------------------------------------------------- Q3_K

def _q3_k(x: torch.Tensor) -> torch.Tensor:
    nb = x.shape[0]
    xs = _cols(x, 16)
    scale, L0 = _make_q3_quants_rmse(xs, 4)
    sc = scale.reshape(nb, 16)
    max_scale, _ = _first_absmax(sc.t())
    has = max_scale != 0
    iscale = _div(-32.0, torch.where(has, max_scale, 1.0))
    l = _wrap_i8(_nearest_int(iscale[:, None] * sc)).clamp_(-32, 31) + 32
    l = l.masked_fill_(~has[:, None], 0)
    d_bytes, d = _fp16(torch.where(has, _div(1.0, iscale), 0.0))
    dl = (d[:, None] * (l - 32).float()).reshape(-1)
    nz = dl != 0
    L = _levels(xs / torch.where(nz, dl, 1.0), -4, 3)
    if not bool(nz.all()):
        L = torch.where(nz, L, L0)
    lo, hi = l[:, :8], l[:, 8:]
    s_lo = (lo & 0xF) | ((hi & 0xF) << 4)
    g = (l >> 4).reshape(nb, 4, 4)               # scale 4g + k: bits 2g..2g+1 of byte 8 + k
    s_hi = g[:, 0] | (g[:, 1] << 2) | (g[:, 2] << 4) | (g[:, 3] << 6)
    return torch.cat([_pack_q3_codes(_rows_u8(L, nb)), s_lo.to(torch.uint8), s_hi.to(torch.uint8), d_bytes], dim=1)


def _pack_q3_codes(Lb: torch.Tensor) -> torch.Tensor:
    """levels [nb, 256] in 0..7 -> hmask (32 bytes; L > 3: bit k of byte m for element 32k + m)
    + the low two bits (64 bytes)."""
    return torch.cat([_pack_high_bits(Lb >> 2), _pack_2bit(Lb & 3)], dim=1)


def _q3_codes(b: torch.Tensor) -> torch.Tensor:
    return _unpack_2bit(b[:, 32:96]) | (_bits8(b[:, :32]) << 2)


def _q2_codes(b: torch.Tensor) -> torch.Tensor:
    return _unpack_2bit(b[:, 16:80])


def _dq3_k(b: torch.Tensor) -> torch.Tensor:
    nb = b.shape[0]
    s = b[:, 96:108].contiguous()
    low = torch.cat([s[:, :8] & 0xF, s[:, :8] >> 4], dim=1)
    g = s[:, 8:12]
    high = torch.cat([g & 3, (g >> 2) & 3, (g >> 4) & 3, g >> 6], dim=1)   # scale 4k + j: byte 8 + j
    scales = (low | (high << 4)).float().sub_(32.0)
    d = _f16_from(b[:, 108:110])
    # level - 4 where the hmask bit is clear: (q | hbit << 2) - 4
    q = _q3_codes(b).reshape(nb, 16, 16).float().sub_(4.0)
    return q.mul_((d[:, None] * scales)[:, :, None]).reshape(nb, QK_K)


# ----------------------------------------------------------------------------- Q2_K

def _q2_k(x: torch.Tensor) -> torch.Tensor:
    nb = x.shape[0]
    xs = _cols(x, 16)
    scale, the_min, sel_iscale, sel_min, flat = _make_qkx2_search(xs, xs.abs(), 3, -0.5, 0.1, 15, True)
    sc, mins = scale.reshape(nb, 16), the_min.reshape(nb, 16)
    max_scale, max_min = _positive_max(sc), _positive_max(mins)
    has_s, has_m = max_scale > 0, max_min > 0
    iscale = _div(15.0, torch.where(has_s, max_scale, 1.0))
    imin = _div(15.0, torch.where(has_m, max_min, 1.0))
    ls = _nearest_int(iscale[:, None] * sc).masked_fill_(~has_s[:, None], 0)
    lm = _nearest_int(imin[:, None] * mins).masked_fill_(~has_m[:, None], 0)
    scales = (ls | (lm << 4)) & 0xFF                 # stored through uint8_t
    d_bytes, d = _fp16(torch.where(has_s, max_scale / 15.0, 0.0))
    m_bytes, dmin = _fp16(torch.where(has_m, max_min / 15.0, 0.0))
    dl = (d[:, None] * (scales & 0xF).float()).reshape(-1)
    ml = (dmin[:, None] * (scales >> 4).float()).reshape(-1)
    nz = dl != 0
    L = _levels((xs + ml).div_(torch.where(nz, dl, 1.0)), 0, 3)
    if not bool(nz.all()):
        cols = (~nz).nonzero()[:, 0]
        L[:, cols] = _qkx2_levels(xs[:, cols], sel_iscale[cols], sel_min[cols], flat[cols], 3)
    return torch.cat([scales.to(torch.uint8), _pack_2bit(_rows_u8(L, nb)), d_bytes, m_bytes], dim=1)


def _dq2_k(b: torch.Tensor) -> torch.Tensor:
    nb = b.shape[0]
    s = b[:, :16].contiguous()
    q = _q2_codes(b).reshape(nb, 16, 16).float()
    d, dmin = _f16_from(b[:, 80:82]), _f16_from(b[:, 82:84])
    dl = d[:, None] * (s & 0xF).float()
    ml = dmin[:, None] * (s >> 4).float()
    return q.mul_(dl[:, :, None]).sub_(ml[:, :, None]).reshape(nb, QK_K)


# ----------------------------------------------------------------------------- public API

_ENCODERS = {"q6_k": _q6_k, "q5_k": _q5_k, "q4_k": _q4_k, "q3_k": _q3_k, "q2_k": _q2_k}
_DECODERS = {"q6_k": _dq6_k, "q5_k": _dq5_k, "q4_k": _dq4_k, "q3_k": _dq3_k, "q2_k": _dq2_k}


# ----------------------------------------------------------------------------- grids (GPTQ)
# Every K-quant block decodes as value = s[sub] * (L - off) - m[sub] with L in 0..nmax (off 32
# for Q6_K, 4 for Q3_K, else 0; m is 0 where off is not): (sub-block width, nmax, byte range
# of the codes, codes packer). GPTQ fixes s and m from a block's bytes
# and rounds its own values onto that grid (quant.gptq), then writes the codes back here.
_CODES = {
    "q6_k": (16, 63, (0, 192), _pack_q6_codes, _q6_codes),
    "q5_k": (32, 31, (16, 176), _pack_q5_codes, _q5_codes),
    "q4_k": (32, 15, (16, 144), _pack_q4_codes, _q4_codes),
    "q3_k": (16, 7, (0, 96), _pack_q3_codes, _q3_codes),
    "q2_k": (16, 3, (16, 80), _pack_2bit, _q2_codes),
}


def block_codes(name: str, b: torch.Tensor) -> torch.Tensor:
    """The codes L uint8 [nb, 256] (0..nmax) stored in blocks b (repack's inverse)."""
    return _CODES[qtype(name).name][4](b)


def block_grid(name: str, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
    """uint8 [nb, type_size] -> (s, m) float32 [nb, 256 / sub] and (off, sub, nmax): the grid
    of each sub-block, in the float32 arithmetic of dequantize_row_<name>: value = s * (L - off)
    - m exactly."""
    name = qtype(name).name
    sub, nmax = _CODES[name][:2]
    nb = b.shape[0]
    if name == "q6_k":
        s = _f16_from(b[:, 208:210])[:, None] * b[:, 192:208].contiguous().view(torch.int8).float()
        return s, torch.zeros_like(s), 32, sub, nmax
    if name in ("q4_k", "q5_k"):
        d, dmin = _f16_from(b[:, 0:2]), _f16_from(b[:, 2:4])
        sc, m = _unpack_k4_scales(b[:, 4:16])
        return d[:, None] * sc.float(), dmin[:, None] * m.float(), 0, sub, nmax
    if name == "q3_k":
        sc = b[:, 96:108].contiguous()
        low = torch.cat([sc[:, :8] & 0xF, sc[:, :8] >> 4], dim=1)
        g = sc[:, 8:12]
        high = torch.cat([g & 3, (g >> 2) & 3, (g >> 4) & 3, g >> 6], dim=1)
        s = _f16_from(b[:, 108:110])[:, None] * (low | (high << 4)).float().sub_(32.0)
        return s, torch.zeros_like(s), 4, sub, nmax
    sc = b[:, :16].contiguous()
    d, dmin = _f16_from(b[:, 80:82]), _f16_from(b[:, 82:84])
    return d[:, None] * (sc & 0xF).float(), dmin[:, None] * (sc >> 4).float(), 0, sub, nmax


def repack(name: str, b: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Blocks b uint8 [nb, type_size] with their codes replaced by L [nb, 256] (0..nmax); the
    scales (and mins) are kept. dequantize(repack(b, L)) == s * (L - off) - m of block_grid(b)."""
    name = qtype(name).name
    _, nmax, (lo, hi), pack, _ = _CODES[name]
    L = L.to(torch.int64)
    if L.numel() and (int(L.min()) < 0 or int(L.max()) > nmax):
        raise ValueError(f"{name} codes out of range 0..{nmax}")
    out = b.clone()
    out[:, lo:hi] = pack(L.to(torch.uint8).reshape(-1, QK_K))
    return out


def _check_blocks(name: str, x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2 or x.shape[1] != QK_K:
        raise ValueError(f"{name}: expected blocks of shape [n, {QK_K}], got {tuple(x.shape)}")
    return x.detach().to(device="cpu", dtype=torch.float32).contiguous()


def quantize_blocks(name: str, x: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """float32 [n, 256] -> uint8 [n, type_size], the bytes of quantize_row_<name>_ref."""
    q = qtype(name)
    if q.name not in _ENCODERS:
        raise KeyError(f"{name} is not a K-quant type handled here ({', '.join(KQUANT_TYPES)})")
    x = _check_blocks(q.name, x)
    enc = _ENCODERS[q.name]
    return map_blocks(enc, x, q.type_size, torch.uint8, CHUNK_BLOCKS, threads)


def dequantize_blocks(name: str, data: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """uint8 [n, type_size] -> float32 [n, 256], equal to ggml's dequantize_row_<name>."""
    q = qtype(name)
    if q.name not in _DECODERS:
        raise KeyError(f"{name} is not a K-quant type handled here ({', '.join(KQUANT_TYPES)})")
    data = data.detach().to("cpu").contiguous()
    if data.dtype != torch.uint8 or data.numel() % q.type_size:
        raise ValueError(f"{q.name}: expected uint8 data, a multiple of {q.type_size} bytes")
    data = data.reshape(-1, q.type_size)
    dec = _DECODERS[q.name]
    out = map_blocks(dec, data, QK_K, torch.float32, CHUNK_BLOCKS, threads)
    return out


def is_kquant(name) -> bool:
    try:
        return qtype(name).name in _ENCODERS
    except KeyError:
        return False


def quantize(name: str, x2d: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """float32 [rows, n] -> uint8 [rows, row_bytes] (n a multiple of 256), llama.cpp's bytes."""
    q = qtype(name)
    if x2d.dim() != 2:
        raise ValueError(f"{q.name}: expected a 2-D tensor, got shape {tuple(x2d.shape)}")
    rows, n = x2d.shape
    row_bytes = q.row_bytes(n)   # raises on a row that is not a multiple of 256
    blocks = x2d.reshape(-1, QK_K) if rows * n else x2d.new_zeros((0, QK_K))
    return quantize_blocks(q.name, blocks, threads).reshape(rows, row_bytes)


def dequantize(name: str, data: torch.Tensor, shape, threads: int | None = None) -> torch.Tensor:
    """uint8 bytes of a tensor of `shape` (row-major, last dim contiguous) -> float32 `shape`."""
    q = qtype(name)
    shape = tuple(int(s) for s in shape)
    if data.numel() != q.nbytes(shape):
        raise ValueError(f"{q.name}: {data.numel()} bytes do not hold a tensor of shape {shape} "
                         f"({q.nbytes(shape)} bytes)")
    return dequantize_blocks(q.name, data, threads).reshape(shape)


# Signatures matching codecs/ggml.py, for one dispatch over all types.
def quantize_rows(name: str, x: torch.Tensor) -> torch.Tensor:
    return quantize(name, x)


def dequantize_rows(name: str, data: torch.Tensor, n: int) -> torch.Tensor:
    q = qtype(name)
    data = data.contiguous().reshape(-1, q.row_bytes(n))
    return dequantize_blocks(q.name, data).reshape(data.shape[0], n)
