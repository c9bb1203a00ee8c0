"""llama.cpp's IQ1_S and IQ1_M in vectorised numpy, byte for byte.

A super-block of 256 holds groups of 8 values, each one point of a 2048-point ternary lattice
(levels -1, 0, 1: codecs/lattice.py) shifted by +-IQ1S_DELTA, under 3-bit sub-block scales
(IQ1_S: sub-blocks of 32, one shift each, an fp16 super-block scale; IQ1_M: sub-blocks of 16,
one shift per group of 8, the fp16 scale spread over the top nibbles of the scales).
`encode_s(x, qw)` / `encode_m(x, qw)` reproduce ggml-quants.c's quantize_row_iq1_s_impl /
quantize_row_iq1_m_impl (IQ1_M also without weights); `decode_s` / `decode_m` reproduce
dequantize_row_iq1_s / _m.

The C code sorts each sub-block (glibc's qsort, a stable merge sort at these sizes), then tries
every split of the sorted values into three runs (i1 <= i2) with each shift, keeping the first
best `sumqx^2/sumq2` by its own running comparison; here every candidate's sums are computed at
once as the C writes them (float32, op by op), and the running comparison is a loop over the
candidates in C's order, vectorised over all sub-blocks of a chunk. Groups off the grid move to
their best neighbour (iq1_find_best_neighbour2), the scale is refit, and the 3-bit scales come
from max_scale/15; IQ1_M then refits its super-block scale over all 256 values.
"""

from __future__ import annotations

import numpy as np

from .lattice import (F32, FLT_MAX, QK_K, Lattice, check_scales, fp16_bits, fp16_value, lattice, nearest_int,
                      padded, padded_search, seqsum, tables)

EPS_S = F32(1e-12)         # GROUP_MAX_EPS_IQ1_S
EPS_M = F32(1e-7)          # GROUP_MAX_EPS_IQ1_M


