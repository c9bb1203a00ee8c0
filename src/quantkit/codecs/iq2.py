"""llama.cpp's 2-bit lattice types IQ2_XXS, IQ2_XS and IQ2_S: decoders equal to ggml's
dequantize_row_iq2_*, encoders equal to quantize_iq2_* byte for byte (codecs/iq2_lattice.py has
the grids, the neighbour search and the float rules).

A super-block of 256 weights has one fp16 scale d; its sub-blocks (32 weights for IQ2_XXS, 16
for the others) a 4-bit scale l (value d*(0.5+l)/4; IQ2_S stores 0.9875 times the d its l were
rounded against); each group of 8 weights one grid entry and its signs. IQ2_XXS and IQ2_XS keep 7 signs and an even number of
negatives (the weight that matters least is flipped where the count is odd); IQ2_S keeps 8.

The encoder searches, per sub-block, a set of trial scales: each rounds the magnitudes to levels
0..2, takes the grid entry at that point or its best neighbour, and keeps the scale of the best
weighted fit; the winner is refined once. Everything runs over all sub-blocks of a chunk at once:
all trial scales are snapped together (one batched neighbour search), then compared in C's order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import iq2_lattice as lat
from .iq2_lattice import F32

QK = 256
PIECE_GROUPS = 2048      # groups of 8 searched together


@dataclass(frozen=True)
class IQ2Kind:
    name: str
    grid: str              # decode grid in iq2_grids.npz
    grid_size: int
    nwant: int             # neighbour shells (iq2xs_init_impl)
    sub: int               # weights per sub-block scale
    parity: bool           # 7 stored signs, even count of negatives
    eps: float             # GROUP_MAX_EPS of the type
    trials: range          # the `is` of the trial scales
    d_factor: float        # stored super-block scale = d * d_factor


XXS = IQ2Kind("IQ2_XXS", "iq2xxs_grid", 256, 2, 32, True, 1e-15, range(-6, 7), 1.0)
XS = IQ2Kind("IQ2_XS", "iq2xs_grid", 512, 2, 16, True, 1e-15, range(-9, 10), 1.0)
S = IQ2Kind("IQ2_S", "iq2s_grid", 1024, 1, 16, False, 1e-8, range(-9, 10), 0.9875)


# --------------------------------------------------------------------------------------- decode

def _magnitudes(kind: IQ2Kind) -> np.ndarray:
    return lat.tables()[kind.grid].view(np.uint8).reshape(kind.grid_size, 8).astype(F32)


def _signs8(s: np.ndarray) -> np.ndarray:
    """sign bytes [...] -> float32 [..., 8] of +-1 (bit j: element j negative)."""
    return np.where((s[..., None].astype(np.int32) >> np.arange(8)) & 1, F32(-1), F32(1))


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b[:, :2]).view(np.float16).reshape(-1).astype(F32)


def decode(kind: IQ2Kind, b: torch.Tensor) -> torch.Tensor:
    """uint8 [n, type_size] -> float32 [n, 256]: ggml's dequantize_row_iq2_*."""
    b = b.numpy()
    n = b.shape[0]
    d = _f16(b)
    ksigns = lat.tables()["ksigns_iq2xs"]
    if kind is XXS:
        q = np.ascontiguousarray(b[:, 2:66]).view(np.uint32).reshape(n, 8, 2)
        idx = np.ascontiguousarray(q[:, :, 0]).view(np.uint8).reshape(n, 8, 4)
        sig = ksigns[(q[:, :, 1:2] >> (7 * np.arange(4, dtype=np.uint32))) & 127]        # [n, 8, 4]
        ls = (q[:, :, 1] >> 28).astype(F32)                                               # [n, 8]
        db = np.repeat(d[:, None] * (F32(0.5) + ls) * F32(0.25), 4, axis=1)               # per group
        idx, sig = idx.reshape(n, 32), sig.reshape(n, 32)
    else:
        sc = b[:, -8:]
        nib = np.stack([sc & 15, sc >> 4], axis=2).reshape(n, 16).astype(F32)
        db = np.repeat(d[:, None] * (F32(0.5) + nib) * F32(0.25), 2, axis=1)             # [n, 32]
        if kind is XS:
            q = np.ascontiguousarray(b[:, 2:66]).view(np.uint16).reshape(n, 32)
            idx, sig = q & 511, ksigns[q >> 9]
        else:
            qh = b[:, 66:74].astype(np.int64)
            idx = b[:, 2:34].astype(np.int64) | ((np.repeat(qh, 4, axis=1) >> (2 * np.tile(np.arange(4), 8))) & 3) << 8
            sig = b[:, 34:66]
    y = (db[:, :, None] * _magnitudes(kind)[idx]) * _signs8(sig)
    return torch.from_numpy(y.reshape(n, QK).astype(F32, copy=False))


