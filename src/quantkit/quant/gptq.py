"""GPTQ (Frantar et al., 2022): quantize a linear weight column by column, spreading each
column's rounding error over the columns not yet quantized through the inverse Hessian of the
layer's reconstruction loss ||WX - ŴX||².

Statistics apart from solving: `accumulate_hessian(x, H, n)` folds calibration activations into
H = 2/n Σ x xᵀ; `quantize_weight(W, H, grid, config)` solves. Hooks (quant.pipeline) only glue.

The grid is either an integer grid (`rtn.QuantSpec`: bits, group size, sym; GPTQ/compressed-
tensors checkpoints) or a llama.cpp legacy block type ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0"),
in which case each 32-column block's scale (and min) is fixed, by llama.cpp's own rule, from the
partially updated weights just before the block's first column is quantized, and the columns
are then rounded onto that block's grid exactly as llama.cpp's reference quantizer rounds. The
result is a stock GGUF block that llama.cpp decodes at full speed.

Groups: without act-order a group's parameters come from the partially updated weights when
the solver reaches the group's first column (as in the GPTQ reference code); with act-order the
columns are visited by decreasing diag(H) and the groups are *static*: parameters are computed
once from the original weights in natural column order, so g_idx stays i // group_size and the
checkpoint needs no reordering at run time.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass

import torch

from ..codecs.intpack import LEGACY_GRIDS, encode_legacy_blocks
from .rtn import QuantizedWeight, QuantSpec, compute_qparams, dequantize

# Working precision of the Hessian, its inverse and the weights being updated. float32, as the
# GPTQ reference and llm-compressor: float64 doubles time and memory for no measurable gain once
# the Hessian is dampened; bf16/fp16 make the Cholesky fail.
WORK_DTYPE = torch.float32

DEFAULT_DAMP = 0.01          # fraction of mean(diag(H)) added to the diagonal
DEFAULT_BLOCK = 128          # columns per lazy batch update
_MAX_DAMP_TRIES = 6          # damp raised x10 per failed Cholesky, then give up


@contextlib.contextmanager
def _one_thread():
    """The column loop is a long chain of tiny ops: intra-op threads only add synchronisation
    (measured 8-20x slower with 2 threads on a loaded 2-core machine). Big products keep them."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@dataclass(frozen=True)
class GPTQConfig:
    damp: float = DEFAULT_DAMP
    act_order: bool = False
    block_size: int = DEFAULT_BLOCK

    def __post_init__(self):
        if self.damp < 0:
            raise ValueError(f"damp must be >= 0, got {self.damp}")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")


def new_hessian(in_features: int) -> torch.Tensor:
    return torch.zeros(in_features, in_features, dtype=WORK_DTYPE)


def accumulate_hessian(x: torch.Tensor, H: torch.Tensor, n: int) -> int:
    """Fold activations x [..., in] into H (in place): H = 2/N Σ x xᵀ over all N rows seen so
    far. Returns the new row count N."""
    x = x.reshape(-1, x.shape[-1]).to(WORK_DTYPE)
    m = x.shape[0]
    if m == 0:
        return n
    if x.shape[1] != H.shape[0]:
        raise ValueError(f"activations have {x.shape[1]} features, Hessian is {H.shape[0]}")
    H.mul_(n / (n + m))
    x = x * math.sqrt(2.0 / (n + m))
    H.addmm_(x.t(), x)
    return n + m


