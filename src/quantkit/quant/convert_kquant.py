"""A quantized checkpoint's integer codes kept as they are in K-quant blocks (Q4_K ... Q3_K).

A checkpoint value is s * (c - z): codes c in 0..2^bits - 1, an fp16 scale s and zero z per
group. The K-quants store value = d * sc[j] * (L - off) - dmin * m[j] per sub-block j (fp16 d
and dmin per super-block of 256, small integer sc and m per sub-block), so the codes fit
unchanged where the source's groups are made of whole sub-blocks:

    Q4_K, Q5_K   L = c (codes of up to 4 / 5 bits), d * sc[j] ~ s and dmin * m[j] ~ s * z;
                 sc, m 6-bit (0..63), 8 sub-blocks of 32.
    Q6_K         L = c - z + 32 (c - z within -32..31), d * sc[j] ~ s; sc int8, 16 sub-blocks
                 of 16, no minimum.
    Q3_K         L = c - z + 4 (c - z within -4..3: 3-bit symmetric or 2-bit sources), d * sc[j] ~ s;
                 sc 6-bit signed (stored + 32), 16 sub-blocks of 16, no minimum.

The only error left is the rounding of the scales (and minima) onto that two-level grid, not a
re-rounding of every weight. Per super-block, d is chosen among fp16(s_j / k) for every
sub-block j and integer k the scale's range allows, to minimise the squared value error summed
over the codes actually present, sum_i w_i ((d sc - s) c_i - (dmin m - s z))^2 (w: optional importance of each input
column; 1 without); given d, each minimum's target absorbs the scale error at the sub-block's
mean code (s z + (d sc - s) * mean c), and dmin is chosen the same way over the exact error.
Groups that are not whole sub-blocks, act-order permuted groups, FP8 and codes that do not fit
are refused with the reason (the caller then solves the tensor by GPTQ).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..codecs import kquants
from ..codecs.bits import fp16
from ..models.quantized_source import SourceGrid

CODE_FORMATS = {"q4_k": kquants.Q4_K, "q5_k": kquants.Q5_K, "q6_k": kquants.Q6_K, "q3_k": kquants.Q3_K}
SIGNED = {"q6_k": 127, "q3_k": 31}      # no minimum: codes c - z + off; the largest scale integer
QK = kquants.QK_K
CHUNK = 2048                     # super-blocks per step of the scale search


@dataclass
class CodesResult:
    data: np.ndarray | None       # uint8 [out, row_bytes] in HF row order; None: codes not kept
    reason: str = ""              # why not
    max_scale_error: float = 0.0  # largest |d*sc - s| / s over the sub-blocks
    max_value_error: float = 0.0  # largest |value - s*(c - z)| / s: in units of the checkpoint's step

    def note(self) -> str:
        return (f"codes kept, scales rounded (max rel. err {self.max_scale_error:.2g}; values within "
                f"{self.max_value_error:.2g} of a step)")


def pack_scale_min_k4(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """6-bit sc, m [n, 8] -> the 12 bytes get_scale_min_k4 (ggml-quants.c) reads them from."""
    sc, m = sc.to(torch.uint8), m.to(torch.uint8)
    lo = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    mid = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    return torch.cat([lo, mid, hi], dim=1)


def pack_scales_q3k(sc: torch.Tensor) -> torch.Tensor:
    """Signed 6-bit scales sc [n, 16] (-32..31) -> Q3_K's 12 scale bytes: the low nibbles of
    scales j and j + 8 share byte j, the high 2 bits of scale 4k + i sit at bits 2k of byte 8 + i."""
    v = (sc + 32).to(torch.uint8)
    lo, hi = v & 0xF, v >> 4
    high = hi[:, 0:4] | (hi[:, 4:8] << 2) | (hi[:, 8:12] << 4) | (hi[:, 12:16] << 6)
    return torch.cat([lo[:, :8] | (lo[:, 8:] << 4), high], dim=1)


def _ints(target: torch.Tensor, d: torch.Tensor, kmax: int) -> torch.Tensor:
    nz = d > 0
    return torch.where(nz[:, None], torch.round(target / torch.where(nz, d, 1.0)[:, None]),
                       torch.zeros_like(target)).clamp_(0, kmax)


def _pick(target: torch.Tensor, kmax: int, err) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of target [n, nsub] (>= 0): the fp16 step d and integers round(target / d) in
    0..kmax minimising err(d * ints) [n]; d is tried at fp16(target[:, j] / k) for every sub-block
    j and k in 1..kmax that keeps the largest target within kmax + 1/2 steps. Returns
    (d's fp16 bytes, d, ints)."""
    top = target.amax(1)
    best_e = torch.full_like(top, float("inf"))
    best_d = torch.zeros_like(top)
    for j in range(target.shape[1]):
        if j and torch.equal(target[:, j], target[:, j - 1]):      # a group of several sub-blocks
            continue
        for k in range(1, kmax + 1):
            d = target[:, j].div(k).half().float()
            e = err(d[:, None] * _ints(target, d, kmax))
            e = torch.where(top <= (kmax + 0.5) * d, e, float("inf"))
            better = e < best_e
            best_e, best_d = torch.where(better, e, best_e), torch.where(better, d, best_d)
    db, d = fp16(best_d)
    d = d.reshape(-1)
    return db, d, _ints(target, d, kmax)


