"""llama.cpp's IQ3_XXS and IQ3_S in vectorised numpy, byte for byte.

A super-block of 256 holds 8 sub-blocks of 32, each 8 groups of 4 magnitudes that take one
point of a 3-bit lattice (256 points for IQ3_XXS, 512 for IQ3_S; codecs/lattice.py) plus signs,
and a 4-bit sub-block scale under an fp16 super-block scale. `encode(x, qw)` reproduces
ggml-quants.c's quantize_row_iq3_xxs_impl / quantize_row_iq3_s_impl (qw: importance weights, or
None for quantize_row_*_ref); `decode` reproduces dequantize_row_iq3_xxs / _s.

The C code walks one sub-block at a time; here every step runs over all sub-blocks of a chunk
at once, in float32 op by op as the C writes it: the 31 (IQ3_XXS) or 19 (IQ3_S) candidate
scales in turn, the neighbour search of every group off the grid (a ragged search over the
lattice's neighbour lists), the sums in element order, the refit and the 4-bit scales from
max_scale/31. IQ3_XXS stores 7 sign bits per 8 values and makes their parity even by flipping
the sign of the least important value; IQ3_S stores 8. quantize_row_iq3_s_impl skips an all-zero
sub-block without moving its qs/signs pointers, so the next sub-block's grid indices and signs
land in its place: reproduced (`_compact`).
"""

from __future__ import annotations

import numpy as np
import torch

from .lattice import (F32, QK_K, Lattice, check_scales, first_min, fp16_bits, fp16_value, lattice, nearest_int,
                      neighbours, seqsum, tables)

KMAXQ = 8
EPS_XXS = F32(1e-8)        # GROUP_MAX_EPS_IQ3_XXS


def _levels(idv: np.ndarray, xval: np.ndarray) -> np.ndarray:
    """MAX(0, MIN(7, nearest_int(0.5f*(id*xval - 1)))) as float32 [32, S]."""
    t = idv * xval
    t -= F32(1)
    t *= F32(0.5)
    return np.clip(nearest_int(t), 0, KMAXQ - 1).astype(F32)


def _groups(a: np.ndarray) -> np.ndarray:
    """[32, S] -> [8*S, 4]: group k of sub-block s in row k*S + s, its 4 values contiguous."""
    S = a.shape[1]
    return np.ascontiguousarray(a.reshape(8, 4, S).transpose(0, 2, 1)).reshape(8 * S, 4)


