"""What llama.cpp's lattice quantizers share: the IQ3_XXS, IQ3_S, IQ1_S and IQ1_M grids and the
neighbour lists llama.cpp builds at init, the float arithmetic that makes quantkit's bytes equal
to its own, and the searches of the neighbour lists for the entry nearest a scaled group: ragged
(`neighbours` + `first_min`, for IQ3's lists of 5-7 entries), padded to a few widths
(`padded_search`, for IQ1's lists and IQ2_S's) and by line evaluation (`LineSearch`, for IQ2_XXS's
and IQ2_XS's long lists; codecs/iq2_lattice.py builds IQ2's lists).

The grids are data (data/iq3_iq1_grids.npz, read out of ggml-common.h and ggml-quants.c by
data/make_iq3_iq1_tables.py). A grid lists points of n levels each (n = 4 for IQ3, 8 for IQ1),
element i of a point at level l standing for the odd integer 2l+1. A vector of levels whose code
u = sum(l_i << bits*i) is not on the grid is moved to one of its neighbours: every grid point at
one of the `nwant` smallest squared distances from it, listed by (distance, grid index) as
iq3xs_init_impl / iq2xs_init_impl do. Those lists are computed here at first use (a fraction
of a second) and kept for the process.

Exactness rules, as in codecs/kquant_scales.py: every float op is one float32 op (numpy
ufuncs), sums run in C's order (`seqsum`: element 0, then 1, ...), ggml's nearest_int of a
small argument is round-half-even (`nearest_int` keeps its bit trick), and "the first best wins" is an argmin/argmax
over candidates in C's order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

F32 = np.float32
QK_K = 256
FLT_MAX = np.finfo(np.float32).max
FLT_MAX_BITS = int(np.array(FLT_MAX, np.float32).view(np.int32))
TOO_LARGE = ("values too large for llama.cpp's lattice quantizers (their sums overflow float32 and "
             "llama.cpp aborts); scale the tensor down")
TABLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "iq3_iq1_grids.npz")


@lru_cache(maxsize=1)
def tables() -> dict[str, np.ndarray]:
    with np.load(TABLES) as z:
        return {k: z[k] for k in z.files}


def seqsum(rows) -> np.ndarray:
    """`float s = 0; for (i...) s += rows[i];` over the first axis of a float32 array (or a list
    of equal-shape arrays), in C's order."""
    s = rows[0] + F32(0)
    for r in rows[1:]:
        s += r
    return s


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int bit for bit (add 1.5*2^23, keep the mantissa), also outside its
    asserted range |v| < 2^22: float32 -> int32."""
    t = np.asarray(v, dtype=F32) + F32(12582912.0)
    return (t.view(np.int32) & 0x7FFFFF) - 0x400000


def fp16_bits(v: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16 (round to nearest even) of float32 v: the uint16 bits."""
    return np.asarray(v, dtype=F32).astype(np.float16).view(np.uint16)


def fp16_value(bits: np.ndarray) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint16).view(np.float16).astype(F32)


@dataclass(frozen=True)
class Lattice:
    """One grid: `levels` int8 [G, n] (0..7 or 0..2), `pos` float32 [G, n] (2l+1) and its
    transpose `pos_t` [n, G], `index`
    int32 [2**(bits*n)]: the grid index of code u, or -1; and the neighbour lists of the codes
    off the grid, flattened: code u's are `flat[start[u]:start[u] + count[u]]`."""

    n: int
    bits: int
    levels: np.ndarray
    pos: np.ndarray
    pos_t: np.ndarray
    index: np.ndarray
    start: np.ndarray
    count: np.ndarray
    flat: np.ndarray
    name: str = ""

    def code(self, L: np.ndarray) -> np.ndarray:
        """Levels [n, ...] (any numeric dtype holding small non-negative integers) -> codes
        int64 [...]: sum(l_i << bits*i)."""
        u = L[0].astype(np.int64)
        for i in range(1, self.n):
            u |= L[i].astype(np.int64) << (self.bits * i)
        return u


