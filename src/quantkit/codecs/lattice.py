"""What llama.cpp's lattice quantizers (IQ3_XXS, IQ3_S, IQ1_S, IQ1_M) share: their grids, the
neighbour lists llama.cpp builds at init, and the float arithmetic that makes quantkit's bytes
equal to its own.

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

    def code(self, L: np.ndarray) -> np.ndarray:
        """Levels [n, ...] (any numeric dtype holding small non-negative integers) -> codes
        int64 [...]: sum(l_i << bits*i)."""
        u = L[0].astype(np.int64)
        for i in range(1, self.n):
            u |= L[i].astype(np.int64) << (self.bits * i)
        return u


def build_lattice(kgrid: np.ndarray, n: int, bits: int, nlev: int, nwant: int) -> Lattice:
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
                   np.concatenate(flat).astype(np.int32))


@lru_cache(maxsize=None)
def lattice(name: str) -> Lattice:
    """"iq3xxs" (256 points, 2 nearest distances), "iq3s" (512, 3), "iq1s" (2048, 3)."""
    t = tables()
    if name == "iq3xxs":
        return build_lattice(t["kgrid_iq3xxs"], 4, 3, 8, 2)
    if name == "iq3s":
        return build_lattice(t["kgrid_iq3s"], 4, 3, 8, 3)
    if name == "iq1s":
        return build_lattice(t["kgrid_iq1s"], 8, 2, 3, 3)
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