# --------------------------------------------------------------------------------------- encode

def _weights(kind: IQ2Kind, x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """The per-weight importance of quantize_row_iq2_*_impl, x [nb, 256] -> [nb, 256]."""
    sumx2 = lat.seqsum((x * x).T)
    sigma2 = (F32(2) * sumx2 if kind is S else sumx2) / F32(QK)
    if qw is None:
        return F32(0.25) * sigma2[:, None] + x * x
    return qw * np.sqrt(sigma2[:, None] + x * x)


PARITY = (np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1) & 1).astype(bool)


def _signs(kind: IQ2Kind, xg: np.ndarray, wg: np.ndarray):
    """Groups of 8 xg, wg [n, 8] -> (xval [n, 8], sign bits [n]): magnitudes, with the least
    important weight negated where the count of negatives is odd (parity types)."""
    neg = xg < 0
    xval = np.where(xg >= 0, xg, -xg)
    bits = np.packbits(neg, axis=1, bitorder="little")[:, 0].astype(np.int32)
    if kind.parity:
        rows = np.flatnonzero(PARITY[bits])
        xo, wo = xg[rows], wg[rows]
        imin = np.argmin(wo * xo * xo, axis=1)
        xval[rows, imin] = -xval[rows, imin]
        bits[rows] ^= 1 << imin
        bits &= 127
    return xval, bits


def _fit(w: np.ndarray, wx: np.ndarray, L: np.ndarray):
    """sumqx, sumq2 over a sub-block (columns of [m, B]) with q = 2L+1, in C's order."""
    q = F32(2) * L.astype(F32) + F32(1)
    return lat.seqsum(wx * q), lat.seqsum(w * q * q)


def _snap(lt, idv: np.ndarray, scale: np.ndarray, xv: np.ndarray, xg: np.ndarray, wg: np.ndarray,
          tab: np.ndarray | None = None):
    """For each of C trial scales (idv, scale [C, B]) round xv [m, B] at inverse scale idv and
    snap each group of 8 to the grid (the neighbour search at `scale`) -> (levels [C, m, B],
    on-grid [C, m/8, B]). xg, wg: xv and the square-root weights as groups [m/8 * B, 8] (tab:
    their line-search tables, where made already). The queries go to the line search group by
    group, trial scales in increasing order."""
    m, B = xv.shape
    ng, C = m // 8, idv.shape[0]
    lev = lat.rounded_levels(idv[:, None, :], xv[None])
    u = (lev.reshape(C, ng, 8, B) << lat.SHIFTS[None, None, :, None]).sum(axis=2)       # [C, ng, B]
    u = np.ascontiguousarray(u.transpose(1, 2, 0)).reshape(-1)                          # group-major
    gi = lt.kmap[u].astype(np.int64)
    on = gi >= 0
    off = np.flatnonzero(~on)
    if off.size:
        g = off // C
        c = off - g * C
        sc = scale[c, g % B] if scale.shape[0] == C else scale[0, g % B]
        if lt.count.mean() > lat.LINE:
            gi[off] = lat.line_search(lt).search(-lt.kmap[u[off]].astype(np.int64) - 1, g, sc, xg, wg, runs=True,
                                                  tab=tab)
        else:
            gi[off] = lat.best_neighbour(lt, u[off], sc, np.take(xg, g, axis=0), np.take(wg, g, axis=0))
    lev = lt.levels[gi].reshape(ng, B, C, 8).transpose(2, 0, 3, 1).reshape(C, m, B)
    return lev, on.reshape(ng, B, C).transpose(2, 0, 1)