def build_lattice(kgrid: np.ndarray, n: int, bits: int, nlev: int, nwant: int, name: str = "") -> Lattice:
    """iq3xs_init_impl / iq2xs_init_impl for the codes reachable from levels 0..nlev-1."""
    shifts = bits * np.arange(n)
    levels = ((kgrid[:, None].astype(np.int64) >> shifts) & ((1 << bits) - 1)).astype(np.int8)
    pos = (2 * levels.astype(np.int64) + 1)
    index = np.full(1 << (bits * n), -1, dtype=np.int32)
    index[kgrid.astype(np.int64)] = np.arange(len(kgrid), dtype=np.int32)
    digits = (np.arange(nlev ** n)[:, None] // nlev ** np.arange(n)) % nlev     # every level vector
    codes = (digits << shifts).sum(axis=1)
    off = index[codes] < 0
    codes, p = codes[off], 2 * digits[off] + 1
    d2 = (p * p).sum(1)[:, None] + (pos * pos).sum(1)[None, :] - 2 * (p @ pos.T)
    start = np.zeros(len(index), dtype=np.int64)
    count = np.zeros(len(index), dtype=np.int64)
    flat = []
    total = 0
    for u, row in zip(codes, d2):
        keep = np.unique(row)[:nwant][-1]             # the nwant smallest distinct distances
        cand = np.flatnonzero(row <= keep)
        cand = cand[np.lexsort((cand, row[cand]))]     # by (distance, index), as qsort leaves them
        start[u], count[u] = total, len(cand)
        flat.append(cand)
        total += len(cand)
    return Lattice(n, bits, levels, pos.astype(F32), np.ascontiguousarray(pos.T, dtype=F32), index, start, count,
                   np.concatenate(flat).astype(np.int32), name)


@lru_cache(maxsize=None)
def lattice(name: str) -> Lattice:
    """"iq3xxs" (256 points, 2 nearest distances), "iq3s" (512, 3), "iq1s" (2048, 3)."""
    t = tables()
    if name == "iq3xxs":
        return build_lattice(t["kgrid_iq3xxs"], 4, 3, 8, 2, name)
    if name == "iq3s":
        return build_lattice(t["kgrid_iq3s"], 4, 3, 8, 3, name)
    if name == "iq1s":
        return build_lattice(t["kgrid_iq1s"], 8, 2, 3, 3, name)
    raise KeyError(name)


def neighbours(lat: Lattice, u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For M off-grid codes u: (which [C]: the query each candidate belongs to, cand [C]: grid
    indices, first [M]: where each query's candidates start), candidates in llama.cpp's order."""
    cnt = lat.count[u]
    first = np.zeros(len(u), dtype=np.int64)
    np.cumsum(cnt[:-1], out=first[1:])
    which = np.repeat(np.arange(len(u)), cnt)
    base = np.repeat(lat.start[u] - first, cnt)
    base += np.arange(len(which))
    return which, lat.flat[base], first


def first_min(d2: np.ndarray, which: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Per query, the position (into the candidate arrays) of the first candidate with the
    smallest d2 >= 0 (`if (d2 < best) ...` from best = FLT_MAX: NaN never wins). Where no candidate
    is below FLT_MAX (values so large that the distances overflow) llama.cpp aborts: ValueError.
    One reduction over keys (bits of d2, position): non-negative floats order as their bits."""
    key = d2.view(np.int32).astype(np.int64) << 32
    key |= np.arange(len(d2))
    m = np.minimum.reduceat(key, first)
    if not ((m >> 32) < FLT_MAX_BITS).all():
        raise ValueError(TOO_LARGE)
    return m & 0xFFFFFFFF


def check_scales(scale: np.ndarray) -> None:
    """llama.cpp's GGML_ASSERT(scale >= 0): a NaN scale (from sums that overflowed) aborts it."""
    if not (scale >= 0).all():
        raise ValueError(TOO_LARGE)


# ------------------------------------------------------------------------- padded neighbour search
# The search over neighbour lists as dense arrays: each list padded to the next of a few widths
# (powers of 2), the queries of one width scored together as [m, n, W] gathers from a table of
# per-query terms. A query's terms are w_i*(scale*v_l - x_i)^2 for each element i and level l,
# the very float32 products the C loops add; a candidate's distance is its n terms added in
# element order from 0, so every sum equals C's. Padding entries read a term of +inf.

WIDTHS = (4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
SLOTS = 1 << 17          # candidate slots (m * W) scored per step: the gathers stay in L2


@dataclass(frozen=True)
class Padded:
    """Neighbour lists by width: list r is row `rowpos[r]` of the tables of width
    `widths[bucket[r]]`; `codes[k]` int32 [n, R_k, W]: i*nlev + level_i of each entry (padding:
    n*nlev, the +inf term), `grid[k]` int32 [R_k, W]: the entries' grid indices (padding: 0)."""

    n: int
    nlev: int
    bucket: np.ndarray
    rowpos: np.ndarray
    widths: tuple
    codes: tuple
    grid: tuple


def pad_lists(flat: np.ndarray, start: np.ndarray, count: np.ndarray, levels: np.ndarray, nlev: int) -> Padded:
    """The lists flat[start[r]:start[r] + count[r]] (grid indices; count 0: no list) of a grid whose
    entry g has levels[g] [n] in 0..nlev-1, padded by width."""
    n = levels.shape[1]
    bucket = np.full(len(count), -1, np.int8)
    rowpos = np.zeros(len(count), np.int64)
    widths, codes, grid = [], [], []
    lo = 0
    for W in WIDTHS:
        rs = np.flatnonzero((count > lo) & (count <= W))
        lo = W
        if not rs.size:
            continue
        bucket[rs], rowpos[rs] = len(widths), np.arange(len(rs))
        j = np.arange(W)
        valid = j[None, :] < count[rs][:, None]
        g = np.where(valid, flat[start[rs][:, None] + np.minimum(j[None, :], count[rs][:, None] - 1)], 0)
        c = np.arange(n)[:, None, None] * nlev + levels[g].transpose(2, 0, 1).astype(np.int64)   # [n, R, W]
        widths.append(W)
        codes.append(np.ascontiguousarray(np.where(valid[None], c, n * nlev).astype(np.int32)))
        grid.append(g.astype(np.int32))
    if (count > lo).any():
        raise ValueError("a neighbour list longer than the widest padding")
    return Padded(n, nlev, bucket, rowpos, tuple(widths), tuple(codes), tuple(grid))


def _terms(scale: np.ndarray, xt: np.ndarray, wt: np.ndarray, values: np.ndarray) -> np.ndarray:
    """float32 [n*nlev + 1, m]: (w_i*diff)*diff, diff = scale*v_l - x_i, in row i*nlev + l; the
    last row +inf. xt, wt: [n, m]; values: [nlev] for every query or [nlev, m]."""
    n, m = xt.shape
    nlev = values.shape[0]
    sv = (values[:, None] if values.ndim == 1 else values) * scale[None, :]          # [nlev, m]
    out = np.empty((n * nlev + 1, m), F32)
    t = out[:-1].reshape(n, nlev, m)
    np.subtract(sv[None], xt[:, None, :], out=t)
    d = t * wt[:, None, :]
    t *= d
    out[-1] = np.inf
    return out


def padded_search(pd: Padded, rows: np.ndarray, scale: np.ndarray, xg: np.ndarray, wg: np.ndarray,
                  values: np.ndarray, c_rule: bool = True) -> np.ndarray:
    """For M queries (list rows [M], scale [M], xval and weights xg, wg [M, n], level values
    [nlev] or [M, nlev]) the grid index [M] of the first list entry with the smallest
    d2 = sum_i w_i*(scale*v_i - x_i)^2, summed in float32 in C's order.

    c_rule: llama.cpp's `if (d2 < best)` from best = FLT_MAX; no entry below FLT_MAX (sums that
    overflow) is its assertion: ValueError. Otherwise NaN sums never win and a query with
    nothing else takes its first entry."""
    out = np.empty(len(rows), np.int64)
    b = pd.bucket[rows]
    order = np.argsort(b, kind="stable")
    ends = np.cumsum(np.bincount(b, minlength=len(pd.widths)))
    for k, W in enumerate(pd.widths):
        sel = order[(ends[k - 1] if k else 0):ends[k]]
        step = max(1, SLOTS // W)
        for s0 in range(0, len(sel), step):
            out[sel[s0:s0 + step]] = _scored(pd, k, rows, scale, xg, wg, values, sel[s0:s0 + step], c_rule)
    return out


def _scored(pd: Padded, k: int, rows, scale, xg, wg, values, q, c_rule: bool) -> np.ndarray:
    """padded_search for the queries q, all of width widths[k]."""
    m, W = len(q), pd.widths[k]
    pr = pd.rowpos[rows[q]]
    tq = _terms(scale[q], np.take(xg, q, axis=0).T, np.take(wg, q, axis=0).T,
                values if values.ndim == 1 else np.take(values, q, axis=0).T)
    idx = np.take(pd.codes[k], pr, axis=1)                                   # [n, m, W]
    idx *= m
    idx += np.arange(m, dtype=np.int32)[:, None]
    g = np.take(tq.reshape(-1), idx)
    d2 = g[0] + g[1]
    for i in range(2, pd.n):
        d2 += g[i]
    if c_rule:
        key = np.where(d2 < FLT_MAX, d2, F32(np.inf))
    else:
        key = np.where(np.isnan(d2), F32(np.inf), d2)
    j = np.argmin(key, axis=1)
    if c_rule and not (np.take_along_axis(key, j[:, None], axis=1) < np.inf).all():
        raise ValueError(TOO_LARGE)
    return np.take(pd.grid[k].reshape(-1), pr * W + j)


@lru_cache(maxsize=None)
def padded(name: str) -> Padded:
    """The neighbour lists of `lattice(name)` padded by width, rows indexed by code."""
    lat = lattice(name)
    return pad_lists(lat.flat, lat.start, lat.count, lat.levels, 8 if name.startswith("iq3") else 3)


# ------------------------------------------------------------------------- line neighbour search
# The search as line evaluations: for a group with square-root weights a and magnitudes x, the
# distance of grid point j at scale s is d2_j = s*(s*A_j - B2_j) + C with A_j = sum_i a_i p_ji^2,
# B2_j = 2 sum_i a_i x_i p_ji and C = sum_i a_i x_i^2 the same for every j, so the nearest entry
# of a list is the least v_j = s*A_j - B2_j. A and B2 split over the two halves of a point's
# elements, each half's sums tabled per group for every level combination (nlev^(n/2) entries,
# A + i*B2 as complex64), so a query (a group at a trial scale) costs two gathers and a few ops
# per list entry whatever its scale. These v are not C's sums: a query is decided when its least
# v leads every other by more than both roundings can move them (TOL times the sizes involved;
# the bound needs values in float32's normal range, so groups with tiny, huge or non-finite
# values are never decided here). The rest are scored exactly in C's order (`padded_search`).

TOL = 2.0 ** -15         # 2^-15 * (s^2 A + C): over 4x what C's sums and v can be rounded by
LO, HI = 2.0 ** -60, 2.0 ** 60


class LineSearch:
    """The line search over one grid's neighbour lists (`pd`, padded by width) whose points take
    level values `values` [nlev]; `c_rule` is the exact search's rule for what it leaves."""

    def __init__(self, pd: Padded, values: np.ndarray, c_rule: bool):
        n, nlev = pd.n, pd.nlev
        self.h = n // 2
        self.H = nlev ** self.h
        H = self.H
        self.pd, self.values, self.c_rule = pd, np.asarray(values, F32), c_rule
        self.pmax = F32(self.values.max())
        self.ramp = np.arange(128, dtype=np.int8)
        offs = []
        for c in pd.codes:
            pad = c[0] == n * nlev
            lev = c - (np.arange(n) * nlev)[:, None, None]
            lo = sum(lev[i].astype(np.int64) * nlev ** i for i in range(self.h))
            hi = sum(lev[i].astype(np.int64) * nlev ** (i - self.h) for i in range(self.h, n))
            offs.append(np.ascontiguousarray(np.stack([np.where(pad, H, lo), np.where(pad, 2 * H + 1, H + 1 + hi)])
                                             .transpose(0, 2, 1).astype(np.int32)))       # [2, W, R]
        self.offs = tuple(offs)
        self.grid_t = tuple(np.ascontiguousarray(g.T) for g in pd.grid)                  # [W, R]

    def tables(self, x: np.ndarray, a: np.ndarray) -> np.ndarray:
        """complex64 [G, 2H+2]: per group, A + i*B2 of every level combination of the first half
        (then +inf, the padding's) and of the second half (then 0)."""
        G, n = x.shape
        p = self.values
        t = np.empty((G, n, len(p)), np.complex64)
        t.real = a[:, :, None] * (p * p)
        t.imag = (F32(2) * (a * x))[:, :, None] * p
        out = np.empty((G, 2 * self.H + 2), np.complex64)
        for half, c0 in ((range(self.h), 0), (range(self.h, n), self.H + 1)):
            acc = t[:, half[0]]
            for i in half[1:-1]:
                acc = (t[:, i][:, :, None] + acc[:, None, :]).reshape(G, -1)
            np.add(t[:, half[-1]][:, :, None], acc[:, None, :], out=out[:, c0:c0 + self.H].reshape(G, len(p), -1))
        out[:, self.H] = np.inf
        out[:, 2 * self.H + 1] = 0
        return out

    def search(self, rows: np.ndarray, grp: np.ndarray, scale: np.ndarray, x: np.ndarray, a: np.ndarray,
               runs: bool = False, tab: np.ndarray | None = None) -> np.ndarray:
        """For Q queries (list rows [Q], group grp [Q], scale [Q]) of groups with magnitudes x and
        square-root weights a [G, n] (their `tables`, when made already): the grid index [Q] of the
        first list entry with the smallest d2, as the C loop finds it.

        runs: the queries come group by group, a group's trial scales in increasing order. A run
        of queries with the same group and list is then scored by bisection: the v_j(s) are lines
        in s, so an entry that wins at both ends of a stretch wins between them, and its lead over
        the rest (the least of lines minus a line: concave in s) is no smaller there while the
        tolerance (convex in s) is no larger than at the ends."""
        Q = len(rows)
        out = np.zeros(Q, np.int64)
        if not Q:
            return out
        tab = (self.tables(x, a) if tab is None else tab).reshape(-1)
        tol = self._tolerance(grp, scale, x, a)
        gap = np.full(Q, np.nan, F32)
        if runs:
            new = np.ones(Q, bool)
            new[1:] = (rows[1:] != rows[:-1]) | (grp[1:] != grp[:-1])
            lo = np.flatnonzero(new)
            hi = np.append(lo[1:], Q) - 1
            edge = new.copy()
            edge[hi] = True
            todo = np.flatnonzero(edge)
            wlo, whi = [], []                                # stretches decided whole
            while True:
                out[todo], gap[todo] = self._scan(tab, rows[todo], grp[todo], scale[todo])
                t2 = F32(2) * np.maximum(tol[lo], tol[hi])
                whole = (gap[lo] > t2) & (gap[hi] > t2) & (out[lo] == out[hi])
                wlo.append(lo[whole])
                whi.append(hi[whole])
                split = ~whole & (hi - lo > 1)
                lo, hi = lo[split], hi[split]
                if not lo.size:
                    break
                mid = (lo + hi) // 2
                todo = mid
                lo, hi = np.concatenate([lo, mid]), np.concatenate([mid, hi])
            fill = np.bincount(np.concatenate(wlo) + 1, minlength=Q + 1)
            fill -= np.bincount(np.concatenate(whi), minlength=Q + 1)
            inner = np.cumsum(fill[:Q]) > 0                  # strictly inside a stretch decided whole
            src = np.flatnonzero(inner)
            if src.size:                                     # its winner: the stretch's first end's
                first = np.maximum.accumulate(np.where(~inner, np.arange(Q), 0))
                out[src] = out[first[src]]
                gap[src] = np.inf
        else:
            out, gap = self._scan(tab, rows, grp, scale)
        left = np.flatnonzero(~(gap > tol))
        if left.size:
            out[left] = padded_search(self.pd, rows[left], scale[left], np.take(x, grp[left], axis=0),
                                      np.take(a, grp[left], axis=0), self.values, self.c_rule)
        return out

    def _tolerance(self, grp, scale, x, a) -> np.ndarray:
        """Per query, the margin (in units of v) that decides it; NaN where nothing may be decided."""
        with np.errstate(all="ignore"):
            xa = np.abs(x)
            ax = a * xa
            asum, bsum, csum = a.sum(axis=1), ax.sum(axis=1), (ax * xa).sum(axis=1)
            ok = (((a == 0) | ((a >= LO) & (a <= HI))) & ((xa == 0) | ((xa >= LO) & (xa <= HI)))).all(axis=1)
            s = scale
            z = s * (s * (self.pmax * self.pmax * asum[grp]) + F32(2) * self.pmax * bsum[grp]) + csum[grp]
            good = ok[grp] & (s >= F32(2.0 ** -30)) & (s <= F32(2.0 ** 30))
            good &= (z >= F32(2.0 ** -90)) & (z <= F32(2.0 ** 100))
            return np.where(good, F32(TOL) * z / s, F32(np.nan)).astype(F32)

    def _scan(self, tab, rows, grp, scale) -> tuple[np.ndarray, np.ndarray]:
        """Per query, the entry of least v (grid index; any of them where several tie) and its lead
        over the next least (0 for ties, NaN where v is). Entry-major [W, m]: each step a pass."""
        out = np.empty(len(rows), np.int64)
        gap = np.empty(len(rows), F32)
        pd = self.pd
        b = pd.bucket[rows]
        order = np.argsort(b, kind="stable")
        ends = np.cumsum(np.bincount(b, minlength=len(pd.widths)))
        base = grp.astype(np.int32) * np.int32(2 * self.H + 2)
        for k, W in enumerate(pd.widths):
            sel = order[(ends[k - 1] if k else 0):ends[k]]
            if not sel.size:
                continue
            pr = pd.rowpos[rows[sel]]
            ix = np.take(self.offs[k], pr, axis=2)                             # [2, W, m]
            ix += base[sel]
            ab = np.take(tab, ix)
            ab[0] += ab[1]
            v = ab[0].real * scale[sel]
            v -= ab[0].imag
            low = np.minimum.reduce(v, axis=0)
            hit = v == low
            cnt = np.add.reduce(hit, axis=0, dtype=np.int16)
            v[hit] = np.inf
            gap[sel] = np.where(cnt == 1, np.minimum.reduce(v, axis=0) - low, F32(0))
            if W < 128:
                h8 = hit.view(np.int8)
                h8 *= self.ramp[:W, None]
                j = np.add.reduce(h8, axis=0, dtype=np.int32)
            else:
                j = np.argmax(hit, axis=0)
            np.minimum(j, W - 1, out=j)
            out[sel] = np.take(self.grid_t[k].reshape(-1), j * self.grid_t[k].shape[1] + pr)
        return out, gap
