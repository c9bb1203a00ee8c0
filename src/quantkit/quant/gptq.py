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
from .rtn import QuantizedWeight, QuantSpec, compute_qparams, dequantize, quantize_codes

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
    # llama.cpp legacy grids and integer grids: choose each block's (group's) scale (and min or
    # zero) by a search minimising its rounding error weighted by each column's importance
    # (1 / [U]_jj², the weight GPTQ's own loss gives a column's error, at the column's place in
    # the visiting order) instead of the max-based rule. K-quants keep llama.cpp's own encoder.
    scale_search: bool = True
    # shrink H toward its diagonal, H <- (1 - shrink) H + shrink diag(H): 0 is plain GPTQ; 1 keeps
    # no cross-column compensation (importance-weighted rounding, like llama.cpp's imatrix). The
    # off-diagonal correlations are what is most specific to the calibration text.
    shrink: float = 0.0

    def __post_init__(self):
        if self.damp < 0:
            raise ValueError(f"damp must be >= 0, got {self.damp}")
        if not 0.0 <= self.shrink <= 1.0:
            raise ValueError(f"shrink must be in [0, 1], got {self.shrink}")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")


def new_hessian(in_features: int) -> torch.Tensor:
    return torch.zeros(in_features, in_features, dtype=WORK_DTYPE)


_TILE = 512      # Hessian tile width for the upper-triangle update


def accumulate_hessian(x: torch.Tensor, H: torch.Tensor, n: int, upper: bool = False) -> int:
    """Fold activations x [..., in] into H (in place): H = 2/N Σ x xᵀ over all N rows seen so
    far. Returns the new row count N.

    upper: update only the tiles on and above the diagonal (512-wide tiles), about half the
    work for a wide layer (measured 30 -> 19 ms per 512 x 2048 sample); the tiles below go stale
    until `symmetrize_hessian(H)` mirrors the upper ones into them."""
    x = x.reshape(-1, x.shape[-1]).to(WORK_DTYPE)
    m = x.shape[0]
    if m == 0:
        return n
    if x.shape[1] != H.shape[0]:
        raise ValueError(f"activations have {x.shape[1]} features, Hessian is {H.shape[0]}")
    H.mul_(n / (n + m))
    x = x * math.sqrt(2.0 / (n + m))
    d = H.shape[0]
    if not upper or d <= _TILE:
        H.addmm_(x.t(), x)
    else:
        for a in range(0, d, _TILE):
            b = min(a + _TILE, d)
            H[a:b, a:].addmm_(x[:, a:b].t(), x[:, a:])
    return n + m


def symmetrize_hessian(H: torch.Tensor) -> torch.Tensor:
    """After `accumulate_hessian(..., upper=True)`: the tiles below the diagonal from those above."""
    d = H.shape[0]
    for a in range(0, d, _TILE):
        b = min(a + _TILE, d)
        H[b:, a:b] = H[a:b, b:].t()
    return H


# ---- grids -----------------------------------------------------------------------------------
# Clipping ratios of the integer grids' scale search: fractions of the group's min/max range.
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