def _search(kind: IQ2Kind, xv: np.ndarray, w: np.ndarray, mx: np.ndarray, scale: np.ndarray):
    """The scale search of one sub-block per column: xv, w [m, B], mx [B] (> eps), scale [B]
    the starting scale -> (scale [B], grid index [m/8, B]); mx is C's `max` (IQ2_XS/S) or
    `eff_max` (IQ2_XXS). All trial scales are snapped at once, then compared in C's order."""
    m, B = xv.shape
    ng = m // 8
    lt = lat.lattice(kind.grid_size, kind.nwant)
    wx = w * xv
    grp = lambda a: np.ascontiguousarray(a.reshape(ng, 8, B).transpose(0, 2, 1)).reshape(ng * B, 8)  # noqa: E731
    xg, wg = grp(xv), grp(np.sqrt(w))
    nums = np.array([F32(5) + F32(s) * F32(0.1) for s in kind.trials], dtype=F32)
    idv = nums[:, None] / mx[None, :]
    tab = lat.line_search(lt).tables(xg, wg) if lt.count.mean() > lat.LINE else None
    levs, ons = _snap(lt, idv, F32(1) / idv, xv, xg, wg, tab)
    best = np.zeros(B, F32)
    L = np.zeros((m, B), np.uint8)
    on = np.ones((ng, B), bool)
    ridv, rsnap = np.zeros((ng, B), F32), np.zeros((ng, B), F32)   # where each group's levels were rounded
    for c, (lev, on_s) in enumerate(zip(levs, ons)):
        sumqx, sumq2 = _fit(w, wx, lev)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        if better.any():
            scale = np.where(better, sumqx / np.where(better, sumq2, F32(1)), scale)
            best = np.where(better, scale * sumqx, best)
            L = np.where(better, lev, L)
            on = np.where(better, on_s, on)
            ridv = np.where(better, idv[c], ridv)
            rsnap = np.where(better, F32(1) / idv[c], rsnap)
    redo = scale > 0
    if kind is not XXS:
        redo &= ~on.all(axis=0)
    if redo.any():
        cols = np.nonzero(redo)[0]
        sc = scale[cols]
        sub = lambda a: a.reshape(ng, B, 8)[:, cols].reshape(-1, 8)                           # noqa: E731
        lev = _snap(lt, (F32(1) / sc)[None], sc[None], xv[:, cols], sub(xg), sub(wg),
                    None if tab is None else tab.reshape(ng, B, -1)[:, cols].reshape(ng * len(cols), -1))[0][0]
        kept = on[:, cols] if kind is not XXS else np.zeros((ng, len(cols)), bool)
        if kind is not XXS:              # groups found on the grid keep the winning trial's levels
            keep = np.repeat(on[:, cols], 8, axis=0)
            lev = np.where(keep, L[:, cols], lev)
        ridv[:, cols] = np.where(kept, ridv[:, cols], (F32(1) / sc)[None])
        rsnap[:, cols] = np.where(kept, rsnap[:, cols], sc[None])
        L[:, cols] = lev
        sumqx, sumq2 = _fit(w[:, cols], wx[:, cols], lev)
        scale[cols] = np.where(sumq2 > 0, sumqx / np.where(sumq2 > 0, sumq2, F32(1)), sc)
    u = (L.reshape(ng, 8, B).astype(np.int32) << lat.SHIFTS[None, :, None]).sum(axis=1)
    return scale, lt.kmap[u], ridv, rsnap