# ---- grids -----------------------------------------------------------------------------------
class _IntGrid:
    """Integer grid of rtn.QuantSpec: params (scale, zero) per (row, group)."""

    def __init__(self, spec: QuantSpec, in_features: int):
        spec.check_shape(in_features)
        self.spec = spec
        self.width = spec.group_width(in_features)

    def params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return compute_qparams(w, self.spec)

    def round(self, w: torch.Tensor, p) -> tuple[torch.Tensor, torch.Tensor]:
        scale, zero = p
        q = (torch.round(w / scale) + zero).clamp(0, self.spec.maxq)
        return q, (q - zero) * scale


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C roundf: halves away from zero (floor(|x| + 0.5) would round 0.49999997 up in float32)."""
    t = torch.trunc(x)
    return t + torch.where((x - t).abs() >= 0.5, torch.sign(x), torch.zeros_like(x))


class _LegacyGrid:
    """llama.cpp's Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 block of 32, following quantize_row_*_ref: scale
    from the block (first element of largest magnitude, or min/max), d stored as fp16 while the
    codes use 1/d in float32, truncation after +8.5 (+16.5, +0.5), roundf for Q8_0. Later
    columns of a block, moved by GPTQ's updates, may fall outside the block's range: they clamp
    to the nearest code, which the reference never needs."""

    width = 32

    def __init__(self, name: str, in_features: int):
        if name not in LEGACY_GRIDS:
            raise ValueError(f"no GPTQ grid for {name} (supported: {', '.join(LEGACY_GRIDS)})")
        if in_features % 32:
            raise ValueError(f"{name} needs rows that are a multiple of 32, got {in_features}")
        self.name = name
        self.levels, self.offset, self.has_min = LEGACY_GRIDS[name]

    def params(self, w: torch.Tensor):
        w = w.float()
        if not torch.isfinite(w).all():
            raise ValueError("weights contain NaN or Inf")
        if self.has_min:
            mn = w.min(dim=1).values
            d = (w.max(dim=1).values - mn) / self.levels
            m16 = mn.half().float()
        else:
            mn = m16 = torch.zeros(w.shape[0])
            if self.name == "q8_0":
                d = w.abs().max(dim=1).values / 127
            else:
                amax = w.gather(1, w.abs().argmax(dim=1, keepdim=True)).squeeze(1)
                d = amax / -(self.offset)
        inv = torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))
        d16 = d.half().float()
        if not torch.isfinite(d16).all():
            raise ValueError(f"a block's scale overflows fp16 (|w| up to {float(w.abs().max()):.3g})")
        return mn, inv, d16, m16

    def round(self, w: torch.Tensor, p):
        mn, inv, d16, m16 = p
        if self.name == "q8_0":
            q = _roundf(w * inv).clamp(-128, 127) + 128
            return q, (q - 128) * d16
        if self.has_min:
            q = torch.trunc((w - mn) * inv + 0.5).clamp(0, self.levels)
            return q, q * d16 + m16
        q = torch.trunc(w * inv + (self.offset + 0.5)).clamp(0, self.levels)
        return q, (q - self.offset) * d16


@dataclass
class LegacyBlocks:
    """A weight on a llama.cpp block grid: codes int32 [out, in] (unsigned; q8_0 stored +128),
    d and m float32 [out, in/32] (fp16 values)."""
    name: str
    codes: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None

    def to_bytes(self) -> torch.Tensor:
        """uint8 [out, row_bytes]: the GGUF rows."""
        out_f, in_f = self.codes.shape
        b = encode_legacy_blocks(self.name, self.codes.reshape(-1, 32), self.d.reshape(-1),
                                 None if self.m is None else self.m.reshape(-1))
        return b.reshape(out_f, -1)

    def dequantize(self) -> torch.Tensor:
        out_f, in_f = self.codes.shape
        q = self.codes.reshape(out_f, -1, 32).float()
        d = self.d[..., None]
        _, offset, has_min = LEGACY_GRIDS[self.name]
        w = q * d + self.m[..., None] if has_min else (q - offset) * d
        return w.reshape(out_f, in_f)


@dataclass
class GPTQResult:
    weight: QuantizedWeight | LegacyBlocks
    dequantized: torch.Tensor       # Ŵ float32 [out, in], exactly weight.dequantize()
    damp: float                     # the dampening ratio finally used
    loss: float                     # Σ (w - q)² / Hinv_jj² / 2, GPTQ's own error estimate


# ---- solver ------------------------------------------------------------------------------------
def _inverse_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + damp·mean(diag H)·I)^-1 (Hinv = Uᵀ U), raising damp x10
    (with a warning) while the factorisation fails: a rank-deficient H (fewer calibration tokens
    than inputs, duplicated features) is common, and more dampening is the standard remedy.

    U comes from one Cholesky and one triangular solve: with J the reversal permutation,
    chol(J H J) = L' gives H = R Rᵀ with R = J L' J upper triangular, so H^-1 = R^-ᵀ R^-1 and
    U = R^-1. The textbook route (cholesky_inverse, then a second Cholesky) costs two
    factorisations, and torch's cholesky_inverse measured 20-40x slower with 2 threads on a
    loaded 2-core machine."""
    mean_diag = float(torch.diagonal(H).mean())
    idx = torch.arange(H.shape[0])
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    ratio = damp
    for _ in range(_MAX_DAMP_TRIES):
        Hd = H.flip(0, 1)
        Hd[idx, idx] += ratio * mean_diag
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            U = torch.linalg.solve_triangular(L.flip(0, 1), eye, upper=True)
            if torch.isfinite(U).all():
                return U, ratio
        new = ratio * 10 if ratio > 0 else DEFAULT_DAMP
        warnings.warn(f"GPTQ: Hessian is not positive definite with damp {ratio:g}; raising damp to {new:g}",
                      RuntimeWarning, stacklevel=3)
        ratio = new
    raise ValueError(f"GPTQ: Hessian could not be factorised even with damp {ratio / 10:g} "
                     "(the calibration activations are degenerate)")