def _encode_chunk(fmt, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, w: torch.Tensor):
    """Super-blocks: codes q [n, 256] (float), per sub-block s, z [n, nsub], weights w [n, 256] ->
    (bytes [n, type_size], scale error, value error)."""
    n, nsub = s.shape
    lay = fmt.layout
    out = torch.zeros(n, lay.type_size, dtype=torch.uint8)
    if fmt.name in SIGNED:
        v = (q - z.repeat_interleave(fmt.sub, 1))
        e2 = (w * v * v).reshape(n, nsub, fmt.sub).sum(2)
        db, d, sc = _pick(s, SIGNED[fmt.name], lambda a: ((a - s) ** 2 * e2).sum(1))
        a, b = d[:, None] * sc, torch.zeros_like(s)
        out[:, lay.scales] = sc.to(torch.int8).view(torch.uint8) if fmt is kquants.Q6_K else pack_scales_q3k(sc)
        out[:, lay.d] = db
        L = v + fmt.off
    else:
        qs, ws = q.reshape(n, nsub, fmt.sub), w.reshape(n, nsub, fmt.sub)
        s0, s1, s2 = ws.sum(2), (ws * qs).sum(2), (ws * qs * qs).sum(2)
        s0 = torch.where(s0 > 0, s0, 1.0)
        var = (s2 - s1 * s1 / s0).clamp_(min=0)
        db, d, sc = _pick(s, 63, lambda a: ((a - s) ** 2 * var).sum(1))
        a = d[:, None] * sc
        mu = s * z
        target = (mu + (a - s) * s1 / s0).clamp_(min=0)

        def exact_err(bb):
            da, dm = a - s, bb - mu
            return (da * da * s2 - 2 * da * dm * s1 + dm * dm * s0).sum(1)
        mb, dmin, m = _pick(target, 63, exact_err)
        b = dmin[:, None] * m
        out[:, lay.d], out[:, lay.dmin] = db, mb
        out[:, lay.scales] = pack_scale_min_k4(sc, m)
        L = q
    out[:, fmt.codes] = fmt.pack(L.to(torch.uint8))
    cmax = q.reshape(n, nsub, fmt.sub).amax(2) if fmt.name not in SIGNED else \
        (q - z.repeat_interleave(fmt.sub, 1)).abs().reshape(n, nsub, fmt.sub).amax(2)
    scale_err = float(((a - s).abs() / s).max()) if n else 0.0
    if fmt.name in SIGNED:
        value_err = ((a - s).abs() * cmax / s)
    else:
        cmin = q.reshape(n, nsub, fmt.sub).amin(2)
        da, dm = a - s, b - s * z
        value_err = torch.maximum((da * cmax - dm).abs(), (da * cmin - dm).abs()) / s
    return out, scale_err, float(value_err.max()) if n else 0.0


def codes_blocks(grid: SourceGrid, type_name: str, weights: torch.Tensor | None = None) -> CodesResult:
    """The K-quant bytes of `type_name` keeping the grid's codes (rows in HF order), or why not.
    weights: optional importance [in] of each input column for the scale search."""
    fmt = CODE_FORMATS.get(type_name)
    if fmt is None:
        return CodesResult(None, f"{type_name.upper()} cannot keep a checkpoint's codes")
    if grid.q is None:
        return CodesResult(None, "FP8 values lie on no integer grid")
    out_f, in_f = grid.shape
    if in_f % QK:
        return CodesResult(None, f"{in_f} input columns are not whole super-blocks of {QK}")
    if grid.act_order_permuted():
        return CodesResult(None, "act-order: the groups are permuted across the columns")
    s = grid.column_scales().reshape(out_f, -1, fmt.sub)
    z = grid.column_zeros().reshape(out_f, -1, fmt.sub)
    if not (torch.equal(s, s[..., :1].expand_as(s)) and torch.equal(z, z[..., :1].expand_as(z))):
        return CodesResult(None, f"group size {grid.group_size} is not a multiple of {fmt.sub}")
    s, z = s[..., 0].float(), z[..., 0].float()
    if not (torch.isfinite(s).all() and bool((s > 0).all())):
        return CodesResult(None, "scales that are not positive finite numbers")
    q = grid.q.float()
    if fmt.name in SIGNED:
        v = q.reshape(out_f, -1, fmt.sub) - z[..., None]
        if v.numel() and (float(v.min()) < -fmt.off or float(v.max()) > fmt.nmax - fmt.off):
            return CodesResult(None, f"codes q - z span {int(v.min())}..{int(v.max())}, outside "
                                     f"{type_name.upper()}'s {-fmt.off}..{fmt.nmax - fmt.off}")
    elif q.numel() and float(q.max()) > fmt.nmax:
        return CodesResult(None, f"{grid.bits}-bit codes do not fit {type_name.upper()}'s 0..{fmt.nmax}")
    nsub = QK // fmt.sub
    q = q.reshape(-1, QK)
    s, z = s.reshape(-1, nsub), z.reshape(-1, nsub)
    w = torch.ones(in_f) if weights is None else weights.float().clamp(min=0)
    w = w.reshape(1, -1).expand(out_f, -1).reshape(-1, QK)
    pieces, se, ve = [], 0.0, 0.0
    for i in range(0, q.shape[0], CHUNK):
        b, e1, e2 = _encode_chunk(fmt, q[i:i + CHUNK], s[i:i + CHUNK], z[i:i + CHUNK], w[i:i + CHUNK])
        pieces.append(b)
        se, ve = max(se, e1), max(ve, e2)
    data = torch.cat(pieces).reshape(out_f, -1)
    return CodesResult(data, "", se, ve)
