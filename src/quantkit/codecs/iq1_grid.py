"""GPTQ's view of IQ1_S and IQ1_M (codecs/iq1.py): super-blocks of 256, groups of 8 columns.

Each group of 8 weights is one point of the 2048-point ternary lattice (levels -1, 0, 1) plus a
shared shift of +-delta, times its sub-block's scale d * (2 l + 1): IQ1_S has sub-blocks of 32
(one shift for its 4 groups), IQ1_M sub-blocks of 16 (one shift per group). There are no signs.

When GPTQ (quant.gptq) reaches a super-block, `params` runs llama.cpp's encoder (codecs.iq1) on
the partially updated weights: its bytes fix d and the 3-bit sub-block scales (with `search`,
weighted by each column's importance as llama.cpp weights by an imatrix; without, llama.cpp's
own weights: all-ones importance for IQ1_S, which refuses to run without any, none for IQ1_M).
Then every group of 8 columns takes its entry (`round_group`):
- without `search`: the encoder's own entry and shift for that group, chosen from the weights
  as they were when the super-block began (with an identity Hessian nothing updates them, so
  the bytes are llama.cpp's);
- with `search`: every lattice point (IQ1_S: under its sub-block's shift; IQ1_M: under either
  shift) scored at the stored scale by the group's full Hessian-weighted error
  (x - q)ᵀ A (x - q), A = (U_bᵀ U_b)^-1 with U_b the group's block of the inverse Hessian's
  upper Cholesky factor, x the group's columns updated by every column solved before them.

Codes: 2 * lattice index + shift bit (1: -delta), the same for the group's 8 columns. Only
public names of codecs.iq1 / codecs.lattice are used (the byte layout is llama.cpp's format).
"""

from __future__ import annotations

import numpy as np
import torch

from . import iq1
from .lattice import F32, QK_K, fp16_value, tables


def _points() -> np.ndarray:
    """The 2048 lattice points' levels, float32 [2048, 8] (-1, 0, 1)."""
    return tables()["iq1s_grid"].view(np.int8).reshape(-1, 8).astype(F32)


class IQ1Params:
    """One super-block per row: the encoder's bytes [rows, ts], the decoded d [rows], sub-block
    scales dl = d * (2 l + 1) [rows, n_sub], the encoder's lattice index and shift bit per group
    [rows, 32]."""

    def __init__(self, b, dl, gi, minus):
        self.b, self.dl, self.gi, self.minus = b, dl, gi, minus


def _parse_s(b: np.ndarray):
    """IQ1_S bytes [n, 50] -> (dl [n, 8], lattice index [n, 32], shift bit [n, 32])."""
    n = b.shape[0]
    d = fp16_value(b[:, :2].copy().view(np.uint16)[:, 0])
    qh = b[:, 34:50].copy().view(np.uint16).astype(np.int64)                      # [n, 8]
    dl = d[:, None] * (2 * ((qh >> 12) & 7) + 1).astype(F32)
    gi = b[:, 2:34].astype(np.int64).reshape(n, 8, 4) | (((qh[:, :, None] >> (3 * np.arange(4))) & 7) << 8)
    minus = np.repeat((qh >> 15) & 1, 4, axis=1)
    return dl, gi.reshape(n, 32), minus