def quantize_weight(W: torch.Tensor, H: torch.Tensor, grid: QuantSpec | str,
                    config: GPTQConfig = GPTQConfig()) -> GPTQResult:
    """GPTQ of W [out, in] given H [in, in]; `grid` a QuantSpec or a legacy llama.cpp type name."""
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"W {tuple(W.shape)} and H {tuple(H.shape)} do not match")
    out_f, in_f = W.shape
    g = _IntGrid(grid, in_f) if isinstance(grid, QuantSpec) else _LegacyGrid(grid.lower(), in_f)
    W = W.to(WORK_DTYPE).clone()
    if not torch.isfinite(W).all():
        raise ValueError("weights contain NaN or Inf")
    H = H.to(WORK_DTYPE).clone()
    if not torch.isfinite(H).all():
        raise ValueError("Hessian contains NaN or Inf")

    dead = torch.diagonal(H) == 0               # inputs never active: their weights do not matter
    H[dead, dead] = 1
    W[:, dead] = 0

    n_groups = in_f // g.width
    params: list = [None] * n_groups
    if config.act_order:
        for gi in range(n_groups):              # static groups, from the original weights
            params[gi] = g.params(W[:, gi * g.width:(gi + 1) * g.width])
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    else:
        perm = torch.arange(in_f)
    Hinv, damp = _inverse_cholesky(H, config.damp)
    del H

    codes = torch.zeros(out_f, in_f, dtype=WORK_DTYPE)   # natural column order
    Q = torch.zeros_like(W)                              # permuted order
    loss = 0.0
    perm_l = perm.tolist()
    bs = config.block_size
    for i1 in range(0, in_f, bs):
        i2 = min(i1 + bs, in_f)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        with _one_thread():
            for i in range(i2 - i1):
                col = perm_l[i1 + i]
                gi = col // g.width
                if params[gi] is None:          # first column of a group, in natural order
                    params[gi] = g.params(torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :g.width])
                w = W1[:, i]
                q, dq = g.round(w, params[gi])
                codes[:, col] = q
                Q[:, i1 + i] = dq
                err = (w - dq) / Hinv1[i, i]
                W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)
                Err1[:, i] = err
        loss += float(Err1.pow(2).sum()) / 2
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)

    inv_perm = torch.argsort(perm)
    deq = Q[:, inv_perm]
    codes_i = codes.to(torch.int32)
    if isinstance(g, _IntGrid):
        scales = torch.stack([p[0] for p in params], dim=1)
        zeros = torch.stack([p[1] for p in params], dim=1)
        qw = QuantizedWeight(codes_i, scales.to(grid.scale_dtype), zeros, grid)
        weight: QuantizedWeight | LegacyBlocks = qw
        deq_exact = dequantize(codes_i, qw.scales, zeros, g.width)
    else:
        d16 = torch.stack([p[2] for p in params], dim=1)
        m16 = torch.stack([p[3] for p in params], dim=1) if g.has_min else None
        weight = LegacyBlocks(g.name, codes_i, d16, m16)
        deq_exact = weight.dequantize()
    # the solver's Ŵ and the stored codes must agree: guard against any drift between the two
    if not torch.allclose(deq, deq_exact, rtol=0, atol=1e-6 * (1 + float(deq_exact.abs().max()))):
        raise AssertionError("GPTQ: dequantized codes differ from the solver's values")
    return GPTQResult(weight, deq_exact, damp, loss)
