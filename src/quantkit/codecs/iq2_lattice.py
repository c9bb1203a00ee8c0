"""The lattice of llama.cpp's 2-bit IQ types (IQ2_XXS, IQ2_XS, IQ2_S) and the parts of their
quantizers' float arithmetic no other type uses, bit-exact in numpy float32 (the neighbour
search, nearest_int and C-order sums are codecs/lattice.py's, shared with IQ3 and IQ1).

Each type stores groups of 8 weights as one entry of a grid (256, 512 or 1024 points of
{1, 3, 5}^8, given as 2-bit level indices by `kgrid_2bit_*`) plus 8 (or 7 and a parity) signs.
The data (codecs/data/iq2_grids.npz, see its README) is ggml's; what llama.cpp builds from it at
`ggml_quantize_init` (iq2xs_init_impl) is built here at first use and cached (`lattice`): the map
from a point of levels 0..2 to its grid entry, and for each point off the grid its neighbour
list, the grid entries in its `nwant` nearest distance shells ordered by (distance, index).

The arithmetic follows the C expression by expression in float32 (each op rounds once; the
library is built without fused multiply-adds or reassociation); sums run in C's order, element
0 first, never a pairwise reduction (`seqsum`); ggml's `nearest_int` is emulated exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np
import torch

from .lattice import F32, Padded, nearest_int, pad_lists, padded_search, seqsum

__all__ = ["F32", "KMAP_SIZE", "LEVEL_VALUES", "Lattice", "SHIFTS", "best_neighbour", "lattice", "make_qp_quants",
           "nearest_int", "padded_lists", "rounded_levels", "seqsum", "tables"]

KMAP_SIZE = 43692                  # llama.cpp's kmap_size: points are sum(l_i << 2i)
SHIFTS = (2 * np.arange(8)).astype(np.int32)


@lru_cache(maxsize=1)
def tables() -> dict[str, np.ndarray]:
    """The arrays of iq2_grids.npz (ggml's tables)."""
    with resources.files("quantkit.codecs").joinpath("data/iq2_grids.npz").open("rb") as f:
        with np.load(f) as z:
            return {k: z[k] for k in z.files}


@dataclass(frozen=True)
class Lattice:
    levels: np.ndarray     # uint8 [G, 8]: each grid entry's levels 0..2 (value 2l+1)
    kmap: np.ndarray       # int32 [KMAP_SIZE]: grid index, or -(r+1) for neighbour row r
    start: np.ndarray      # int64 [R]: row r's neighbours are flat[start[r]:start[r]+count[r]]
    count: np.ndarray      # int64 [R]
    flat: np.ndarray       # int64 [sum(count)]: grid indices
    codes: np.ndarray      # int64 [8, sum(count)]: 3*i + level_i of each listed entry
    nwant: int


@lru_cache(maxsize=None)
def lattice(grid_size: int, nwant: int) -> Lattice:
    """iq2xs_init_impl for a grid of `grid_size` entries and neighbour lists of `nwant` shells,
    over the 3^8 points the quantizers can look up (levels 0..2; the C builds lists for
    points with level 3 too, which no quantizer ever reaches)."""
    kg = tables()[f"kgrid_2bit_{grid_size}"].astype(np.int64)
    levels = ((kg[:, None] >> SHIFTS) & 3).astype(np.uint8)
    kmap = np.full(KMAP_SIZE, -1, dtype=np.int32)
    kmap[kg] = np.arange(grid_size, dtype=np.int32)
    pts = (np.arange(3 ** 8)[:, None] // 3 ** np.arange(8)) % 3             # [6561, 8]
    u = (pts << SHIFTS).sum(axis=1)
    off = kmap[u] < 0
    pts, u = pts[off], u[off]
    d2 = ((pts[:, None, :] - levels[None].astype(np.int64)) ** 2).sum(axis=2)   # squared distance / 4
    order = np.argsort(d2, axis=1, kind="stable")                            # by distance, then index
    sd2 = np.take_along_axis(d2, order, axis=1)
    shell = np.concatenate([np.zeros((len(u), 1), np.int64), np.cumsum(np.diff(sd2, axis=1) > 0, axis=1)], axis=1)
    count = (shell < nwant).sum(axis=1)
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    flat = order[shell < nwant]                                              # row-major: row by row
    kmap[u] = -(np.arange(len(u), dtype=np.int32) + 1)
    codes = 3 * np.arange(8)[:, None] + levels[flat].T.astype(np.int64)
    return Lattice(levels, kmap, start, count, flat, codes, nwant)


LEVEL_VALUES = np.array([1, 3, 5], F32)      # the value 2l+1 of level l


@lru_cache(maxsize=None)
def padded_lists(grid_size: int, nwant: int) -> Padded:
    """lattice(grid_size, nwant)'s neighbour lists padded by width (codecs/lattice.py), by row."""
    lat = lattice(grid_size, nwant)
    return pad_lists(lat.flat, lat.start, lat.count, lat.levels, 3)


def best_neighbour(lat: Lattice, u: np.ndarray, scale: np.ndarray, xval: np.ndarray, w: np.ndarray) -> np.ndarray:
    """iq2_find_best_neighbour for Q points off the grid at once: u [Q] (kmap[u] < 0), scale [Q],
    xval and w (the square-root weights) [Q, 8] -> grid index [Q]: the first entry of u's list
    with the smallest d2 = sum_i w_i*(scale*q_i - x_i)^2, summed in float32 in C's order
    (where every sum is NaN, C asserts and this takes the first entry). Lists averaging up to LONG
    entries are searched padded (`padded_search`), longer ones by shared points
    (`_shared_point_search`, faster where many queries land on each long list)."""
    if lat.count.mean() > LONG:
        return _shared_point_search(lat, u, scale, xval, w)
    rows = -lat.kmap[u].astype(np.int64) - 1
    return padded_search(padded_lists(len(lat.levels), lat.nwant), rows, scale, xval, w, LEVEL_VALUES, c_rule=False)


LONG = 20
def _terms(scale: np.ndarray, xval: np.ndarray, w: np.ndarray) -> np.ndarray:
    """w*diff*diff (diff = scale*q - x) for each position i and level l: float32 [Q, 24] at 3i+l,
    the very terms iq2_find_best_neighbour sums."""
    t = np.empty((len(scale), 8, 3), dtype=F32)
    for lev in range(3):
        diff = scale[:, None] * F32(2 * lev + 1) - xval
        t[:, :, lev] = w * diff * diff
    return t.reshape(-1, 24)


def _exact_first_min(lat: Lattice, terms: np.ndarray, pos: np.ndarray, cnt: np.ndarray) -> np.ndarray:
    """For query k, candidates lat.flat[pos[seg_k]] (segments of cnt, in list order): the first
    with the smallest d2, each d2 summed in float32 in C's order -> grid index [Q]."""
    n, offs = int(cnt.sum()), np.cumsum(cnt) - cnt
    base = np.repeat(np.arange(len(cnt), dtype=np.int64) * 24, cnt)
    tflat = terms.reshape(-1)
    d2 = tflat[base + lat.codes[0][pos]]
    for i in range(1, 8):
        d2 += tflat[base + lat.codes[i][pos]]
    low = np.fmin.reduceat(d2, offs)                     # a NaN sum never wins, as in C
    first = np.minimum.reduceat(np.where(d2 == np.repeat(low, cnt), np.arange(n), n), offs)
    first = np.where(first < n, first, offs)             # all NaN: C asserts; here the first entry
    return lat.flat[pos[first]]


def _ranges(start: np.ndarray, cnt: np.ndarray) -> np.ndarray:
    """The concatenation of arange(start_k, start_k + cnt_k)."""
    offs = np.cumsum(cnt) - cnt
    return np.arange(int(cnt.sum()), dtype=np.int64) + np.repeat(start - offs, cnt)


MIN_SHARED = 8        # fewer queries sharing a point: the exact ragged search is cheaper
SLACK = 1 + 2.0 ** -16
PAD = 1e30            # sum of a padding column: never the smallest of a finite row
BATCH = 1 << 21       # entries of one batched product
WASTE = 1.5           # its padding, at most


def _batches(m: np.ndarray, nb: np.ndarray) -> list[np.ndarray]:
    """Groups (m queries sharing a point with nb neighbours), sorted by (nb, m), cut into
    batches whose padded product [k, max m, max nb] stays within BATCH entries and within
    WASTE times the entries it needs."""
    order = np.lexsort((m, nb))
    out, cur, mx, nx, real = [], [], 0, 0, 0
    for g, mg, ng in zip(order.tolist(), m[order].tolist(), nb[order].tolist()):
        mx2, nx2 = max(mx, mg), max(nx, ng)
        padded = (len(cur) + 1) * mx2 * nx2
        if cur and (padded > BATCH or padded > WASTE * (real + mg * ng)):
            out.append(np.array(cur))
            cur, mx2, nx2, real = [], mg, ng, 0
        cur.append(g)
        mx, nx, real = mx2, nx2, real + mg * ng
    if cur:
        out.append(np.array(cur))
    return out


def _scored(lat: Lattice, ts: torch.Tensor, starts: np.ndarray, m: np.ndarray, rows: np.ndarray,
            low: torch.Tensor, at: torch.Tensor, near: torch.Tensor) -> None:
    """Score one batch of groups: group g's queries are ts[starts[g]:starts[g]+m[g]] (terms with
    a trailing column of ones), its neighbour row rows[g]. Writes each query's smallest sum, its
    position in the list and the count of sums within SLACK of it into low, at, near."""
    k, mx, nbs = len(m), int(m.max()), lat.count[rows]
    nx = int(nbs.max())
    qi = np.minimum(np.arange(mx)[None, :], (m - 1)[:, None]) + starts[:, None]            # [k, mx]
    oh = np.zeros((k, 25, nx), np.float32)
    b = np.repeat(np.arange(k), nbs)
    j = _ranges(np.zeros(k, np.int64), nbs)
    oh[b[None, :], lat.codes[:, _ranges(lat.start[rows], nbs)], j[None, :]] = 1
    oh[:, 24, :] = np.where(np.arange(nx)[None, :] < nbs[:, None], 0, PAD)
    A = torch.bmm(ts[torch.from_numpy(qi.reshape(-1))].view(k, mx, 25), torch.from_numpy(oh))
    lo, ix = A.min(dim=2)
    nr = (A <= lo[:, :, None] * SLACK).sum(dim=2)
    valid = torch.from_numpy((np.arange(mx)[None, :] < m[:, None]).reshape(-1))
    dest = torch.from_numpy(qi.reshape(-1))[valid]
    low[dest], at[dest], near[dest] = lo.reshape(-1)[valid], ix.reshape(-1)[valid], nr.reshape(-1)[valid]


def _shared_point_search(lat: Lattice, u: np.ndarray, scale: np.ndarray, xval: np.ndarray, w: np.ndarray) -> np.ndarray:
    """`best_neighbour` for lists averaging over LONG entries: queries sharing a point are scored
    together as matrix products (terms @ one-hot levels, many points per batched product). Their
    sums round differently from C's, but both are within 32 ulps of the exact sum of the same
    non-negative float32 terms: a query with one entry within SLACK of its smallest is decided;
    the others (near ties, non-finite terms) and the points shared by few queries are summed
    exactly in C's order (`_exact_first_min`)."""
    terms = _terms(scale, xval, w)
    row = -lat.kmap[u].astype(np.int64) - 1
    order = np.argsort(row, kind="stable")
    rs = row[order]
    cut = np.flatnonzero(np.diff(rs)) + 1
    starts, ends = np.concatenate([[0], cut]), np.concatenate([cut, [len(rs)]]).astype(np.int64)
    grow = rs[starts]
    big = ((ends - starts) >= MIN_SHARED) & (lat.count[grow] > 1)
    ts = torch.from_numpy(np.concatenate([terms[order], np.ones((len(u), 1), F32)], axis=1))
    low = torch.full((len(u),), float("nan"), dtype=torch.float32)
    at = torch.zeros(len(u), dtype=torch.int64)
    near = torch.zeros(len(u), dtype=torch.int64)
    bs, bm, br = starts[big], (ends - starts)[big], grow[big]
    for g in _batches(bm, lat.count[br]):                   # torch: one thread, as set by the caller
        _scored(lat, ts, bs[g], bm[g], br[g], low, at, near)
    out = np.empty(len(u), np.int64)
    out[order] = lat.flat[lat.start[rs] + at.numpy()]
    decided = ((near.numpy() == 1) & (low.numpy() < PAD / 2)) | (lat.count[rs] == 1)
    exact = order[~decided]
    if exact.size:
        cnt = lat.count[row[exact]]
        out[exact] = _exact_first_min(lat, terms[exact], _ranges(lat.start[row[exact]], cnt), cnt)
    return out


def rounded_levels(idv: np.ndarray, xval: np.ndarray) -> np.ndarray:
    """MAX(0, MIN(kMaxQ-1, nearest_int(0.5f*(id*xval-1)))) with kMaxQ = 3; idv broadcasts."""
    return np.clip(nearest_int(F32(0.5) * (idv * xval - F32(1))), 0, 2)


def make_qp_quants(x: np.ndarray, w: np.ndarray, nmax: int) -> np.ndarray:
    """make_qp_quants(n, nmax, x, L, w) over the columns of x, w [n, B]: the returned scale [B]
    (L, a uint8 array in C, wraps modulo 256 where a level is negative)."""
    mx = np.maximum(x.max(axis=0), F32(0))
    zero = mx < F32(1e-15)
    mx = np.where(zero, F32(1), mx)
    fn = F32(nmax)
    iscale = fn / mx
    L = (nearest_int(iscale * x) & 0xFF).astype(F32)
    scale = F32(1) / iscale
    diff = x - scale * L
    best = seqsum(w * diff * diff)
    for s in (-4, -3, -2, -1, 1, 2, 3, 4):
        isc = (F32(0.1) * F32(s) + fn) / mx
        l_ = np.minimum(nearest_int(isc * x), nmax).astype(F32)
        diff = x - (F32(1) / isc) * l_
        mse = seqsum(w * diff * diff)
        better = mse < best
        best = np.where(better, mse, best)
        iscale = np.where(better, isc, iscale)
    li = np.minimum(nearest_int(iscale * x), nmax)
    lf = li.astype(F32)
    wx = w * x
    sumlx = seqsum(wx * lf)
    suml2 = seqsum(w * lf * lf)
    L = (li & 0xFF).astype(F32)                      # what C's uint8_t L holds
    for _ in range(5):
        changed = False
        for i in range(x.shape[0]):
            wi, xi, Li = w[i], x[i], L[i]
            slx = sumlx - wx[i] * Li
            sl2 = suml2 - wi * Li * Li
            ok = (slx > 0) & (sl2 > 0)
            new_l = np.minimum(nearest_int(xi * sl2 / np.where(ok, slx, F32(1))), nmax)
            ok &= new_l != Li.astype(np.int32)
            nf = new_l.astype(F32)
            slx = slx + wx[i] * nf
            sl2 = sl2 + wi * nf * nf
            ok &= slx * slx * suml2 > sumlx * sumlx * sl2
            if ok.any():
                changed = True
                L[i] = np.where(ok, (new_l & 0xFF).astype(F32), Li)
                sumlx = np.where(ok, slx, sumlx)
                suml2 = np.where(ok, sl2, suml2)
        if not changed:
            break
    out = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, F32(1)), F32(0))
    return np.where(zero, F32(0), out)