def _snap(lat: Lattice, L: np.ndarray, xg: np.ndarray, wg: np.ndarray, scale: np.ndarray,
          redo: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Move every group of 4 levels of L [32, S] that is off the grid to its best neighbour
    (iq3_find_best_neighbour, weighted by waux, at `scale` [S]), in place; xg, wg: xval and waux
    by groups (`_groups`). Only the groups in `redo` [8, S] are looked at when given.
    -> (grid index [8, S], was it on the grid [8, S])."""
    S = L.shape[1]
    u = lat.code(L.reshape(8, 4, S).transpose(1, 0, 2))
    gi = lat.index[u]
    off = gi < 0
    if redo is not None:
        off &= redo
    kk, ss = np.nonzero(off)
    if len(kk):
        which, cand, first = neighbours(lat, u[kk, ss])
        rows = (kk * S + ss)[which]
        diff = np.take(scale, ss)[which][:, None] * np.take(lat.pos, cand, axis=0)   # np.take: fast row gathers
        diff -= np.take(xg, rows, axis=0)
        t = np.take(wg, rows, axis=0) * diff
        t *= diff
        d2 = t[:, 0] + t[:, 1]
        d2 += t[:, 2]
        d2 += t[:, 3]
        best = cand[first_min(d2, which, first)]
        lev = np.take(lat.levels, best, axis=0)
        for i in range(4):
            L[kk * 4 + i, ss] = lev[:, i]
        gi[kk, ss] = best
    return gi, ~off


def _wsum(w: np.ndarray, wx: np.ndarray, L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sumqx = sum(w*xval*q), sumq2 = sum(w*q*q) with q = 2L+1, in element order."""
    q = F32(2) * L + F32(1)
    return seqsum(wx * q), seqsum(w * q * q)


def _search(xval, w, waux, mx, lat: Lattice, n_is: int, xxs: bool):
    """The scale search of one sub-block of 32, for all S at once -> (scale [S], grid index [8, S])."""
    S = xval.shape[1]
    wx = w * xval
    best = np.zeros(S, F32)
    scale = mx / F32(2 * KMAXQ - 1)
    ridv, rsnap = np.zeros((8, S), F32), np.zeros((8, S), F32)   # where each group's levels were rounded
    L = np.zeros((32, S), F32)
    on = np.full((8, S), xxs)
    xg, wg = _groups(xval), _groups(waux)
    for is_ in range(-n_is, n_is + 1):
        idv = (F32(2 * KMAXQ - 1) + F32(is_) * F32(0.2)) / mx
        Laux = _levels(idv, xval)
        _, on_aux = _snap(lat, Laux, xg, wg, F32(1) / idv)
        sumqx, sumq2 = _wsum(w, wx, Laux)
        upd = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        if upd.any():
            scale = np.where(upd, sumqx / np.where(upd, sumq2, F32(1)), scale)
            best = np.where(upd, scale * sumqx, best)
            L[:, upd] = Laux[:, upd]
            ridv = np.where(upd[None], idv[None], ridv)
            rsnap = np.where(upd[None], (F32(1) / idv)[None], rsnap)
            on[:, upd] = on_aux[:, upd]
    need = np.flatnonzero((~on).any(axis=0) & (scale > 0))
    if len(need):                      # refit the groups off the grid at the best scale
        sc = scale[need]
        Lr = _levels(F32(1) / sc, xval[:, need])
        redo = None if not xxs else ~on[:, need]
        _snap(lat, Lr, _groups(xval[:, need]), _groups(waux[:, need]), sc, redo)
        keep = np.ones((8, len(need)), bool) if redo is None else redo
        L[:, need] = np.where(np.repeat(keep, 4, axis=0), Lr, L[:, need])
        ridv[:, need] = np.where(keep, (F32(1) / sc)[None], ridv[:, need])
        rsnap[:, need] = np.where(keep, sc[None], rsnap[:, need])
        sumqx, sumq2 = _wsum(w[:, need], wx[:, need], L[:, need])
        scale[need] = np.where(sumq2 > 0, sumqx / np.where(sumq2 > 0, sumq2, F32(1)), sc)
    gi = lat.index[lat.code(L.reshape(8, 4, S).transpose(1, 0, 2))]
    return scale, gi, ridv, rsnap


def _prepare(x: np.ndarray, qw: np.ndarray | None):
    """x [nb, 256] -> sub-block columns xs [32, S], the weights and waux [32, S] (S = 8 nb)."""
    nb = x.shape[0]
    sumx2 = seqsum((x * x).T)
    sigma2 = F32(2) * sumx2 / F32(QK_K)
    xs = np.ascontiguousarray(x.reshape(-1, 32).T)
    if qw is not None:
        s2 = np.repeat(sigma2, 8)
        w = np.ascontiguousarray(qw.reshape(-1, 32).T) * np.sqrt(s2 + xs * xs)
    else:
        w = xs * xs
    return nb, xs, w, np.sqrt(w)


def _signs(xs: np.ndarray, w: np.ndarray, xxs: bool):
    """xval = |x| and the sign bits per group of 8 (uint8 [4, S]); IQ3_XXS keeps the number of
    negative signs even by flipping the value with the smallest w*x*x."""
    neg = ~(xs >= 0)
    xval = np.where(neg, -xs, xs)
    n8 = neg.reshape(4, 8, -1)
    bits = (n8.astype(np.int32) << np.arange(8)[None, :, None]).sum(axis=1)
    if xxs:
        odd = (n8.sum(axis=1) % 2).astype(bool)
        kk, ss = np.nonzero(odd)
        if len(kk):
            wxx = (w * xs * xs).reshape(4, 8, -1)[kk, :, ss]
            imin = np.argmin(wxx, axis=1)
            rows = 8 * kk + imin
            xval[rows, ss] = -xval[rows, ss]
            bits[kk, ss] ^= 1 << imin
        bits &= 127
    return xval, bits


def encode(x: np.ndarray, qw: np.ndarray | None, xxs: bool) -> np.ndarray:
    """float32 [nb, 256] (and importance weights [nb, 256]) -> IQ3_XXS / IQ3_S blocks. Inf and
    NaN in intermediates (values past 1e19, whose squares overflow) follow the C's IEEE path."""
    with np.errstate(all="ignore"):
        return _encode(x, qw, xxs)


def encode_rounding(x: np.ndarray, qw: np.ndarray | None, xxs: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IQ3_XXS / IQ3_S blocks of x [nb, 256] as `encode` makes them, and per group of 4 (in
    order) the inverse scale and the snapping scale its kept levels were rounded at (float32
    [nb, 64] each): rounding the signed magnitudes at them (nearest_int(0.5*(idv*xval - 1)),
    off-grid groups moved to their best neighbour at the snapping scale, weighted by sqrt of the
    encoder's weights) gives back the encoder's grid points."""
    with np.errstate(all="ignore"):
        return _encode(x, qw, xxs, rounding=True)


def _encode(x: np.ndarray, qw: np.ndarray | None, xxs: bool, rounding: bool = False):
    nb, xs, w, waux = _prepare(x, qw)
    xval, sbits = _signs(xs, w, xxs)
    mx = xval.max(axis=0)
    skip = mx < EPS_XXS if xxs else ~(mx != 0)
    lat = lattice("iq3xxs" if xxs else "iq3s")
    scale, gi, ridv, rsnap = _search(xval, w, waux, np.where(skip, F32(1), mx), lat, 15 if xxs else 9, xxs)
    neg = scale < 0
    scale = np.where(neg, -scale, scale)
    sbits = np.where(neg[None, :], ~sbits & (127 if xxs else 255), sbits)
    scale[skip] = 0
    check_scales(scale)
    gi[:, skip] = 0
    sbits[:, skip] = 0
    max_scale = scale.reshape(nb, 8).max(axis=1)
    d = max_scale / F32(31)
    zero = ~(max_scale != 0)
    dbits = fp16_bits(d * F32(1.0125 if xxs else 1.033))
    idv = np.repeat(F32(1) / d, 8)
    ls = np.clip(nearest_int(F32(0.5) * (idv * scale - F32(1))), 0, 15)
    ls = np.where(np.repeat(zero, 8), 0, ls).astype(np.int64).reshape(nb, 8)
    gi = gi.T.reshape(nb, 8, 8)
    sbits = sbits.T.reshape(nb, 8, 4).astype(np.int64)
    dbits = np.where(zero, 0, dbits).astype(np.uint16)
    if xxs:
        out = _pack_xxs(nb, dbits, gi, sbits, ls, zero)
    else:
        out = _pack_s(nb, dbits, gi, sbits, ls, skip.reshape(nb, 8))
    return (out, ridv.T.reshape(nb, 64), rsnap.T.reshape(nb, 64)) if rounding else out


def _pack_xxs(nb, dbits, gi, sbits, ls, zero) -> np.ndarray:
    out = np.zeros((nb, 98), np.uint8)
    out[:, :2] = dbits.reshape(nb, 1).view(np.uint8)
    word = sbits[..., 0] | (sbits[..., 1] << 7) | (sbits[..., 2] << 14) | (sbits[..., 3] << 21) | (ls << 28)
    out[:, 2:66] = gi.reshape(nb, 64).astype(np.uint8)
    out[:, 66:98] = word.astype(np.uint32).view(np.uint8).reshape(nb, 32)
    out[zero] = 0
    return out


def _compact(a: np.ndarray, skip: np.ndarray) -> np.ndarray:
    """a [nb, 8, k] per sub-block: the skipped sub-blocks' entries removed and the rest moved
    forward, zeros at the end (where the C's unmoved pointers leave them)."""
    if not skip.any():
        return a
    order = np.argsort(skip, axis=1, kind="stable")
    out = np.take_along_axis(a, order[:, :, None], axis=1)
    out[np.take_along_axis(skip, order, axis=1)] = 0
    return out


def _pack_s(nb, dbits, gi, sbits, ls, skip) -> np.ndarray:
    out = np.zeros((nb, 110), np.uint8)
    out[:, :2] = dbits.reshape(nb, 1).view(np.uint8)
    out[:, 2:66] = _compact(gi & 255, skip).reshape(nb, 64).astype(np.uint8)
    out[:, 66:74] = ((gi >> 8) << np.arange(8)).sum(axis=2).astype(np.uint8)
    out[:, 74:106] = _compact(sbits, skip).reshape(nb, 32).astype(np.uint8)
    out[:, 106:110] = (ls[:, 0::2] | (ls[:, 1::2] << 4)).astype(np.uint8)
    return out


# ----------------------------------------------------------------------------- decoding

def _grid_values(name: str) -> np.ndarray:
    """The decoder's grid as float32 [G, 4]."""
    return tables()[name].view(np.uint8).reshape(-1, 4).astype(F32)


def _sign_factors(bits: np.ndarray) -> np.ndarray:
    """sign bytes [..] -> float32 [.., 8] of +-1 (bit j: value j negative)."""
    b = (bits[..., None].astype(np.int64) >> np.arange(8)) & 1
    return np.where(b == 1, F32(-1), F32(1))


def decode_xxs(b: np.ndarray) -> np.ndarray:
    """dequantize_row_iq3_xxs: uint8 [nb, 98] -> float32 [nb, 256]."""
    nb = b.shape[0]
    d = fp16_value(b[:, :2].copy().view(np.uint16)[:, 0])
    words = b[:, 66:98].copy().view(np.uint32).astype(np.int64)             # [nb, 8]
    db = d[:, None] * (F32(0.5) + (words >> 28).astype(F32)) * F32(0.5)
    signs = tables()["ksigns_iq2xs"][(words[:, :, None] >> (7 * np.arange(4))) & 127]   # [nb, 8, 4]
    grid = _grid_values("iq3xxs_grid")[b[:, 2:66].astype(np.int64)].reshape(nb, 8, 4, 8)
    y = db[:, :, None, None] * grid * _sign_factors(signs)
    return y.reshape(nb, QK_K)


def decode_s(b: np.ndarray) -> np.ndarray:
    """dequantize_row_iq3_s: uint8 [nb, 110] -> float32 [nb, 256]."""
    nb = b.shape[0]
    d = fp16_value(b[:, :2].copy().view(np.uint16)[:, 0])
    sc = b[:, 106:110].astype(np.int64)
    s8 = np.stack([sc & 15, sc >> 4], axis=2).reshape(nb, 8)
    db = d[:, None] * (1 + 2 * s8).astype(F32)
    hi = (b[:, 66:74, None].astype(np.int64) >> np.arange(8)) & 1                 # [nb, 8, 8]
    idx = b[:, 2:66].astype(np.int64).reshape(nb, 8, 8) | (hi << 8)
    grid = _grid_values("iq3s_grid")[idx].reshape(nb, 8, 4, 8)
    signs = b[:, 74:106].reshape(nb, 8, 4)
    y = db[:, :, None, None] * grid * _sign_factors(signs)
    return y.reshape(nb, QK_K)


# ----------------------------------------------------------------------------- GPTQ grid
# GPTQ (quant.gptq) reaches a super-block of 256 columns: its fp16 scale and eight 4-bit
# sub-block scales come from the encoder's own search on the partially updated weights
# (unweighted, or with `search` weighted by each column's importance as llama.cpp weights by an
# imatrix). Then each group of columns (IQ3_S: 4, one grid point; IQ3_XXS: 8, two points under
# one sign byte of even parity) takes its points plus signs together (`round_group`), from the
# group's updated weights. Without `search`: the encoder's rule at the scale the encoder rounded
# that group at (an identity Hessian gives llama.cpp's bytes). With it: every grid point scored
# at the stored scale under a per-column weight [(U_bᵀ U_b)^-1]_cc, U_b the group's block of the
# inverse Hessian's factor (the diagonal of the quadratic form GPTQ's loss puts on the group's
# error); IQ3_XXS's odd sign counts flip the value that weight says matters least.
# A sub-block of IQ3_S whose weights are all zero is stored in its own place (llama.cpp's
# encoder moves the next sub-blocks' points into it; its decoder then reads them there).

class IQ3Params:
    """One super-block of 256 per row: the stored fp16 d bits [rows], the 4-bit sub-block scales
    [rows, 8], their decoded scales db [rows, 8] and the encoder's rounding scales [rows, 64]."""

    def __init__(self, dbits, ls, db, ridv, rsnap):
        self.dbits, self.ls, self.db, self.ridv, self.rsnap = dbits, ls, db, ridv, rsnap


class IQ3Blocks:
    """A weight stored as IQ3_XXS or IQ3_S: the blocks' bytes uint8 [out, in/256 * type size]."""

    def __init__(self, xxs: bool, b: torch.Tensor, in_features: int):
        self.xxs, self.b, self.in_features = xxs, b, in_features
        self.name = "iq3_xxs" if xxs else "iq3_s"

    def to_bytes(self) -> torch.Tensor:
        return self.b

    def split_rows(self, rows: list[int]) -> list["IQ3Blocks"]:
        return [IQ3Blocks(self.xxs, p, self.in_features) for p in self.b.split(rows)]

    def dequantize(self) -> torch.Tensor:
        rows = self.b.shape[0]
        with np.errstate(all="ignore"):
            b = self.b.numpy().reshape(-1, 98 if self.xxs else 110)
            y = decode_xxs(b) if self.xxs else decode_s(b)
        return torch.from_numpy(y).reshape(rows, self.in_features)


class IQ3Grid:
    """GPTQ's view of IQ3_XXS (xxs=True) or IQ3_S: super-blocks of 256, groups of 8 or 4 columns."""

    codes_dtype = None
    width = QK_K

    def __init__(self, xxs: bool, in_features: int, search: bool = False):
        self.xxs, self.name = xxs, "iq3_xxs" if xxs else "iq3_s"
        if in_features % QK_K:
            raise ValueError(f"{self.name} needs rows that are a multiple of {QK_K}, got {in_features}")
        self.in_features, self.search = in_features, search
        self.group_width = 8 if xxs else 4
        self.lat = lattice("iq3xxs" if xxs else "iq3s")
        self.values = _grid_values("iq3xxs_grid" if xxs else "iq3s_grid")

    def params(self, w: torch.Tensor, imp: torch.Tensor | None = None) -> IQ3Params:
        x = np.ascontiguousarray(w.float().numpy(), dtype=F32)
        if not np.isfinite(x).all():
            raise ValueError("weights contain NaN or Inf")
        qw = None
        if self.search and imp is not None:
            qw = np.tile(np.maximum(imp.float().numpy().astype(F32), F32(0)), (x.shape[0], 1))
        b, ridv, rsnap = encode_rounding(x, qw, self.xxs)
        dbits = b[:, :2].copy().view(np.uint16)[:, 0]
        d = fp16_value(dbits)[:, None]
        if self.xxs:
            ls = (b[:, 66:98].copy().view(np.uint32).astype(np.int64) >> 28)
            db = d * (F32(0.5) + ls.astype(F32)) * F32(0.5)
        else:
            sc = b[:, 106:110].astype(np.int64)
            ls = np.stack([sc & 15, sc >> 4], axis=2).reshape(-1, 8)
            db = d * (1 + 2 * ls).astype(F32)
        return IQ3Params(dbits, ls, db, ridv, rsnap)

    def round_group(self, w: torch.Tensor, p: IQ3Params, j0: int, hinv: torch.Tensor):
        """Columns j0.. of the group (within the super-block) of rows w [rows, k] -> (codes,
        values), float32 [rows, k]; code = 2 * grid index + sign bit. hinv: the group's [k, k]
        block of the inverse Hessian's upper Cholesky factor."""
        k, rows = self.group_width, w.shape[0]
        s, g0 = j0 // 32, j0 // 4
        x = np.ascontiguousarray(w.float().numpy().T, dtype=F32)          # [k, rows]
        db = p.db[:, s]
        dead = ~(db > 0)
        with np.errstate(all="ignore"):
            if self.search:
                ub = hinv.double()
                wc = torch.linalg.inv(ub.t() @ ub).diagonal().float().numpy().astype(F32)
                wt = np.repeat(wc[:, None], rows, axis=1)
            else:
                wt = x * x
            neg = ~(x >= 0)
            xval = np.where(neg, -x, x)
            if self.xxs:                          # an even count of negatives: flip the least important
                odd = np.flatnonzero(neg.sum(axis=0) % 2)
                imin = np.argmin(wt * x * x, axis=0)[odd]
                xval[imin, odd] = -xval[imin, odd]
                neg[imin, odd] = ~neg[imin, odd]
            xg = xval.T.reshape(rows * k // 4, 4)                 # groups of 4, row-major
            if self.search:
                scale = np.repeat(np.where(dead, F32(0), db), k // 4)
                gi = self._scored(xg, np.tile(wc.reshape(-1, 4), (rows, 1)), scale)
            else:
                idv = np.where(dead[:, None], F32(1), p.ridv[:, g0:g0 + k // 4]).reshape(-1)
                snap = np.where(dead[:, None], F32(1), p.rsnap[:, g0:g0 + k // 4]).reshape(-1)
                L = _levels(idv[None, :], np.ascontiguousarray(xg.T))
                gi = self._snap(L, xg, np.sqrt(wt).T.reshape(-1, 4), snap)
        gi = gi.reshape(rows, k // 4)
        gi[dead] = 0
        neg = (neg & ~dead[None, :]).T.astype(np.int64)                               # [rows, k]
        vals = (db[:, None] * self.values[gi].reshape(rows, k)) * np.where(neg > 0, F32(-1), F32(1))
        codes = (2 * np.repeat(gi, 4, axis=1) + neg).astype(F32)
        return torch.from_numpy(codes), torch.from_numpy(vals)

    def _scored(self, xg, wg, scale):
        """Every grid point at `scale` [G4]: the index of the least weighted error per group of 4."""
        m = torch.from_numpy(self.values)
        sc = torch.from_numpy(scale)[:, None]
        wt = torch.from_numpy(np.ascontiguousarray(wg))
        cost = sc * sc * (wt @ (m * m).t()) - 2 * sc * ((torch.from_numpy(xg) * wt) @ m.t())
        return cost.argmin(dim=1).numpy().astype(np.int64)

    def _snap(self, L, xg, wg, scale):
        """Levels L [4, G4] -> grid index [G4]; off-grid groups move to their best neighbour."""
        lat = self.lat
        gi = lat.index[lat.code(L)].astype(np.int64)
        off = np.flatnonzero(gi < 0)
        if len(off):
            which, cand, first = neighbours(lat, lat.code(L[:, off]))
            rows = off[which]
            diff = np.take(scale, rows)[:, None] * np.take(lat.pos, cand, axis=0)
            diff -= np.take(xg, rows, axis=0)
            t = np.take(wg, rows, axis=0) * diff
            t *= diff
            d2 = t[:, 0] + t[:, 1]
            d2 += t[:, 2]
            d2 += t[:, 3]
            gi[off] = cand[first_min(d2, which, first)]
        return gi

    def round(self, w, p, j):
        raise NotImplementedError(f"{self.name} rounds groups of {self.group_width} columns together (round_group)")

    def stored(self, params: list[IQ3Params], codes: torch.Tensor) -> IQ3Blocks:
        rows, nb = codes.shape[0], len(params)
        c = codes.numpy().astype(np.int64).reshape(rows, nb, 8, 32)
        gi = (c[..., ::4] >> 1).reshape(rows * nb, 8, 8)
        bits = ((c & 1).reshape(rows, nb, 8, 4, 8) << np.arange(8)).sum(axis=4).reshape(rows * nb, 8, 4)
        dbits = np.stack([p.dbits for p in params], axis=1).reshape(-1)
        ls = np.stack([p.ls for p in params], axis=1).reshape(-1, 8)
        if self.xxs:
            b = _pack_xxs(rows * nb, dbits, gi, bits & 127, ls, dbits == 0)
        else:
            b = _pack_s(rows * nb, dbits, gi, bits, ls, np.zeros((rows * nb, 8), bool))
        return IQ3Blocks(self.xxs, torch.from_numpy(b.reshape(rows, -1)), self.in_features)

    def join(self, pieces: list[IQ3Blocks], codes, shape) -> IQ3Blocks:
        return IQ3Blocks(self.xxs, torch.cat([p.b for p in pieces]), shape[1])
