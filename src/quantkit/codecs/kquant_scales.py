"""The arithmetic of llama.cpp's K-quant reference quantizers (ggml-quants.c), bit-exact in torch:
the float primitives and the sub-block scale searches (make_qx_quants, make_qkx2_quants,
make_q3_quants) that codecs/kquants.py builds its encoders from.

The C code walks one super-block at a time; here every loop over candidate scales, and every
coordinate descent step, runs over all sub-blocks of a chunk at once, while the arithmetic inside
follows the C expression by expression in float32. What makes the bytes equal:

- sums are accumulated in C's order (element 0, then 1, ...) starting from 0.0f, never with a
  pairwise/vectorized reduction, which rounds differently (`seqsum_into`);
- ggml's `nearest_int` (add 1.5*2^23 and keep the mantissa) rounds half to even; where its
  argument is provably small (|v| < 2^22) `torch.round` is the same function, elsewhere
  (x/d with d read back from fp16) the bit trick is emulated exactly (`nearest_int`);
- `a / b` is always tensor / tensor or tensor / python-scalar: torch evaluates `scalar / tensor`
  as `reciprocal(tensor) * scalar`, two roundings;
- torch.sqrt on large float32 tensors goes through MKL's vector math and is not correctly
  rounded; C's sqrtf is, so square roots are taken with numpy (`sqrtf`);
- C's integer conversions are kept (`(uint8_t)nearest_int(..)` wraps modulo 256 before MIN(63,
  ..), `int8_t` scales wrap), as are strict comparisons ("the first largest wins": argmax);
- super-block scales go through fp16 with round-to-nearest-even (GGML_FP32_TO_FP16) and the
  final quants are computed from the fp16 value read back, as in C.

The reference C is compiled for baseline x86-64 without -ffast-math, so it has no fused
multiply-adds and no reassociation: every float op rounds once, as torch's elementwise ops do.
Inputs must be finite (the GGUF writer rejects NaN/Inf by tensor name first); finite values of
any magnitude, subnormals and overflow of x*x*x included, give llama.cpp's bytes.
"""

from __future__ import annotations

import numpy as np
import torch

from .bits import absmax_signed

MAGIC = 12582912.0                        # 1.5 * 2**23, nearest_int's rounding constant
GROUP_MAX_EPS = float(np.float32(1e-15))  # GROUP_MAX_EPS = 1e-15f


def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int, bit for bit (also outside its asserted range): float32 -> int32."""
    return ((v + MAGIC).view(torch.int32) & 0x7FFFFF) - 0x400000


def wrap_i8(v: torch.Tensor) -> torch.Tensor:
    """C's int -> int8_t conversion (modulo 256)."""
    return ((v + 128) & 0xFF) - 128


def seqsum_first(p: torch.Tensor) -> torch.Tensor:
    """`s = p[0]; s += p[1]; ...` (a C sum initialised with its first term), float32."""
    s = p[0].clone()
    for i in range(1, p.shape[0]):
        s += p[i]
    return s


def div(num: float, t: torch.Tensor) -> torch.Tensor:
    """float32 num / t with one rounding (torch's `num / t` is reciprocal(t) * num)."""
    return torch.full_like(t, num) / t


def sqrtf(t: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.sqrt(t.numpy()))


def first_absmax(x: torch.Tensor):
    """`amax = 0; max = 0; for v: if (fabsf(v) > amax) {amax = fabsf(v); max = v;}` per column
    of x[n, M]: the first element of largest magnitude, with its sign, and its magnitude. A NaN
    never compares greater (a sub-block scale is NaN where x*x*x overflowed)."""
    ax = x.abs()
    ax = torch.where(ax > 0, ax, torch.zeros_like(ax))
    idx = ax.argmax(dim=0, keepdim=True)
    amax = ax.gather(0, idx)[0]
    v = torch.where(amax > 0, x.gather(0, idx)[0], torch.zeros_like(amax))
    return v, amax




def positive_max(t: torch.Tensor) -> torch.Tensor:
    """`m = 0; for v: if (v > m) m = v` per row of t[nb, k] (+0.0 when nothing is positive)."""
    return torch.where(t > 0, t, torch.zeros_like(t)).max(dim=1).values