def encode(kind: IQ2Kind, x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """float32 [nb, 256] (qw: importance weights [nb, 256] or [256], or None for IQ2_S) ->
    uint8 [nb, type_size]: quantize_iq2_*'s bytes. Overflow to inf (huge inputs) is part of the
    C's arithmetic too, so numpy's warnings about it are off."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return _encode(kind, x, qw)


# The steps follow quantize_row_iq2_*_impl in order; splitting them would scatter the C's flow.
def encode_rounding(kind: IQ2Kind, x: torch.Tensor, qw: torch.Tensor | None):
    """`encode`'s bytes and, per group of 8 (in order within the super-block), the inverse scale
    and the snapping scale its levels were rounded at (float32 [nb, 32] each; 0 where the
    sub-block was below the type's eps)."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return _encode(kind, x, qw, rounding=True)


def _encode(kind: IQ2Kind, x: torch.Tensor, qw: torch.Tensor | None, rounding: bool = False):
    x = np.ascontiguousarray(x.numpy(), dtype=F32)
    nb = x.shape[0]
    qwn = None if qw is None else np.broadcast_to(np.asarray(qw.numpy(), dtype=F32), x.shape)
    w = _weights(kind, x, qwn)
    ng = nb * 32
    xval, bits = _signs(kind, x.reshape(ng, 8), w.reshape(ng, 8))
    m = kind.sub
    ns = QK // m
    # sub-block-major columns: [m, nb*ns]
    cols = lambda a: a.reshape(nb * ns, m).T                                   # noqa: E731
    xv, wv = np.ascontiguousarray(cols(xval)), np.ascontiguousarray(cols(w))
    mx = xv.max(axis=0)
    live = mx >= F32(kind.eps)
    if kind is XXS:
        start = np.zeros(nb * ns, F32)
        if live.any():
            start[live] = lat.make_qp_quants(xv[:, live], wv[:, live], 4)
        mx = start * F32(3)
        live &= mx > 0
    else:
        start = mx / F32(5)
    scale = np.zeros(nb * ns, F32)
    gidx = np.zeros((m // 8, nb * ns), np.int64)
    ridv, rsnap = np.zeros((m // 8, nb * ns), F32), np.zeros((m // 8, nb * ns), F32)
    cols = np.flatnonzero(live)
    long = lat.lattice(kind.grid_size, kind.nwant).count.mean() > lat.LINE
    step = PIECE_GROUPS // (m // 8) if long else max(1, len(cols))
    for c0 in range(0, len(cols), step):     # pieces whose line-search tables stay small (2.7 MB)
        c = cols[c0:c0 + step]
        scale[c], gidx[:, c], ridv[:, c], rsnap[:, c] = _search(kind, xv[:, c], wv[:, c], mx[c], start[c])
    gsign = bits.reshape(nb * ns, m // 8).T.copy()                           # [m/8, nb*ns]
    flip = scale < 0
    if flip.any():
        scale = np.abs(scale)
        gsign[:, flip] = ~gsign[:, flip] & (127 if kind.parity else 255)
    gsign[:, ~live] = 0
    gidx[:, ~live] = 0
    scales = scale.reshape(nb, ns)
    max_scale = scales.max(axis=1)
    d = max_scale / F32(31)
    dh = np.where(max_scale > 0, d * F32(kind.d_factor), F32(0)).astype(np.float16)
    idv = F32(1) / np.where(max_scale > 0, d, F32(1))
    ls = np.clip(lat.nearest_int(F32(0.5) * (idv[:, None] * scales - F32(1))), 0, 15)
    ls = np.where(max_scale[:, None] > 0, ls, 0).astype(np.uint32)
    gi = gidx.T.reshape(nb, 32)                       # group order within the super-block
    sg = gsign.T.reshape(nb, 32).astype(np.uint32)
    out = pack(kind, dh, gi, sg, ls, max_scale == 0)
    if not rounding:
        return torch.from_numpy(out)
    return torch.from_numpy(out), ridv.T.reshape(nb, 32), rsnap.T.reshape(nb, 32)


def pack(kind: IQ2Kind, dh: np.ndarray, gi: np.ndarray, sg: np.ndarray, ls: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """The blocks of nb super-blocks: fp16 scales dh [nb], grid indices and sign bits [nb, 32]
    (group order), sub-block scales ls uint32 [nb, 8 or 16]; zero [nb]: blocks whose max scale is
    0 (IQ2_XXS, IQ2_XS store no codes there)."""
    nb = gi.shape[0]
    sg = sg.astype(np.uint32)
    out = np.zeros((nb, {XXS: 66, XS: 74, S: 82}[kind]), np.uint8)
    out[:, :2] = dh.astype(np.float16).reshape(nb, 1).view(np.uint8)
    if kind is XXS:
        g4, s4 = gi.reshape(nb, 8, 4).astype(np.uint32), sg.reshape(nb, 8, 4)
        q = np.zeros((nb, 8, 2), np.uint32)
        q[:, :, 0] = (g4 << (8 * np.arange(4, dtype=np.uint32))).sum(axis=2, dtype=np.uint32)
        q[:, :, 1] = (s4 << (7 * np.arange(4, dtype=np.uint32))).sum(axis=2, dtype=np.uint32) | (ls << 28)
        q[zero] = 0
        out[:, 2:] = q.reshape(nb, 16).view(np.uint8)
        return out
    packed_ls = (ls[:, 0::2] | (ls[:, 1::2] << 4)).astype(np.uint8)
    if kind is XS:
        q = (gi | (sg.astype(np.int64) << 9)).astype(np.uint16)
        q[zero] = 0
        out[:, 2:66] = q.view(np.uint8)
    else:                                 # IQ2_S keeps its codes even where every scale is 0
        out[:, 2:34] = gi & 255
        out[:, 34:66] = sg
        hi = (gi >> 8).reshape(nb, 8, 4) << (2 * np.arange(4))
        out[:, 66:74] = hi.sum(axis=2)
    out[:, -8:] = packed_ls
    return out


# ------------------------------------------------------------------------------------- GPTQ grid
# As IQ3_S's grid (codecs/iq3.py): a super-block's scales from the encoder's own search on the
# partially updated weights (unweighted: llama.cpp's default weights, all-ones importance for the
# types that need one; with `search`, the columns' importance as the imatrix), then every group
# of 8 columns takes one grid entry plus signs from its updated weights (`round_group`): without
# `search` by the encoder's rule at the scale the encoder rounded that group at (an identity
# Hessian gives llama.cpp's bytes); with it at the stored scale, the neighbour search and the
# parity flip weighted by [(U_bᵀ U_b)^-1]_cc, U_b the group's block of the inverse Hessian's factor.

@dataclass(frozen=True)
class IQ2Params:
    """One super-block per row: fp16 d [rows], sub-block scales ls uint32 [rows, ns], their
    decoded scales db [rows, ns], the encoder's rounding scales ridv, rsnap [rows, 32] and
    sigma2 [rows] (its weights' spread term)."""
    dh: np.ndarray
    ls: np.ndarray
    db: np.ndarray
    ridv: np.ndarray
    rsnap: np.ndarray
    sigma2: np.ndarray


class IQ2Blocks:
    """A weight stored as an IQ2 type: the blocks' bytes uint8 [out, in/256 * type_size]."""

    def __init__(self, kind: IQ2Kind, b: torch.Tensor, in_features: int):
        self.kind, self.b, self.in_features = kind, b, in_features
        self.name = kind.name.lower()

    def to_bytes(self) -> torch.Tensor:
        return self.b

    def split_rows(self, rows: list[int]) -> list["IQ2Blocks"]:
        return [IQ2Blocks(self.kind, p, self.in_features) for p in self.b.split(rows)]

    def dequantize(self) -> torch.Tensor:
        rows = self.b.shape[0]
        with np.errstate(all="ignore"):
            y = decode(self.kind, self.b.reshape(-1, self.b.shape[1] * QK // self.in_features))
        return y.reshape(rows, self.in_features)


class IQ2Grid:
    """GPTQ's view of IQ2_XXS / IQ2_XS / IQ2_S: super-blocks of 256, groups of 8 columns."""

    codes_dtype = None
    width = QK
    group_width = 8

    def __init__(self, kind: IQ2Kind, in_features: int, search: bool = False):
        if in_features % QK:
            raise ValueError(f"{kind.name.lower()} needs rows that are a multiple of {QK}, got {in_features}")
        self.kind, self.in_features, self.search = kind, in_features, search
        self.lat = lat.lattice(kind.grid_size, kind.nwant)
        self.mag = _magnitudes(kind)

    def params(self, w: torch.Tensor, imp: torch.Tensor | None = None) -> IQ2Params:
        x = w.float().contiguous()
        if not torch.isfinite(x).all():
            raise ValueError("weights contain NaN or Inf")
        if self.search and imp is not None:
            qw = imp.float().clamp_min(0)
        else:
            qw = None if self.kind is S else torch.ones(QK)
        b, ridv, rsnap = encode_rounding(self.kind, x, qw)
        b = b.numpy()
        d = _f16(b)
        if self.kind is XXS:
            ls = np.ascontiguousarray(b[:, 2:66]).view(np.uint32).reshape(-1, 8, 2)[:, :, 1] >> 28
        else:
            sc = b[:, -8:]
            ls = np.stack([sc & 15, sc >> 4], axis=2).reshape(-1, 16).astype(np.uint32)
        db = d[:, None] * (F32(0.5) + ls.astype(F32)) * F32(0.25)
        xn = x.numpy()
        sumx2 = lat.seqsum((xn * xn).T)
        sigma2 = (F32(2) * sumx2 if self.kind is S else sumx2) / F32(QK)
        return IQ2Params(d, ls, db, ridv, rsnap, sigma2)

    def round_group(self, w: torch.Tensor, p: IQ2Params, j0: int, hinv: torch.Tensor):
        """Columns j0..j0+7 (within the super-block) of rows w [rows, 8] -> (codes, values),
        float32 [rows, 8]; code = 2 * grid index + sign bit."""
        kind, g, sb = self.kind, j0 // 8, j0 // self.kind.sub
        x = np.ascontiguousarray(w.float().numpy(), dtype=F32)
        db = p.db[:, sb]
        with np.errstate(all="ignore"):
            if self.search:
                ub = hinv.double()
                wc = torch.linalg.inv(ub.t() @ ub).diagonal().float().numpy().astype(F32)
                wt = np.broadcast_to(wc[None, :], x.shape)
                xval, bits = _signs(kind, x, wt)
                dead = ~(db > 0)
                # every grid entry at the stored scale: the magnitudes are not exactly odd
                # multiples of one step, so rounding at a scale would miss the nearest entry
                m = torch.from_numpy(self.mag)
                dbt = torch.from_numpy(np.where(dead, F32(0), db))
                cost = dbt[:, None] ** 2 * ((m * m) @ torch.from_numpy(wc))[None, :]
                cost -= 2 * dbt[:, None] * (torch.from_numpy(xval * wc[None, :]) @ m.t())
                gi = cost.argmin(dim=1).numpy().astype(np.int64)
                return self._finish(gi, bits, dead, db)
            else:
                s2 = p.sigma2[:, None]
                wt = F32(0.25) * s2 + x * x if kind is S else np.sqrt(s2 + x * x)
                xval, bits = _signs(kind, x, wt)
                idv, snap, wg = p.ridv[:, g], p.rsnap[:, g], np.sqrt(wt)
                dead = ~(db > 0) | ~(snap > 0)
            idv, snap = np.where(dead, F32(1), idv), np.where(dead, F32(1), snap)
            lev = lat.rounded_levels(idv[:, None], xval)
            u = (lev.astype(np.int32) << lat.SHIFTS[None, :]).sum(axis=1)
            gi = self.lat.kmap[u].astype(np.int64)
            off = np.flatnonzero(gi < 0)
            if off.size:
                gi[off] = lat.best_neighbour(self.lat, u[off], snap[off], xval[off], wg[off])
        return self._finish(gi, bits, dead, db)

    def _finish(self, gi, bits, dead, db):
        """(codes, values) of the chosen entries gi [rows] and sign bits [rows]."""
        kind = self.kind
        gi[dead] = 0
        bits = np.where(dead, 0, bits)
        full = lat.tables()["ksigns_iq2xs"][bits] if kind.parity else bits
        neg = ((full[:, None].astype(np.int32) >> np.arange(8)) & 1).astype(F32)
        vals = (db[:, None] * self.mag[gi]) * np.where(neg > 0, F32(-1), F32(1))
        codes = (2 * gi[:, None]).astype(F32) + neg
        return torch.from_numpy(codes), torch.from_numpy(vals)

    def round(self, w, p, j):
        raise NotImplementedError(f"{self.kind.name} rounds groups of 8 columns together (round_group)")

    def stored(self, params: list[IQ2Params], codes: torch.Tensor) -> IQ2Blocks:
        rows, nb = codes.shape[0], len(params)
        c = codes.numpy().astype(np.int64).reshape(rows * nb, 32, 8)
        gi = c[:, :, 0] >> 1
        sg = ((c & 1) << np.arange(8)).sum(axis=2)
        if self.kind.parity:
            sg &= 127
        dh = np.stack([p.dh for p in params], axis=1).reshape(-1)
        ls = np.stack([p.ls for p in params], axis=1).reshape(rows * nb, -1)
        b = pack(self.kind, dh, gi, sg, ls, ~(dh != 0))
        return IQ2Blocks(self.kind, torch.from_numpy(b.reshape(rows, -1)), self.in_features)

    def join(self, pieces: list[IQ2Blocks], codes, shape) -> IQ2Blocks:
        return IQ2Blocks(self.kind, torch.cat([p.b for p in pieces]), shape[1])