def _shifted(delta: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """x_p = {-1 + delta, delta, 1 + delta}, x_m = {-1 - delta, -delta, 1 - delta} (float32)."""
    return (np.array([F32(-1) + delta, delta, F32(1) + delta], F32),
            np.array([F32(-1) - delta, -delta, F32(1) - delta], F32))


def _prepare(x: np.ndarray, qw: np.ndarray | None, bs: int):
    """x [nb, 256] -> sub-block rows xs [S, bs] and their weights (S = nb*256/bs)."""
    sumx2 = seqsum((x * x).T)
    sigma2 = F32(2) * sumx2 / F32(QK_K)
    xs = x.reshape(-1, bs)
    if qw is None:
        return xs, xs * xs
    s2 = np.repeat(sigma2, QK_K // bs)[:, None]
    return xs, qw.reshape(-1, bs) * np.sqrt(s2 + xs * xs)


def _sorted_sums(xs: np.ndarray, w: np.ndarray):
    """The stable sort of each sub-block; prefix sums of w*x and w in sorted order [bs+1, S]
    (`sumx[j+1] = sumx[j] + weight[i]*xb[i]`), the sorted order and each element's rank."""
    order = np.argsort(xs, axis=1, kind="stable")
    wx = np.take_along_axis(w * xs, order, axis=1)
    ws = np.take_along_axis(w, order, axis=1)
    S, bs = xs.shape
    zero = np.zeros((S, 1), F32)
    sx = np.add.accumulate(np.concatenate([zero, wx], axis=1), axis=1).T.copy()
    sw = np.add.accumulate(np.concatenate([zero, ws], axis=1), axis=1).T.copy()
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(bs)[None, :], axis=1)
    return sx, sw, order, rank


def _scan(blocks, S: int):
    """The running `if (sumq2 > 0 && sumqx*sumqx > best*sumq2) {scale = sumqx/sumq2; best =
    scale*sumqx; ...}` over candidates in order, from best = -FLT_MAX. `blocks` yields
    (qx, q2): lists of K variants of [p, S] for the next p rows; candidate c is row c // K of
    variant c % K -> (winning candidate [S] or -1, its scale [S]). One row of S sub-blocks per
    step, in place: no [candidates x S] temporaries."""
    best = np.full(S, -FLT_MAX, F32)
    bi = np.full(S, -1, np.int64)
    scale = None
    t, qq, sc = np.empty(S, F32), np.empty(S, F32), np.empty(S, F32)
    upd, ok = np.empty(S, bool), np.empty(S, bool)
    r0 = 0
    for qx, q2 in blocks:
        K, P = len(qx), qx[0].shape[0]
        if scale is None:                                              # kept where nothing wins
            scale = qx[0][0] / np.where(q2[0][0] > 0, q2[0][0], F32(1))
        for r in range(P):
            for k in range(K):
                x, y = qx[k][r], q2[k][r]
                np.multiply(best, y, out=t)
                np.multiply(x, x, out=qq)
                np.greater(qq, t, out=upd)
                np.greater(y, 0, out=ok)
                upd &= ok
                np.divide(x, y, out=sc)
                np.copyto(scale, sc, where=upd)
                sc *= x
                np.copyto(best, sc, where=upd)
                np.copyto(bi, (r0 + r) * K + k, where=upd)
        r0 += P
    return bi, scale


def _values(delta: np.float32) -> np.ndarray:
    """The value of every grid point under each shift: float32 [2G, 8], rows G.. for x_m."""
    x_p, x_m = _shifted(delta)
    lev = lattice("iq1s").levels.astype(np.intp)
    return np.concatenate([x_p[lev], x_m[lev]])


def _snap(lat: Lattice, L: np.ndarray, xs: np.ndarray, w: np.ndarray, scale: np.ndarray, minus: np.ndarray,
          shifted: np.ndarray):
    """Groups of 8 levels of L [S, bs] -> grid indices [S, bs/8]; those off the grid move to the
    neighbour with the smallest sum(w*(scale*xx[l] - x)^2) (iq1_find_best_neighbour2), xx being
    each group's shifted values (minus [S, bs/8]: x_m; shifted: [x_p, x_m], float32 [2, 3]) ->
    (indices, whether any group of the sub-block was off)."""
    S, bs = L.shape
    ng = bs // 8
    u = lat.code(L.reshape(S, ng, 8).transpose(2, 0, 1))
    gi = lat.index[u].astype(np.int64)
    ss, kk = np.nonzero(gi < 0)
    if len(ss):
        grp = ss * ng + kk
        minus_g = np.take(minus.reshape(-1), grp)
        gi[ss, kk] = padded_search(padded(lat.name), u[ss, kk], np.take(scale, ss),
                                   np.take(xs.reshape(S * ng, 8), grp, axis=0),
                                   np.take(w.reshape(S * ng, 8), grp, axis=0), shifted[minus_g.astype(np.intp)])
    off = np.zeros(S, bool)
    off[ss] = True
    return gi, off


def _group_values(gi: np.ndarray, minus: np.ndarray, vt: np.ndarray) -> np.ndarray:
    """q = xx[level] of every element, float32 [S, bs], from grid indices and shifts [S, ng]."""
    rows = gi + (len(vt) // 2) * minus
    return np.take(vt, rows.reshape(-1), axis=0).reshape(gi.shape[0], -1)


def _refit(scale, off, xs, w, q) -> np.ndarray:
    """Where a group moved: scale = sum(w*q*x)/sum(w*q*q) if both are positive."""
    if not off.any():
        return scale
    sumqx = seqsum((w[off] * q[off] * xs[off]).T)
    sumq2 = seqsum((w[off] * q[off] * q[off]).T)
    good = (sumqx > 0) & (sumq2 > 0)
    scale = scale.copy()
    scale[off] = np.where(good, sumqx / np.where(good, sumq2, F32(1)), scale[off])
    return scale


def _place(L, xs, w, scale, minus, skip, vt, delta):
    """Grid indices [S, bs/8] of the sub-blocks not skipped (0 for the skipped) and their refit
    scales (0 for the skipped)."""
    lat = lattice("iq1s")
    live = np.flatnonzero(~skip)
    gi = np.zeros((L.shape[0], L.shape[1] // 8), np.int64)
    out = np.zeros_like(scale)
    if len(live):
        g, off = _snap(lat, L[live], xs[live], w[live], scale[live], minus[live], np.stack(_shifted(delta)))
        gi[live] = g
        out[live] = _refit(scale[live], off, xs[live], w[live], _group_values(g, minus[live], vt))
        check_scales(out[live])
    return gi, out


def _levels(rank: np.ndarray, i1: np.ndarray, i2: np.ndarray) -> np.ndarray:
    """L = 0 below the split i1 of the sorted order, 1 up to i2, 2 from i2 on."""
    return ((rank >= i1[:, None]).astype(np.int64) + (rank >= i2[:, None])).astype(np.int8)


def _sub_scales(scale: np.ndarray, nb: int, per: int):
    """d = max_scale/15 per super-block, the 3-bit scales l and which super-blocks are all zero."""
    max_scale = scale.reshape(nb, per).max(axis=1)
    zero = ~(max_scale != 0)
    d = max_scale / F32(15)
    idv = np.repeat(F32(1) / d, per)
    ls = np.clip(nearest_int(F32(0.5) * (idv * scale - F32(1))), 0, 7).reshape(nb, per).astype(np.int64)
    return d, np.where(zero[:, None], 0, ls), zero


# ----------------------------------------------------------------------------- IQ1_S

PAIRS_S = np.triu_indices(33)            # (i1, i2), i1 <= i2, in the C's loop order


def _rows(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return np.take(a, idx, axis=0)                # np.take: a fast row gather


PAIR_STEP = 64          # candidate pairs per block: each [PAIR_STEP, S] array stays in cache


def _candidates_s(sx, sw, vs):
    """Blocks of sumqx, sumq2 [<= PAIR_STEP, S] for the pairs in order, one per shift's values
    v in vs, as the C writes them (`_scan`'s blocks)."""
    T, TW = sx[-1], sw[-1]
    pre = [(sx * v[0], (T - sx) * v[2], sw * v[0] * v[0], (TW - sw) * v[2] * v[2], v[1]) for v in vs]
    for p0 in range(0, len(PAIRS_S[0]), PAIR_STEP):
        i1, i2 = PAIRS_S[0][p0:p0 + PAIR_STEP], PAIRS_S[1][p0:p0 + PAIR_STEP]
        da = _rows(sx, i2) - _rows(sx, i1)
        db = _rows(sw, i2) - _rows(sw, i1)
        qxs, q2s = [], []
        for A0, A2, B0, B2, v1 in pre:
            qx = _rows(A0, i1) + da * v1
            qx += _rows(A2, i2)
            q2 = _rows(B0, i1) + db * v1 * v1
            q2 += _rows(B2, i2)
            qxs.append(qx)
            q2s.append(q2)
        yield qxs, q2s


def encode_s(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """float32 [nb, 256] with importance weights [nb, 256] -> IQ1_S blocks uint8 [nb, 50]."""
    with np.errstate(all="ignore"):
        return _encode_s(x, qw)


def _encode_s(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    xs, w = _prepare(x, qw, 32)
    x_p, x_m = _shifted(tables()["iq1s_delta"])
    skip = np.abs(xs).max(axis=1) < EPS_S
    sx, sw, order, rank = _sorted_sums(xs, w)
    bi, scale = _scan(_candidates_s(sx, sw, (x_p, x_m)), xs.shape[0])   # (pair, shift) in the C's order
    skip |= bi < 0
    pair, minus = np.maximum(bi, 0) // 2, (np.maximum(bi, 0) % 2).astype(bool)
    L = _levels(rank, PAIRS_S[0][pair], PAIRS_S[1][pair])
    neg = scale < 0
    L = np.where(neg[:, None], 2 - L, L)
    scale = np.where(neg, -scale, scale)
    minus ^= neg
    vt = _values(tables()["iq1s_delta"])
    gi, scale = _place(L, xs, w, scale, np.repeat(minus[:, None], 4, axis=1), skip, vt, tables()["iq1s_delta"])
    minus[skip] = False
    d, ls, zero = _sub_scales(scale, nb, 8)
    gi = gi.reshape(nb, 8, 4)
    qh = ((gi >> 8) << (3 * np.arange(4))).sum(axis=2)
    qh |= np.where(zero[:, None], 0, (ls | (minus.reshape(nb, 8) << 3)) << 12)
    out = np.zeros((nb, 50), np.uint8)
    out[:, :2] = np.where(zero, 0, fp16_bits(d * F32(1.125))).astype(np.uint16).reshape(nb, 1).view(np.uint8)
    out[:, 2:34] = (gi & 255).reshape(nb, 32).astype(np.uint8)
    out[:, 34:50] = qh.astype(np.uint16).view(np.uint8).reshape(nb, 16)
    return out


def decode_s(b: np.ndarray) -> np.ndarray:
    """dequantize_row_iq1_s: uint8 [nb, 50] -> float32 [nb, 256]."""
    nb = b.shape[0]
    d = fp16_value(b[:, :2].copy().view(np.uint16)[:, 0])
    qh = b[:, 34:50].copy().view(np.uint16).astype(np.int64)                 # [nb, 8]
    dl = d[:, None] * (2 * ((qh >> 12) & 7) + 1).astype(F32)
    delta = np.where(qh & 0x8000, -tables()["iq1s_delta"], tables()["iq1s_delta"]).astype(F32)
    idx = b[:, 2:34].astype(np.int64).reshape(nb, 8, 4) | (((qh[:, :, None] >> (3 * np.arange(4))) & 7) << 8)
    grid = _grid_values()[idx]                                               # [nb, 8, 4, 8]
    y = dl[:, :, None, None] * (grid + delta[:, :, None, None])
    return y.reshape(nb, QK_K)


def _grid_values() -> np.ndarray:
    return tables()["iq1s_grid"].view(np.int8).reshape(-1, 8).astype(F32)


# ----------------------------------------------------------------------------- IQ1_M

PAIRS_M = np.triu_indices(17)
MASKS = np.array([0x00, 0x80, 0x08, 0x88], np.int64)
FLIP_K = np.array([3, 2, 1, 0], np.int64)


def _candidates_m(xs, w, sx_sorted_terms, order, v_p, v_m):
    """sumqx[k], sumq2[k] [153, S] for k = (+,+), (+,-), (-,+), (-,-) (candidates in (i1, i2, k) order),
    from per-half prefix sums as quantize_row_iq1_m_impl keeps them."""
    wx_s, w_s = sx_sorted_terms
    S = xs.shape[0]
    half = (order >= 8)
    zero = np.zeros((S, 1), F32)
    px, pw = [], []
    for h in (0, 1):
        m = half == bool(h)
        px.append(np.add.accumulate(np.concatenate([zero, np.where(m, wx_s, F32(0))], axis=1), axis=1).T.copy())
        pw.append(np.add.accumulate(np.concatenate([zero, np.where(m, w_s, F32(0))], axis=1), axis=1).T.copy())
    i1, i2 = PAIRS_M
    cp1, cp2 = v_p[0] * v_p[0] - v_p[1] * v_p[1], v_p[1] * v_p[1] - v_p[2] * v_p[2]
    cm1, cm2 = v_m[0] * v_m[0] - v_m[1] * v_m[1], v_m[1] * v_m[1] - v_m[2] * v_m[2]
    qx_p, qx_m, q2_p, q2_m = [], [], [], []
    for h in (0, 1):
        txs, tws = px[h][-1], pw[h][-1]
        sxh = _rows(px[h], i1) + _rows(px[h], i2)
        qx_p.append(txs * v_p[2] - sxh)
        qx_m.append(txs * v_m[2] - sxh)
        q2_p.append(tws * v_p[2] * v_p[2] + _rows(pw[h] * cp1, i1) + _rows(pw[h] * cp2, i2))
        q2_m.append(tws * v_m[2] * v_m[2] + _rows(pw[h] * cm1, i1) + _rows(pw[h] * cm2, i2))
    qx = [qx_p[0] + qx_p[1], qx_p[0] + qx_m[1], qx_m[0] + qx_p[1], qx_m[0] + qx_m[1]]
    q2 = [q2_p[0] + q2_p[1], q2_p[0] + q2_m[1], q2_m[0] + q2_p[1], q2_m[0] + q2_m[1]]
    return qx, q2


def encode_m(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """float32 [nb, 256] (and importance weights [nb, 256]) -> IQ1_M blocks uint8 [nb, 56]."""
    with np.errstate(all="ignore"):
        return _encode_m(x, qw)


def _minus(k: np.ndarray) -> np.ndarray:
    """Which of a sub-block's 2 groups take x_m, from the shift code k (0: ++, 1: +-, 2: -+, 3: --)."""
    return np.stack([k >= 2, k % 2 == 1], axis=1)


def _encode_m(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    nb = x.shape[0]
    xs, w = _prepare(x, qw, 16)
    S = xs.shape[0]
    x_p, x_m = _shifted(tables()["iq1m_delta"])
    skip = np.abs(xs).max(axis=1) < EPS_M
    order = np.argsort(xs, axis=1, kind="stable")
    terms = (np.take_along_axis(w * xs, order, axis=1), np.take_along_axis(w, order, axis=1))
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(16)[None, :], axis=1)
    qx, q2 = _candidates_m(xs, w, terms, order, x_p, x_m)
    bi, scale = _scan([(qx, q2)], xs.shape[0])
    skip |= bi < 0
    pair, k = np.maximum(bi, 0) // 4, np.maximum(bi, 0) % 4
    L = _levels(rank, PAIRS_M[0][pair], PAIRS_M[1][pair])
    neg = scale < 0
    L = np.where(neg[:, None], 2 - L, L)
    scale = np.where(neg, -scale, scale)
    k = np.where(neg, FLIP_K[k], k)
    vt = _values(tables()["iq1m_delta"])
    gi, scale = _place(L, xs, w, scale, _minus(k), skip, vt, tables()["iq1m_delta"])
    k[skip] = 0
    d, ls, zero = _sub_scales(scale, nb, 16)
    # the super-block scale refit over all 256 values, skipped sub-blocks included
    q = _group_values(gi, _minus(k), vt) * (2 * ls.reshape(-1, 1) + 1).astype(F32)
    wq = w * q
    sumqx = seqsum((wq * xs).reshape(nb, QK_K).T)
    sumq2 = seqsum((wq * q).reshape(nb, QK_K).T)
    d = np.where(sumq2 > 0, sumqx / np.where(sumq2 > 0, sumq2, F32(1)), d)
    s16 = fp16_bits(d * F32(1.1125)).astype(np.int64)
    gi = gi.reshape(nb, 16, 2)
    qh = (gi[:, :, 0] >> 8) | ((gi[:, :, 1] >> 8) << 4) | MASKS[k.reshape(nb, 16)]
    sc = (ls.reshape(nb, 4, 4) << (3 * np.arange(4))).sum(axis=2)
    sc |= np.stack([(s16 & 0xF) << 12, (s16 & 0xF0) << 8, (s16 & 0xF00) << 4, s16 & 0xF000], axis=1)
    sc = np.where(zero[:, None], 0, sc)
    qh = np.where(zero[:, None], (gi[:, :, 0] >> 8) | ((gi[:, :, 1] >> 8) << 4), qh)
    out = np.zeros((nb, 56), np.uint8)
    out[:, :32] = (gi & 255).reshape(nb, 32).astype(np.uint8)
    out[:, 32:48] = qh.astype(np.uint8)
    out[:, 48:56] = sc.astype(np.uint16).view(np.uint8).reshape(nb, 8)
    return out


def decode_m(b: np.ndarray) -> np.ndarray:
    """dequantize_row_iq1_m: uint8 [nb, 56] -> float32 [nb, 256]."""
    nb = b.shape[0]
    sc = b[:, 48:56].copy().view(np.uint16).astype(np.int64)                # [nb, 4]
    u16 = (sc[:, 0] >> 12) | ((sc[:, 1] >> 8) & 0xF0) | ((sc[:, 2] >> 4) & 0xF00) | (sc[:, 3] & 0xF000)
    d = fp16_value(u16.astype(np.uint16))
    j = np.arange(16)
    ls = (sc[:, j // 4] >> (3 * (j % 4))) & 7                                # [nb, 16]
    dl = d[:, None] * (2 * ls + 1).astype(F32)
    qh = b[:, 32:48].astype(np.int64)                                        # [nb, 16]
    hi = np.stack([qh & 7, (qh >> 4) & 7], axis=2)                           # [nb, 16, 2]
    idx = b[:, :32].astype(np.int64).reshape(nb, 16, 2) | (hi << 8)
    delta_bits = np.stack([qh & 0x08, qh & 0x80], axis=2)
    delta = np.where(delta_bits != 0, -tables()["iq1s_delta"], tables()["iq1s_delta"]).astype(F32)
    grid = _grid_values()[idx]                                               # [nb, 16, 2, 8]
    y = dl[:, :, None, None] * (grid + delta[:, :, :, None])
    return y.reshape(nb, QK_K)