class _IntGrid:
    """Integer grid of rtn.QuantSpec: params (scale, zero) per (row, group); with `search`,
    from search_group_scale instead of the group's min/max."""

    def __init__(self, spec: QuantSpec, in_features: int, search: bool = False):
        spec.check_shape(in_features)
        self.spec = spec
        self.width = spec.group_width(in_features)
        self.search = search

    def params(self, w: torch.Tensor, imp: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.search and imp is not None:
            return search_group_scale(w, imp, self.spec)
        return compute_qparams(w, self.spec)

    def round(self, w: torch.Tensor, p, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        scale, zero = p
        q = (torch.round(w / scale) + zero).clamp(0, self.spec.maxq)
        return q, (q - zero) * scale


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C roundf: halves away from zero (floor(|x| + 0.5) would round 0.49999997 up in float32)."""
    t = torch.trunc(x)
    return t + torch.where((x - t).abs() >= 0.5, torch.sign(x), torch.zeros_like(x))


def _safe_inv(d: torch.Tensor) -> torch.Tensor:
    nz = d != 0
    return torch.where(nz, 1.0 / torch.where(nz, d, torch.ones_like(d)), torch.zeros_like(d))


# Candidate scales of the block scale search, as multiples of the max-based scale.
_SYM_FACTORS = torch.tensor([0.80, 0.84, 0.87, 0.90, 0.92, 0.94, 0.96, 0.98, 1.0, 1.02, 1.05])
_ASYM_SHRINK = torch.tensor([0.0, 0.03, 0.06, 0.1, 0.15])


def search_block_scale(w: torch.Tensor, imp: torch.Tensor, levels: int, offset: int, has_min: bool):
    """Per row of w [rows, 32]: the block scale d (and min mn) minimising Σ_j imp_j (w_j - ŵ_j)²
    over a few candidate grids, each refitted by weighted least squares given its codes, as
    llama.cpp's importance-matrix quantizers (make_qx_quants / make_qkx3_quants) do. Returns
    (mn, d) float32 [rows]; mn is zero for the symmetric types."""
    rows = w.shape[0]
    imp = imp.clamp_min(0).to(w.dtype)[None, None, :]
    x = w[:, None, :]
    if not has_min:
        amax = w.gather(1, w.abs().argmax(dim=1, keepdim=True))          # signed, [rows, 1]
        d0 = amax / -offset                                               # llama.cpp's own scale
        d = d0 * _SYM_FACTORS[None, :]                                    # [rows, C]
        L = torch.trunc(x * _safe_inv(d)[..., None] + (offset + 0.5)).clamp(0, levels) - offset
        num = (imp * x * L).sum(-1)
        den = (imp * L * L).sum(-1)
        d_ls = torch.where(den > 0, num / den.clamp_min(1e-30), d)       # least-squares refit
        d = torch.cat([d0, d_ls], dim=1).half().float()                   # llama.cpp's rule stays a candidate
        x = w[:, None, :]
        L = torch.trunc(x * _safe_inv(d)[..., None] + (offset + 0.5)).clamp(0, levels) - offset
        err = (imp * (x - L * d[..., None]) ** 2).sum(-1)
        err = torch.where(torch.isfinite(d), err, torch.full_like(err, float("inf")))
        best = err.argmin(dim=1, keepdim=True)
        return torch.zeros(rows), d.gather(1, best).squeeze(1)
    lo, hi = w.min(dim=1).values, w.max(dim=1).values
    rng = (hi - lo)[:, None, None]
    a, b = torch.meshgrid(_ASYM_SHRINK, _ASYM_SHRINK, indexing="ij")
    mn = lo[:, None] + (rng[..., 0] * a.reshape(1, -1))                  # [rows, C]
    mx = hi[:, None] - (rng[..., 0] * b.reshape(1, -1))
    d = (mx - mn) / levels
    L = torch.trunc((x - mn[..., None]) * _safe_inv(d)[..., None] + 0.5).clamp(0, levels)
    # weighted least squares of x ≈ d L + m
    sw, sl, sx = imp.sum(-1), (imp * L).sum(-1), (imp * x).sum(-1)
    sll, slx = (imp * L * L).sum(-1), (imp * L * x).sum(-1)
    det = sw * sll - sl * sl
    ok = det > 1e-12 * sw * sll
    d_ls = (sw * slx - sl * sx) / torch.where(ok, det, torch.ones_like(det))
    m_ls = (sll * sx - sl * slx) / torch.where(ok, det, torch.ones_like(det))
    fit = ok & (d_ls > 0)
    d = torch.cat([d, torch.where(fit, d_ls, d)], dim=1).half().float()   # raw candidates stay
    mn = torch.cat([mn, torch.where(fit, m_ls, mn)], dim=1).half().float()
    L = torch.trunc((x - mn[..., None]) * _safe_inv(d)[..., None] + 0.5).clamp(0, levels)
    err = (imp * (x - (L * d[..., None] + mn[..., None])) ** 2).sum(-1)
    err = torch.where(torch.isfinite(d) & torch.isfinite(mn), err, torch.full_like(err, float("inf")))
    best = err.argmin(dim=1, keepdim=True)
    return mn.gather(1, best).squeeze(1), d.gather(1, best).squeeze(1)


class _LegacyGrid:
    """llama.cpp's Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 block of 32, following quantize_row_*_ref: scale
    from the block (first element of largest magnitude, or min/max), d stored as fp16 while the
    codes use 1/d in float32, truncation after +8.5 (+16.5, +0.5), roundf for Q8_0. Later
    columns of a block, moved by GPTQ's updates, may fall outside the block's range: they clamp
    to the nearest code, which the reference never needs. With `search`, the scale (and min)
    come from search_block_scale instead of the max-based rule; the format is unchanged."""

    width = 32

    def __init__(self, name: str, in_features: int, search: bool = False):
        if name not in LEGACY_GRIDS:
            raise ValueError(f"no GPTQ grid for {name} (supported: {', '.join(LEGACY_GRIDS)})")
        if in_features % 32:
            raise ValueError(f"{name} needs rows that are a multiple of 32, got {in_features}")
        self.name = name
        self.levels, self.offset, self.has_min = LEGACY_GRIDS[name]
        self.search = search and name != "q8_0"

    def params(self, w: torch.Tensor, imp: torch.Tensor | None = None):
        w = w.float()
        if not torch.isfinite(w).all():
            raise ValueError("weights contain NaN or Inf")
        mn = torch.zeros(w.shape[0])
        if self.search and imp is not None:
            mn, d = search_block_scale(w, imp, self.levels, self.offset, self.has_min)
        elif self.has_min:
            mn = w.min(dim=1).values
            d = (w.max(dim=1).values - mn) / self.levels
        elif self.name == "q8_0":
            d = w.abs().max(dim=1).values / 127
        else:
            amax = w.gather(1, w.abs().argmax(dim=1, keepdim=True)).squeeze(1)
            d = amax / -(self.offset)
        m16 = mn.half().float()
        d16 = d.half().float()
        if not (torch.isfinite(d16).all() and torch.isfinite(m16).all()):
            raise ValueError(f"a block's scale overflows fp16 (|w| up to {float(w.abs().max()):.3g})")
        return mn, _safe_inv(d), d16, m16

    def round(self, w: torch.Tensor, p, j: int):
        mn, inv, d16, m16 = p
        if self.name == "q8_0":
            q = _roundf(w * inv).clamp(-128, 127) + 128
            return q, (q - 128) * d16
        if self.has_min:
            q = torch.trunc((w - mn) * inv + 0.5).clamp(0, self.levels)
            return q, q * d16 + m16
        q = torch.trunc(w * inv + (self.offset + 0.5)).clamp(0, self.levels)
        return q, (q - self.offset) * d16


class _KGrid:
    """A llama.cpp K-quant super-block of 256 (Q6_K, Q5_K, Q4_K, Q3_K, Q2_K): when GPTQ reaches
    a super-block, llama.cpp's reference quantizer (codecs.kquants, bit-exact) encodes the
    partially updated weights; the sub-block scales and mins of those bytes are then fixed and
    every column is rounded onto them, and the final codes are written back into the bytes."""

    width = 256

    def __init__(self, name: str, in_features: int):
        from ..codecs import kquants
        self.kq = kquants
        if name not in kquants.KQUANT_TYPES:
            raise ValueError(f"no GPTQ grid for {name}")
        if in_features % 256:
            raise ValueError(f"{name} needs rows that are a multiple of 256, got {in_features}")
        self.name = name

    def params(self, w: torch.Tensor, imp: torch.Tensor | None = None):
        w = w.float().contiguous()
        if not torch.isfinite(w).all():
            raise ValueError("weights contain NaN or Inf")
        b = self.kq.quantize(self.name, w)
        s, m, off, sub, nmax = self.kq.block_grid(self.name, b)
        return b, s, m, off, sub, nmax, self.kq.block_codes(self.name, b).float()

    def round(self, w: torch.Tensor, p, j: int):
        """As llama.cpp's final rounding: nearest_int((x + m) / s), a true division; a sub-block
        with s = 0 keeps the encoder's own code (its values are -m whatever the code)."""
        _, s, m, off, sub, nmax, own = p
        sj, mj = s[:, j // sub], m[:, j // sub]
        nz = sj != 0
        q = torch.round((w + mj) / torch.where(nz, sj, torch.ones_like(sj))) + off
        q = torch.where(nz, q.clamp(0, nmax), own[:, j])
        return q, (q - off) * sj - mj


@dataclass
class LegacyBlocks:
    """A weight on a llama.cpp block grid: codes uint8 [out, in] (unsigned; q8_0 stored +128),
    d and m float32 [out, in/32] (fp16 values)."""
    name: str
    codes: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None

    def to_bytes(self) -> torch.Tensor:
        """uint8 [out, row_bytes]: the GGUF rows."""
        out_f, in_f = self.codes.shape
        out = None
        step = max(1, (1 << 22) // in_f)          # rows per encode: bounded temporaries
        for r0 in range(0, out_f, step):
            r1 = min(r0 + step, out_f)
            b = encode_legacy_blocks(self.name, self.codes[r0:r1].reshape(-1, 32), self.d[r0:r1].reshape(-1),
                                     None if self.m is None else self.m[r0:r1].reshape(-1))
            if out is None:
                out = torch.empty(out_f, b.numel() // (r1 - r0), dtype=torch.uint8)
            out[r0:r1] = b.reshape(r1 - r0, -1)
        return out if out is not None else torch.empty(0, 0, dtype=torch.uint8)

    def split_rows(self, rows: list[int]) -> list["LegacyBlocks"]:
        ms = self.m.split(rows) if self.m is not None else [None] * len(rows)
        return [LegacyBlocks(self.name, c, d, m) for c, d, m in zip(self.codes.split(rows), self.d.split(rows), ms)]

    def dequantize(self) -> torch.Tensor:
        out_f, in_f = self.codes.shape
        q = self.codes.reshape(out_f, -1, 32).float()
        d = self.d[..., None]
        _, offset, has_min = LEGACY_GRIDS[self.name]
        w = q * d + self.m[..., None] if has_min else (q - offset) * d
        return w.reshape(out_f, in_f)


@dataclass
class KBlocks:
    """A weight as llama.cpp K-quant bytes: data uint8 [out, row_bytes]."""
    name: str
    data: torch.Tensor
    shape: tuple[int, int]

    def to_bytes(self) -> torch.Tensor:
        return self.data

    def split_rows(self, rows: list[int]) -> list["KBlocks"]:
        return [KBlocks(self.name, d, (r, self.shape[1])) for d, r in zip(self.data.split(rows), rows)]

    def dequantize(self) -> torch.Tensor:
        from ..codecs import kquants
        return kquants.dequantize(self.name, self.data.reshape(-1), self.shape)


@dataclass
class GPTQResult:
    weight: QuantizedWeight | LegacyBlocks | KBlocks
    dequantized: torch.Tensor       # Ŵ float32 [out, in], exactly weight.dequantize()
    damp: float                     # the dampening ratio finally used
    loss: float                     # Σ (w - q)² / Hinv_jj² / 2, GPTQ's own error estimate


# ---- solver ------------------------------------------------------------------------------------
# Triangular inverses up to this size are one triangular solve against the identity (LAPACK's
# trsm, n³ flops); larger ones split in halves, so most of the work is matrix products (2n³/3
# flops, at the matmul rate). Hessians up to 4096 wide (all of Gemma-3-270M's, a 7B model's
# attention and gate/up inputs) stay on the first path, bit for bit as before; the MLP down
# projections of 7B and larger models (11008, 13824 inputs) take the second.
_TRI_INV_LEAF = 4096


def _invert_upper(R: torch.Tensor, out: torch.Tensor, leaf: int = _TRI_INV_LEAF) -> None:
    """out <- R^-1 for an upper-triangular R (out is upper triangular too, zeros below).
    Blockwise, [[A, B], [0, C]]^-1 = [[A^-1, -A^-1 B C^-1], [0, C^-1]], the halves recursively."""
    n = R.shape[0]
    if n <= leaf:
        out.copy_(torch.linalg.solve_triangular(R, torch.eye(n, dtype=R.dtype), upper=True))
        return
    k = (n // 2 + 127) // 128 * 128                  # block edges on 128-column boundaries
    _invert_upper(R[:k, :k], out[:k, :k], leaf)
    _invert_upper(R[k:, k:], out[k:, k:], leaf)
    t = out[:k, :k] @ R[:k, k:]                      # A^-1 B
    torch.matmul(t, out[k:, k:], out=out[:k, k:])
    del t
    out[:k, k:].neg_()
    out[k:, :k].zero_()


def _inverse_cholesky(box: list, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + damp·mean(diag H)·I)^-1 (Hinv = Uᵀ U), raising damp x10
    (with a warning) while the factorisation fails: a rank-deficient H (fewer calibration tokens
    than inputs, duplicated features) is common, and more dampening is the standard remedy.

    U comes from one Cholesky and one triangular solve: with J the reversal permutation,
    chol(J H J) = L' gives H = R Rᵀ with R = J L' J upper triangular, so H^-1 = R^-ᵀ R^-1 and
    U = R^-1 (`_invert_upper` past _TRI_INV_LEAF columns). The textbook route
    (cholesky_inverse, then a second Cholesky) costs two factorisations, and torch's
    cholesky_inverse measured 20-40x slower with 2 threads on a loaded 2-core machine.

    `box` holds J H J (H flipped on both axes) and is emptied: the factorisation owns that copy
    and frees it as soon as it has L, so a large Hessian is held at most three times at once."""
    Hd = box.pop()
    n = Hd.shape[0]
    diag0 = torch.diagonal(Hd).clone()
    mean_diag = float(diag0.mean())
    ratio = damp
    for _ in range(_MAX_DAMP_TRIES):
        torch.diagonal(Hd).copy_(diag0 + ratio * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            del Hd
            Lf = L.flip(0, 1)
            del L
            if n <= _TRI_INV_LEAF:
                eye = torch.eye(n, dtype=Lf.dtype)
                U = torch.linalg.solve_triangular(Lf, eye, upper=True)
                del eye
            else:
                U = torch.empty_like(Lf)
                _invert_upper(Lf, U)
            if torch.isfinite(U).all():
                return U, ratio
            del U                              # rare: rebuild the flipped H from its factor, retry
            L = Lf.flip(0, 1)
            del Lf
            Hd = L @ L.t()
        del L
        new = ratio * 10 if ratio > 0 else DEFAULT_DAMP
        warnings.warn(f"GPTQ: Hessian is not positive definite with damp {ratio:g}; raising damp to {new:g}",
                      RuntimeWarning, stacklevel=3)
        ratio = new
    raise ValueError(f"GPTQ: Hessian could not be factorised even with damp {ratio / 10:g} "
                     "(the calibration activations are degenerate)")


def _make_grid(grid, in_f: int, config: GPTQConfig):
    if isinstance(grid, QuantSpec):
        return _IntGrid(grid, in_f, search=config.scale_search)
    name = grid.lower()
    if name in LEGACY_GRIDS:
        return _LegacyGrid(name, in_f, search=config.scale_search)
    return _KGrid(name, in_f)


# rows solved at a time: GPTQ's rows are independent given Hinv, so one factorisation serves
# every chunk and memory holds a few chunk-sized copies, not several copies of the whole matrix
_CHUNK_ELEMENTS = 16 * 1024 * 1024


def quantize_weight(W: torch.Tensor, H: torch.Tensor, grid: QuantSpec | str,
                    config: GPTQConfig = GPTQConfig()) -> GPTQResult:
    """GPTQ of W [out, in] given H [in, in]; `grid` a QuantSpec or a llama.cpp type name
    (legacy: q4_0 q4_1 q5_0 q5_1 q8_0; K-quants: q6_k q5_k q4_k q3_k q2_k)."""
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"W {tuple(W.shape)} and H {tuple(H.shape)} do not match")
    out_f, in_f = W.shape
    g = _make_grid(grid, in_f, config)
    if not torch.isfinite(W).all():
        raise ValueError("weights contain NaN or Inf")
    H = H.to(WORK_DTYPE).clone()
    if not torch.isfinite(H).all():
        raise ValueError("Hessian contains NaN or Inf")
    if config.shrink > 0:
        diag = torch.diagonal(H).clone()
        H.mul_(1 - config.shrink)
        H.diagonal().add_(diag, alpha=config.shrink)
    dead = torch.diagonal(H) == 0               # inputs never active: their weights do not matter
    H[dead, dead] = 1
    any_dead = bool(dead.any())

    if config.act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        H = H[perm][:, perm]
    else:
        perm = torch.arange(in_f)
    box = [H.flip(0, 1)]
    del H
    Hinv, damp = _inverse_cholesky(box, config.damp)
    # a column's error costs (w - q)² / [U]_jj² in GPTQ's loss: its importance in a block search
    # (in visiting order; act-order's static groups index it through inv_perm). Weighting by
    # diag(H) instead, the raw activation energy, measured worse, out of domain most (BENCHMARKS.md).
    importance = torch.diagonal(Hinv).pow(-2)
    inv_perm = torch.argsort(perm)
    perm_l = perm.tolist()
    n_groups = in_f // g.width
    chunk = max(1, _CHUNK_ELEMENTS // in_f)
    n_threads = torch.get_num_threads()       # the column loop runs on one; a large block search on all
    # full-matrix codes for the formats that keep them (legacy blocks as bytes: 0..255 fit)
    codes_i = None if isinstance(g, _KGrid) else \
        torch.empty(out_f, in_f, dtype=torch.int32 if isinstance(g, _IntGrid) else torch.uint8)
    deq = torch.empty(out_f, in_f, dtype=WORK_DTYPE)
    pieces: list = []
    loss = 0.0
    for r0 in range(0, out_f, chunk):
        r1 = min(r0 + chunk, out_f)
        Wc = W[r0:r1].to(WORK_DTYPE).clone()
        if any_dead:
            Wc[:, dead] = 0
        params: list = [None] * n_groups
        if config.act_order:
            for gi in range(n_groups):          # static groups, from the original weights
                sl = slice(gi * g.width, (gi + 1) * g.width)
                params[gi] = g.params(Wc[:, sl], importance[inv_perm[sl]])
            Wc = Wc[:, perm]
        codes = torch.zeros(r1 - r0, in_f, dtype=WORK_DTYPE)   # natural column order
        Q = torch.zeros_like(Wc)                               # permuted order
        bs = config.block_size
        for i1 in range(0, in_f, bs):
            i2 = min(i1 + bs, in_f)
            # the block transposed, [column, row]: each step's rank-1 update then touches one
            # contiguous slab instead of a strided slice of every row (measured ~3x faster)
            W1 = Wc[:, i1:i2].t().contiguous()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            with _one_thread():
                for i in range(i2 - i1):
                    col = perm_l[i1 + i]
                    gi = col // g.width
                    if params[gi] is None:          # first column of a group, in natural order
                        ahead = W1[i:i + g.width].t()   # the group's columns: rest of this block, then the next
                        if ahead.shape[1] < g.width:
                            ahead = torch.cat([ahead, Wc[:, i2:i2 + g.width - ahead.shape[1]]], dim=1)
                        if ahead.numel() >= (1 << 16) and n_threads > 1:
                            torch.set_num_threads(n_threads)
                        params[gi] = g.params(ahead, importance[i1 + i:i1 + i + g.width])
                        torch.set_num_threads(1)
                    w = W1[i]
                    q, dq = g.round(w, params[gi], col % g.width)
                    codes[:, col] = q
                    Q[:, i1 + i] = dq
                    err = (w - dq) / Hinv1[i, i]
                    W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)
                    Err1[i] = err
            loss += float(Err1.pow(2).sum()) / 2
            Wc[:, i2:].addmm_(Err1.t(), Hinv[i1:i2, i2:], alpha=-1)
        del Wc
        codes_c = codes.to(torch.int32)
        del codes
        # this chunk's stored weight, decoded, must equal the solver's values: guards any drift
        piece = _weight_piece(g, grid, params, codes_c)
        exact = piece.dequantize()
        solved = Q[:, inv_perm]
        del Q
        if not torch.allclose(solved, exact, rtol=0, atol=1e-6 * (1 + float(exact.abs().max()))):
            raise AssertionError("GPTQ: dequantized codes differ from the solver's values")
        del solved
        deq[r0:r1] = exact
        if codes_i is not None:
            codes_i[r0:r1] = codes_c
        pieces.append(piece)
        del exact, codes_c
    return GPTQResult(_join_pieces(g, grid, pieces, codes_i, (out_f, in_f)), deq, damp, loss)


def _weight_piece(g, grid, params: list, codes: torch.Tensor):
    """The stored form of a chunk of rows from its per-group params and codes."""
    if isinstance(g, _IntGrid):
        scales = torch.stack([p[0] for p in params], dim=1)
        zeros = torch.stack([p[1] for p in params], dim=1)
        return QuantizedWeight(codes, scales.to(grid.scale_dtype), zeros, grid)
    if isinstance(g, _KGrid):
        blocks = torch.stack([p[0] for p in params], dim=1).reshape(-1, params[0][0].shape[1])
        data = g.kq.repack(g.name, blocks, codes.reshape(-1, 256))
        return KBlocks(g.name, data.reshape(codes.shape[0], -1), tuple(codes.shape))
    d16 = torch.stack([p[2] for p in params], dim=1)
    m16 = torch.stack([p[3] for p in params], dim=1) if g.has_min else None
    return LegacyBlocks(g.name, codes.to(torch.uint8), d16, m16)


def _join_pieces(g, grid, pieces: list, codes: torch.Tensor, shape: tuple[int, int]):
    if len(pieces) == 1:
        return pieces[0]
    if isinstance(g, _IntGrid):
        return QuantizedWeight(codes, torch.cat([p.scales for p in pieces]), torch.cat([p.zeros for p in pieces]), grid)
    if isinstance(g, _KGrid):
        return KBlocks(g.name, torch.cat([p.data for p in pieces]), shape)
    return LegacyBlocks(g.name, codes, torch.cat([p.d for p in pieces]),
                        torch.cat([p.m for p in pieces]) if g.has_min else None)