def _parse_m(b: np.ndarray):
    """IQ1_M bytes [n, 56] -> (dl [n, 16], lattice index [n, 32], shift bit [n, 32])."""
    n = b.shape[0]
    sc = b[:, 48:56].copy().view(np.uint16).astype(np.int64)                      # [n, 4]
    u16 = (sc[:, 0] >> 12) | ((sc[:, 1] >> 8) & 0xF0) | ((sc[:, 2] >> 4) & 0xF00) | (sc[:, 3] & 0xF000)
    d = fp16_value(u16.astype(np.uint16))
    j = np.arange(16)
    dl = d[:, None] * (2 * ((sc[:, j // 4] >> (3 * (j % 4))) & 7) + 1).astype(F32)
    qh = b[:, 32:48].astype(np.int64)                                             # [n, 16]
    hi = np.stack([qh & 7, (qh >> 4) & 7], axis=2)
    gi = b[:, :32].astype(np.int64).reshape(n, 16, 2) | (hi << 8)
    minus = np.stack([(qh >> 3) & 1, (qh >> 7) & 1], axis=2)
    return dl, gi.reshape(n, 32), minus.reshape(n, 32)


class IQ1Blocks:
    """A weight stored as IQ1_S or IQ1_M: the blocks' bytes uint8 [out, in/256 * type size]."""

    def __init__(self, m: bool, b: torch.Tensor, in_features: int):
        self.m, self.b, self.in_features = m, b, in_features
        self.name = "iq1_m" if m else "iq1_s"

    def to_bytes(self) -> torch.Tensor:
        return self.b

    def split_rows(self, rows: list[int]) -> list["IQ1Blocks"]:
        return [IQ1Blocks(self.m, p, self.in_features) for p in self.b.split(rows)]

    def dequantize(self) -> torch.Tensor:
        rows = self.b.shape[0]
        with np.errstate(all="ignore"):
            b = self.b.numpy().reshape(-1, 56 if self.m else 50)
            y = iq1.decode_m(b) if self.m else iq1.decode_s(b)
        return torch.from_numpy(y).reshape(rows, self.in_features)


class IQ1Grid:
    """GPTQ's view of IQ1_M (m=True) or IQ1_S: super-blocks of 256, groups of 8 columns."""

    codes_dtype = None
    width = QK_K
    group_width = 8

    def __init__(self, m: bool, in_features: int, search: bool = False):
        self.m, self.name = m, "iq1_m" if m else "iq1_s"
        if in_features % QK_K:
            raise ValueError(f"{self.name} needs rows that are a multiple of {QK_K}, got {in_features}")
        self.in_features, self.search = in_features, search
        self.sub = 16 if m else 32
        delta = tables()["iq1s_delta"]              # the decoder's shift, IQ1_S and IQ1_M alike
        pts = _points()
        self.shifted = (pts + delta, pts - delta)   # the values of every point under each shift bit

    def params(self, w: torch.Tensor, imp: torch.Tensor | None = None) -> IQ1Params:
        x = np.ascontiguousarray(w.float().numpy(), dtype=F32)
        if not np.isfinite(x).all():
            raise ValueError("weights contain NaN or Inf")
        if self.search and imp is not None:
            qw = np.tile(np.maximum(imp.float().numpy().astype(F32), F32(0)), (x.shape[0], 1))
        else:
            qw = None if self.m else np.ones_like(x)
        b = iq1.encode_m(x, qw) if self.m else iq1.encode_s(x, qw)
        with np.errstate(all="ignore"):
            dl, gi, minus = _parse_m(b) if self.m else _parse_s(b)
        return IQ1Params(b, dl, gi, minus)

    def round_group(self, w: torch.Tensor, p: IQ1Params, j0: int, hinv: torch.Tensor):
        """Columns j0..j0+7 (within the super-block) of rows w [rows, 8] -> (codes, values),
        float32 [rows, 8]; hinv: the group's [8, 8] block of the inverse Hessian's upper
        Cholesky factor."""
        g = j0 // 8
        dl = p.dl[:, j0 // self.sub]
        gi, minus = p.gi[:, g].copy(), p.minus[:, g].copy()
        if self.search:
            with np.errstate(all="ignore"):
                dead = ~(np.abs(dl) > 0) | ~np.isfinite(dl)
            live = np.flatnonzero(~dead)
            if live.size:
                ub = hinv.double()
                A = torch.linalg.inv(ub.t() @ ub)
                A = (0.5 * (A + A.t())).float()
                x = w.float()[live]
                d = torch.from_numpy(dl[live])[:, None]
                xa = x @ A                                                  # [live, 8]
                best, arg = None, None
                shifts = (0, 1) if self.m else None
                for s, pts in enumerate(self.shifted):
                    P = torch.from_numpy(pts)
                    quad = ((P @ A) * P).sum(dim=1)                         # qᵀ A q per point
                    cost = d * d * quad[None, :] - 2 * d * (xa @ P.t())     # [live, 2048]
                    if shifts is None:                                      # IQ1_S: its sub-block's shift
                        cost[torch.from_numpy(minus[live] != s)] = float("inf")
                    c, a = cost.min(dim=1)
                    if best is None:
                        best, arg, sbit = c, a, torch.zeros_like(a)
                    else:
                        take = c < best
                        best = torch.where(take, c, best)
                        arg = torch.where(take, a, arg)
                        sbit = torch.where(take, torch.ones_like(sbit), sbit)
                gi[live] = arg.numpy()
                minus[live] = sbit.numpy()
        vals = dl[:, None] * np.where(minus[:, None] > 0, self.shifted[1][gi], self.shifted[0][gi])
        codes = np.repeat((2 * gi + minus)[:, None], 8, axis=1).astype(F32)
        return torch.from_numpy(codes), torch.from_numpy(vals.astype(F32))

    def round(self, w, p, j):
        raise NotImplementedError(f"{self.name} rounds groups of 8 columns together (round_group)")

    def stored(self, params: list[IQ1Params], codes: torch.Tensor) -> IQ1Blocks:
        rows, nb = codes.shape[0], len(params)
        c = codes.numpy().astype(np.int64).reshape(rows * nb, 32, 8)[:, :, 0]
        gi, minus = c >> 1, c & 1
        b = np.stack([p.b for p in params], axis=1).reshape(rows * nb, -1).copy()
        if self.m:
            b[:, :32] = (gi & 255).astype(np.uint8)
            g2, m2 = gi.reshape(-1, 16, 2) >> 8, minus.reshape(-1, 16, 2)
            b[:, 32:48] = (g2[:, :, 0] | (m2[:, :, 0] << 3) | (g2[:, :, 1] << 4) | (m2[:, :, 1] << 7)).astype(np.uint8)
        else:
            b[:, 2:34] = (gi & 255).astype(np.uint8)
            qh = b[:, 34:50].copy().view(np.uint16).astype(np.int64) & 0x7000       # keep the 3-bit scales
            qh |= ((gi.reshape(-1, 8, 4) >> 8) << (3 * np.arange(4))).sum(axis=2)
            qh |= minus.reshape(-1, 8, 4)[:, :, 0] << 15
            b[:, 34:50] = qh.astype(np.uint16).view(np.uint8).reshape(-1, 16)
        return IQ1Blocks(self.m, torch.from_numpy(b.reshape(rows, -1)), self.in_features)

    def join(self, pieces: list[IQ1Blocks], codes, shape) -> IQ1Blocks:
        return IQ1Blocks(self.m, torch.cat([p.b for p in pieces]), shape[1])