def clamped_levels(v: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """MAX(lo, MIN(hi, nearest_int(v))) - lo as int32, in place on the temporary v."""
    b = v.add_(MAGIC).view(torch.int32)
    return b.bitwise_and_(0x7FFFFF).clamp_(0x400000 + lo, 0x400000 + hi).sub_(0x400000 + lo)








def seqsum_into(p, out: torch.Tensor) -> torch.Tensor:
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


def make_qx_search(x: torch.Tensor, nmax: int, qw: torch.Tensor | None = None):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw) over the columns of x[n, M]; qw [n, M] the
    weights (None: x*x, as C without quant_weights).

    Returns (scale, iscale, zero), each [M]: the returned scale, the inverse scale whose levels
    C leaves in L, and the all-zero columns (L = 0 there). L itself is only needed where the
    caller's fp16 scale turns out 0, so it is computed there only (`qx_levels`).
    The 19 candidate sums are computed first; the choice among them, whose float rounding
    depends on the running best, is then replayed in C's order.
    """
    n, M = x.shape
    maxv, amax = absmax_signed(x, 0)
    zero = amax < GROUP_MAX_EPS
    iscales = torch.div(_qx_numerators(nmax).expand(-1, M), torch.where(zero, 1.0, maxv))
    K = iscales.shape[0]
    w = x * x if qw is None else qw
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
        seqsum_into(p_rows, sumlx[k])
        torch.mul(w, l, out=p).mul_(l)
        seqsum_into(p_rows, suml2[k])
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


def qx_levels(x: torch.Tensor, iscale: torch.Tensor, zero: torch.Tensor, nmax: int) -> torch.Tensor:
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


def make_qkx2_search(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                      nstep: int, use_mad: bool):
    """make_qkx2_quants over the columns of x[n, M] with weights w[n, M].

    Returns (scale, the_min, iscale, min_used, flat), each [M]: the returned scale and -min,
    and the inverse scale and min from which C's L was computed (`qkx2_levels`). The C loop
    updates `min` when a candidate wins, and later candidates use the updated min both in their
    inverse scale and in x - min: that state is carried per column exactly so.
    """
    mn = x.amin(dim=0)
    mx = x.amax(dim=0)
    sum_w = seqsum_first(w)
    sum_x = seqsum_first(w * x)
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
        return seqsum_into(e_rows, torch.empty_like(scale))

    iscale = div(float(nmax), torch.where(flat, 1.0, mx - mn))
    scale = div(1.0, iscale)
    iscale = _finite(iscale)
    levels(iscale, mn)
    best_error = error(scale, mn)
    sel_iscale, sel_min, cur_min = iscale, mn, mn
    for step in range(nstep + 1):
        num = (np.float32(rmin) + np.float32(rdelta) * np.float32(step)) + np.float32(nmax)
        iscale = _finite(div(float(num), torch.where(flat, 1.0, mx - cur_min)))
        levels(iscale, cur_min)
        torch.mul(w, t, out=wl)
        sum_l = seqsum_into(wl_rows, torch.empty_like(mn))
        torch.mul(wl, x, out=e)
        sum_xl = seqsum_into(e_rows, torch.empty_like(mn))
        wl.mul_(t)
        sum_l2 = seqsum_into(wl_rows, torch.empty_like(mn))
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


def qkx2_levels(x, iscale, minv, flat, nmax) -> torch.Tensor:
    l = (x - minv).mul_(iscale).round_().clamp_(0, nmax).to(torch.int32)
    return l.masked_fill_(flat, 0)


def make_q3_quants_rmse(x: torch.Tensor, nmax: int):
    """make_q3_quants(n, nmax, x, L, do_rmse=true) over columns of x[n, M].

    The coordinate descent visits elements in order and each accepted change moves the sums
    the next element sees, so it runs element by element, vectorized over columns. Columns that
    stop changing are left in the loop: a pass without change is a fixed point, so further
    passes change nothing, as C's early break assumes.
    Returns (scale [M], L [n, M] int32: nmax + l, or 0 for an all-zero column).
    """
    maxv, amax = absmax_signed(x, 0)
    zero = amax < GROUP_MAX_EPS
    iscale = div(float(-nmax), torch.where(zero, 1.0, maxv))
    L = (x * iscale).round_().clamp_(-nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx = seqsum_into(wx * L, torch.empty_like(maxv))
    suml2 = seqsum_into((w * L).mul_(L), torch.empty_like(maxv))
    for _ in range(5):
        changed = torch.zeros_like(zero)
        for i in range(x.shape[0]):
            li, wi, wxi = L[i], w[i], wx[i]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            # x*sl2/slx is unbounded when slx is tiny: nearest_int emulated exactly.
            new_l = clamped_levels(x[i] * sl2 / slx, -nmax, nmax - 1).sub_(nmax).float()
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


# ----------------------------------------------------------------------------- importance weights

def rowsum_seq(t: torch.Tensor) -> torch.Tensor:
    """Per row of t[rows, n]: `s = 0; for j: s += t[j]` in float32, C's order (numpy's
    accumulate is sequential, unlike its pairwise reduce)."""
    if t.shape[1] == 0:
        return torch.zeros(t.shape[0])
    return torch.from_numpy(np.ascontiguousarray(np.cumsum(t.numpy(), axis=1, dtype=np.float32)[:, -1]))


def make_qp_search(x: torch.Tensor, qw: torch.Tensor, nmax: int):
    """make_qp_quants(n, nmax, x, L, quant_weights) over the columns of x[n, M] with weights
    qw[n, M]: the positive scale of the sub-block scales (or mins) and their codes.

    C stores the levels in uint8_t (a negative input, possible only through float rounding,
    wraps modulo 256) while its first sums use the int level: both are kept so.
    Returns (scale [M], L [n, M] int32 in 0..255).
    """
    n, M = x.shape
    mx = positive_max(x.t())
    zero = mx < GROUP_MAX_EPS
    safe = torch.where(zero, 1.0, mx)
    iscale = div(float(nmax), safe)
    L = nearest_int(iscale * x) & 0xFF
    scale = div(1.0, iscale)
    d = x - scale * L.float()
    best = seqsum_into((qw * d).mul_(d), torch.empty(M))
    for s in (-4, -3, -2, -1, 1, 2, 3, 4):
        num = np.float32(0.1) * np.float32(s) + np.float32(nmax)
        isc = div(float(num), safe)
        sc = div(1.0, isc)
        l = nearest_int(isc * x).clamp_(max=nmax)
        d = x - sc * l.float()
        mse = seqsum_into((qw * d).mul_(d), torch.empty(M))
        better = mse < best
        best = torch.where(better, mse, best)
        iscale = torch.where(better, isc, iscale)
    l = nearest_int(iscale * x).clamp_(max=nmax)
    lf = l.float()
    sumlx = seqsum_into((qw * x).mul_(lf), torch.empty(M))
    suml2 = seqsum_into((qw * lf).mul_(lf), torch.empty(M))
    L = l & 0xFF
    for _ in range(5):
        changed = torch.zeros(M, dtype=torch.bool)
        for i in range(n):
            wi, xi, Li = qw[i], x[i], L[i].float()
            slx = sumlx - wi * xi * Li
            sl2 = suml2 - wi * Li * Li
            ok = (slx > 0) & (sl2 > 0)
            new_l = nearest_int(xi * sl2 / torch.where(ok, slx, 1.0)).clamp_(max=nmax)
            nl = new_l.float()
            slx2 = slx + wi * xi * nl
            sl22 = sl2 + wi * nl * nl
            accept = ok & (new_l != L[i]) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[i] = torch.where(accept, new_l & 0xFF, L[i])
            sumlx = torch.where(accept, slx2, sumlx)
            suml2 = torch.where(accept, sl22, suml2)
            changed |= accept
        if not bool(changed.any()):
            break
    scale = torch.where(suml2 > 0, sumlx / suml2, 0.0)
    return scale.masked_fill_(zero, 0.0), L.masked_fill_(zero[None, :], 0)
