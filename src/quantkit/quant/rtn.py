"""Round-to-nearest integer quantization of linear weights, per group of input columns.

A weight W [out, in] is split along `in` into groups of `group_size` columns (-1: one group,
i.e. per output channel). Each (row, group) gets a scale s and an integer zero point z, and a
code q in 0 .. 2**bits - 1 with W ~ (q - z) * s, the convention GPTQ checkpoints and
compressed-tensors share:

- asymmetric: s = (max - min) / (2**bits - 1), z = round(-min / s), min <= 0 <= max (0 must be
  representable, as GPTQ and compressed-tensors require); z >= `zero_min` (1 for GPTQ v1
  checkpoints, which store z - 1);
- symmetric: s = absmax / ((2**bits - 1) / 2), z = 2**(bits-1): GPTQ's and llm-compressor's
  choice (the largest positive value clips to 2**(bits-1) - 1 levels, the negative side keeps
  the extra level).

The scale is rounded to its storage dtype (`scale_dtype`, fp16 for GPTQ checkpoints) *before*
the codes are computed, so `dequantize(quantize_rtn(W))` is exactly what a runtime computes from
the stored tensors, and GPTQ's error feedback sees the values a runtime will see.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..recipe import DEFAULT_BITS, DEFAULT_GROUP_SIZE, GROUP_SIZES

RTN_BITS = (2, 3, 4, 5, 6, 8)


@dataclass(frozen=True)
class QuantSpec:
    """What integer grid to quantize onto (RTN and GPTQ alike)."""
    bits: int = DEFAULT_BITS
    group_size: int = DEFAULT_GROUP_SIZE   # -1: one group per output row (per channel)
    sym: bool = True
    scale_dtype: torch.dtype = torch.float16
    zero_min: int = 0                # 1 for GPTQ v1 checkpoints, which store zero - 1 in `bits` bits

    def __post_init__(self):
        if self.bits not in RTN_BITS:
            raise ValueError(f"bits must be one of {', '.join(map(str, RTN_BITS))}, got {self.bits}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or -1, got {self.group_size}")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def group_width(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def n_groups(self, in_features: int) -> int:
        self.check_shape(in_features)
        return in_features // self.group_width(in_features)

    def check_shape(self, in_features: int) -> None:
        if self.group_size != -1 and in_features % self.group_size:
            raise ValueError(f"group size {self.group_size} does not divide the input dimension {in_features}")


@dataclass
class QuantizedWeight:
    """Codes q int32 [out, in] (0..2**bits-1), scales [out, groups] in spec.scale_dtype, zeros
    int32 [out, groups]; column j belongs to group j // group_width."""
    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    spec: QuantSpec

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.q, self.scales, self.zeros, self.spec.group_width(self.q.shape[1]))

    def split_rows(self, rows: list[int]) -> list["QuantizedWeight"]:
        """The weights of stacked linears, apart again (rows: each one's output count)."""
        return [QuantizedWeight(q, s, z, self.spec)
                for q, s, z in zip(self.q.split(rows), self.scales.split(rows), self.zeros.split(rows))]


