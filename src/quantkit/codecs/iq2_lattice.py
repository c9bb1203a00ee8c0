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

from .lattice import F32, LineSearch, Padded, nearest_int, pad_lists, padded_search, seqsum

__all__ = ["F32", "KMAP_SIZE", "LEVEL_VALUES", "Lattice", "SHIFTS", "best_neighbour", "lattice", "make_qp_quants",
           "line_search", "nearest_int", "padded_lists", "rounded_levels", "seqsum", "tables"]

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
    entries are searched padded (`padded_search`), longer ones by the line search
    (codecs/lattice.py `LineSearch`: two gathers per entry instead of eight, after a table per query)."""
    rows = -lat.kmap[u].astype(np.int64) - 1
    if lat.count.mean() > LONG:
        return line_search(lat).search(rows, np.arange(len(u)), scale, xval, w)
    return padded_search(padded_lists(len(lat.levels), lat.nwant), rows, scale, xval, w, LEVEL_VALUES, c_rule=False)


LONG = 20                # queries one per group: only IQ2_XS's lists (30 entries on average) pay for a table
LINE = 12                # the encoder's queries, a group's trial scales sharing its table: IQ2_XXS (18) too


@lru_cache(maxsize=None)
def _line_search(grid_size: int, nwant: int) -> LineSearch:
    return LineSearch(padded_lists(grid_size, nwant), LEVEL_VALUES, c_rule=False)


def line_search(lat: Lattice) -> LineSearch:
    """The line search (codecs/lattice.py) over lat's neighbour lists, rows indexed as kmap's."""
    return _line_search(len(lat.levels), lat.nwant)


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