def compute_qparams(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """w float [rows, k] (one group per row) -> scale float32 [rows] (already rounded to
    spec.scale_dtype), zero int32 [rows]."""
    w = w.float()
    if not torch.isfinite(w).all():
        raise ValueError("weights contain NaN or Inf")
    mn = w.min(dim=1).values.clamp(max=0)
    mx = w.max(dim=1).values.clamp(min=0)
    if spec.sym:
        scale = torch.maximum(-mn, mx) / (spec.maxq / 2)
    else:
        scale = (mx - mn) / spec.maxq
    scale = scale.to(spec.scale_dtype).float()
    if not torch.isfinite(scale).all():
        raise ValueError(f"a group's scale overflows {spec.scale_dtype} (|w| up to {float(w.abs().max()):.3g})")
    # all-zero groups (or scales below the storage dtype's range): any positive scale gives q = z, w = 0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if spec.sym:
        zero = torch.full_like(scale, 2 ** (spec.bits - 1), dtype=torch.int32)
    else:
        zero = torch.round(-mn / scale).clamp(spec.zero_min, spec.maxq).to(torch.int32)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Codes for w [rows, k] with per-row scale/zero broadcastable to it: clamp(round(w/s) + z)."""
    return (torch.round(w / scale) + zero).clamp(0, maxq).to(torch.int32)


def quantize_rtn(w: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Round-to-nearest of a linear weight W [out, in]."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    spec.check_shape(in_f)
    gw = spec.group_width(in_f)
    groups = w.float().reshape(out_f, in_f // gw, gw)
    scale, zero = compute_qparams(groups.reshape(-1, gw), spec)
    scale = scale.reshape(out_f, -1)
    zero = zero.reshape(out_f, -1)
    q = quantize_codes(groups, scale[..., None], zero[..., None], spec.maxq).reshape(out_f, in_f)
    return QuantizedWeight(q, scale.to(spec.scale_dtype), zero, spec)


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_width: int) -> torch.Tensor:
    """(q - z) * s in float32, groups of `group_width` consecutive input columns."""
    out_f, in_f = q.shape
    g = (q.reshape(out_f, -1, group_width).float() - zeros.float()[..., None]) * scales.float()[..., None]
    return g.reshape(out_f, in_f)


# ---- the integer grid, for GPTQ (codecs.grid.Grid) ------------------------------------------
# Clipping ratios of the scale search: fractions of the group's min/max range.
_INT_CLIP = [1.0 - 0.025 * i for i in range(1, 21)]


def search_group_scale(w: torch.Tensor, imp: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of w [rows, k] (one group per row): the scale and zero of spec's grid minimising
    Σ_j imp_j (w_j - ŵ_j)² over the range [min, max] clipped by each ratio of _INT_CLIP, and
    each candidate's scale refitted by weighted least squares given its codes (zero kept: it is
    an integer). The unclipped range, RTN's (compute_qparams), is a candidate, so the weighted
    error is never larger than RTN's. Scales are rounded to spec.scale_dtype before they are
    judged. Returns what compute_qparams returns."""
    scale, zero = compute_qparams(w, spec)
    w = w.float()
    imp = imp.clamp_min(0).float()[None, :]
    maxq = spec.maxq

    def judge(s, z):
        q = (quantize_codes(w, s[:, None], z[:, None], maxq) - z[:, None]).float()
        return (imp * (q * s[:, None] - w) ** 2).sum(1), q

    best, q = judge(scale, zero)
    mn = w.min(dim=1).values.clamp(max=0)
    mx = w.max(dim=1).values.clamp(min=0)
    for f in _INT_CLIP:
        if spec.sym:
            s = (torch.maximum(-mn, mx) * f / (maxq / 2)).to(spec.scale_dtype).float()
            z = zero
        else:
            s = ((mx - mn) * f / maxq).to(spec.scale_dtype).float()
            z = torch.round(-mn * f / torch.where(s > 0, s, torch.ones_like(s))).clamp(spec.zero_min, maxq)
            z = z.to(torch.int32)
        for refit in (False, True):
            if refit:               # s = Σ imp w L / Σ imp L² for the codes L of the clipped scale
                den = (imp * q * q).sum(1)
                s = torch.where(den > 0, (imp * q * w).sum(1) / den.clamp_min(1e-30), s)
                s = s.to(spec.scale_dtype).float()
            ok = torch.isfinite(s) & (s > 0)
            s = torch.where(ok, s, scale)
            err, q = judge(s, z)
            better = ok & (err < best)
            best = torch.where(better, err, best)
            scale = torch.where(better, s, scale)
            zero = torch.where(better, z, zero)
    return scale, zero


@dataclass(frozen=True)
class IntParams:
    """One group per row: scale float32 [rows] (a spec.scale_dtype value) and zero int32 [rows]."""
    scale: torch.Tensor
    zero: torch.Tensor


class IntGrid:
    """The integer grid of a QuantSpec for GPTQ: (scale, zero) per (row, group); with `search`,
    from search_group_scale instead of the group's min/max."""

    codes_dtype = torch.int32

    def __init__(self, spec: QuantSpec, in_features: int, search: bool = False):
        spec.check_shape(in_features)
        self.spec = spec
        self.width = spec.group_width(in_features)
        self.search = search

    def params(self, w: torch.Tensor, imp: torch.Tensor | None = None) -> IntParams:
        if self.search and imp is not None:
            return IntParams(*search_group_scale(w, imp, self.spec))
        return IntParams(*compute_qparams(w, self.spec))

    def round(self, w: torch.Tensor, p: IntParams, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = (torch.round(w / p.scale) + p.zero).clamp(0, self.spec.maxq)
        return q, (q - p.zero) * p.scale

    def stored(self, params: list[IntParams], codes: torch.Tensor) -> QuantizedWeight:
        scales = torch.stack([p.scale for p in params], dim=1)
        zeros = torch.stack([p.zero for p in params], dim=1)
        return QuantizedWeight(codes, scales.to(self.spec.scale_dtype), zeros, self.spec)

    def join(self, pieces: list[QuantizedWeight], codes: torch.Tensor, shape: tuple[int, int]) -> QuantizedWeight:
        return QuantizedWeight(codes, torch.cat([p.scales for p in pieces]), torch.cat([p.zeros for p in pieces]),
                               self.spec)
