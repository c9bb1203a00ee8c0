"""GPTQ (Frantar et al., 2022): quantize a linear weight column by column, spreading each
column's rounding error over the columns not yet quantized through the inverse Hessian of the
layer's reconstruction loss ||WX - ŴX||².

Statistics apart from solving: `accumulate_hessian(x, H, n)` folds calibration activations into
H = 2/n Σ x xᵀ; `quantize_weight(W, H, grid, config)` solves. Hooks (quant.pipeline) only glue.

The grid (codecs.grid.Grid) is either an integer grid (`rtn.QuantSpec`: bits, group size, sym;
GPTQ/compressed-tensors checkpoints; rtn.IntGrid) or a GGUF type with a registered grid
(codecs.registry: legacy blocks "q4_0" .. "q8_0", K-quants "q6_k" .. "q2_k", IQ4_NL / IQ4_XS and
the lattice types IQ3_S, IQ3_XXS, IQ2_S, IQ2_XS, IQ2_XXS, IQ1_S, IQ1_M), in which case each
block's scale (and min) is fixed, by llama.cpp's own rule, from the partially updated weights
just before the block's first column is quantized, and the columns are then rounded onto that
block's grid exactly as llama.cpp's reference quantizer rounds. The result is a stock GGUF block
that llama.cpp decodes at full speed. On a lattice type a group of 4 or 8 columns takes one
codebook entry together (codecs.grid.GroupGrid: `round_group`), chosen from the group's updated
columns; its columns' errors are then spread one at a time as usual.

Groups: without act-order a group's parameters come from the weights updated by every column
solved before the group's first column (Algorithm 1 of the paper; a group that runs past a lazy
batch gets the batch's pending updates first, so the result does not depend on block_size); with act-order the
columns are visited by decreasing diag(H) and the groups are *static*: parameters are computed
once from the original weights in natural column order, so g_idx stays i // group_size and the
checkpoint needs no reordering at run time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from dataclasses import dataclass, field

import torch

from .. import recipe
from ..codecs.grid import Grid
from ..codecs.kquants import KBlocks
from ..codecs.legacy import LegacyBlocks
from ..codecs.registry import qtype
from .rtn import IntGrid, QuantizedWeight, QuantSpec

# Working precision of the Hessian, its inverse and the weights being updated. float32, as the
# GPTQ reference and llm-compressor: float64 doubles time and memory for no measurable gain once
# the Hessian is dampened; bf16/fp16 make the Cholesky fail.
WORK_DTYPE = torch.float32

DEFAULT_DAMP = recipe.DEFAULT_DAMP   # fraction of mean(diag(H)) added to the diagonal
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
    # mixtures of experts (quant.moe): an expert routed fewer calibration tokens than this is
    # solved on its Hessian mixed with the layer's pooled one; None: max(16, hidden // 8)
    moe_min_tokens: int | None = None

    def __post_init__(self):
        if self.damp < 0:
            raise ValueError(f"damp must be >= 0, got {self.damp}")
        if not 0.0 <= self.shrink <= 1.0:
            raise ValueError(f"shrink must be in [0, 1], got {self.shrink}")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.moe_min_tokens is not None and self.moe_min_tokens < 1:
            raise ValueError(f"moe_min_tokens must be at least 1, got {self.moe_min_tokens}")


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
# attention and gate/up inputs) stay on the first path, one solve; the MLP down
# projections of 7B and larger models (11008, 13824 inputs) take the second.
TRI_INV_LEAF = 4096


def invert_upper(R: torch.Tensor, out: torch.Tensor, leaf: int = TRI_INV_LEAF) -> None:
    """out <- R^-1 for an upper-triangular R (out is upper triangular too, zeros below).
    Blockwise, [[A, B], [0, C]]^-1 = [[A^-1, -A^-1 B C^-1], [0, C^-1]], the halves recursively."""
    n = R.shape[0]
    if n <= leaf:
        out.copy_(torch.linalg.solve_triangular(R, torch.eye(n, dtype=R.dtype), upper=True))
        return
    k = (n // 2 + 127) // 128 * 128                  # block edges on 128-column boundaries
    invert_upper(R[:k, :k], out[:k, :k], leaf)
    invert_upper(R[k:, k:], out[k:, k:], leaf)
    t = out[:k, :k] @ R[:k, k:]                      # A^-1 B
    torch.matmul(t, out[k:, k:], out=out[:k, k:])
    del t
    out[:k, k:].neg_()
    out[k:, :k].zero_()


def inverse_cholesky(box: list, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + damp·mean(diag H)·I)^-1 (Hinv = Uᵀ U), raising damp x10
    (with a warning) while the factorisation fails: a rank-deficient H (fewer calibration tokens
    than inputs, duplicated features) is common, and more dampening is the standard remedy.

    U comes from one Cholesky and one triangular solve: with J the reversal permutation,
    chol(J H J) = L' gives H = R Rᵀ with R = J L' J upper triangular, so H^-1 = R^-ᵀ R^-1 and
    U = R^-1 (`invert_upper` past TRI_INV_LEAF columns). The textbook route
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
            if n <= TRI_INV_LEAF:
                eye = torch.eye(n, dtype=Lf.dtype)
                U = torch.linalg.solve_triangular(Lf, eye, upper=True)
                del eye
            else:
                U = torch.empty_like(Lf)
                invert_upper(Lf, U)
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


def make_grid(grid: QuantSpec | str, in_features: int, config: GPTQConfig) -> Grid:
    """The grid of a QuantSpec (integer) or of a GGUF type name (its registered grid)."""
    if isinstance(grid, QuantSpec):
        return IntGrid(grid, in_features, search=config.scale_search)
    try:
        q = qtype(grid)
    except KeyError:
        raise ValueError(f"no GPTQ grid for {grid}") from None
    return q.gptq_grid(in_features, search=config.scale_search)


# rows solved at a time: GPTQ's rows are independent given Hinv, so one factorisation serves
# every chunk and memory holds a few chunk-sized copies, not several copies of the whole matrix
CHUNK_ELEMENTS = 16 * 1024 * 1024


def _prepared_hessian(H: torch.Tensor, config: GPTQConfig):
    """H in working precision, shrunk toward its diagonal, dead inputs set to 1, permuted for
    act-order: (the flipped copy `inverse_cholesky` consumes, dead inputs, visiting order)."""
    in_f = H.shape[0]
    H = H.to(WORK_DTYPE).clone()
    if not torch.isfinite(H).all():
        raise ValueError("Hessian contains NaN or Inf")
    if config.shrink > 0:
        diag = torch.diagonal(H).clone()
        H.mul_(1 - config.shrink)
        H.diagonal().add_(diag, alpha=config.shrink)
    dead = torch.diagonal(H) == 0               # inputs never active: their weights do not matter
    H[dead, dead] = 1
    if config.act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        H = H[perm][:, perm]
    else:
        perm = torch.arange(in_f)
    return [H.flip(0, 1)], dead, perm


@dataclass
class _Solve:
    """What every row chunk of one weight shares: the grid, the inverse Hessian's factor, the
    columns' importance and visiting order."""
    g: Grid
    Hinv: torch.Tensor
    importance: torch.Tensor            # in visiting order
    perm: torch.Tensor
    inv_perm: torch.Tensor
    config: GPTQConfig
    n_threads: int                      # the column loop runs on one; a large block search on all
    perm_list: list = field(init=False)

    def __post_init__(self):
        self.perm_list = self.perm.tolist()

    def static_params(self, Wc: torch.Tensor) -> list:
        """act-order's static groups: every group's parameters from the original weights."""
        w = self.g.width
        return [self.g.params(Wc[:, gi * w:(gi + 1) * w], self.importance[self.inv_perm[gi * w:(gi + 1) * w]])
                for gi in range(Wc.shape[1] // w)]

    def block(self, Wc, i1: int, i2: int, params: list, codes, Q) -> torch.Tensor:
        """Columns i1..i2 (visiting order) of the chunk: quantize each, spread its error over the
        block's later columns. Returns the block's errors scaled by 1/[U]_jj, [column, row]."""
        g, Hinv1, perm_l = self.g, self.Hinv[i1:i2, i1:i2], self.perm_list
        k = getattr(g, "group_width", 1)       # columns that take one codebook entry together
        group = None
        # the block transposed, [column, row]: each step's rank-1 update then touches one
        # contiguous slab instead of a strided slice of every row (measured ~3x faster)
        W1 = Wc[:, i1:i2].t().contiguous()
        Err1 = torch.zeros_like(W1)
        with _one_thread():
            for i in range(i2 - i1):
                col = perm_l[i1 + i]
                gi = col // g.width
                if params[gi] is None:          # first column of a group, in natural order
                    ahead = W1[i:i + g.width].t()   # the group's columns: rest of this block, then the next
                    if ahead.shape[1] < g.width:
                        # a group that runs past this block: its later columns still lack the
                        # updates this block's quantized columns owe them (applied after the block)
                        more = Wc[:, i2:i2 + g.width - ahead.shape[1]]
                        if i:
                            more = more - Err1[:i].t() @ self.Hinv[i1:i1 + i, i2:i2 + more.shape[1]]
                        ahead = torch.cat([ahead, more], dim=1)
                    if ahead.numel() >= (1 << 16) and self.n_threads > 1:
                        torch.set_num_threads(self.n_threads)
                    params[gi] = g.params(ahead, self.importance[i1 + i:i1 + i + g.width])
                    torch.set_num_threads(1)
                w = W1[i]
                if k == 1:
                    q, dq = g.round(w, params[gi], col % g.width)
                else:
                    # a lattice group: its entry chosen once from the group's updated columns,
                    # its columns' errors then spread one at a time as any column's
                    if col % k == 0:
                        group = g.round_group(W1[i:i + k].t(), params[gi], col % g.width, Hinv1[i:i + k, i:i + k])
                    q, dq = group[0][:, col % k], group[1][:, col % k]
                codes[:, col] = q
                Q[:, i1 + i] = dq
                err = (w - dq) / Hinv1[i, i]
                W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)
                Err1[i] = err
        return Err1

    def rows(self, W: torch.Tensor, dead: torch.Tensor | None, loss: float):
        """One chunk of rows W [rows, in]: (its stored form, its values Ŵ, the running loss)."""
        in_f = W.shape[1]
        Wc = W.to(WORK_DTYPE).clone()
        if dead is not None:
            Wc[:, dead] = 0
        params: list = [None] * (in_f // self.g.width)
        if self.config.act_order:
            params = self.static_params(Wc)
            Wc = Wc[:, self.perm]
        codes = torch.zeros(W.shape[0], in_f, dtype=WORK_DTYPE)   # natural column order
        Q = torch.zeros_like(Wc)                                 # visiting order
        bs = self.config.block_size
        for i1 in range(0, in_f, bs):
            i2 = min(i1 + bs, in_f)
            Err1 = self.block(Wc, i1, i2, params, codes, Q)
            loss += float(Err1.pow(2).sum()) / 2
            Wc[:, i2:].addmm_(Err1.t(), self.Hinv[i1:i2, i2:], alpha=-1)
        del Wc
        codes_c = codes.to(torch.int32)
        del codes
        # this chunk's stored weight, decoded, must equal the solver's values: guards any drift
        piece = self.g.stored(params, codes_c)
        exact = piece.dequantize()
        solved = Q[:, self.inv_perm]
        del Q
        if not torch.allclose(solved, exact, rtol=0, atol=1e-6 * (1 + float(exact.abs().max()))):
            raise AssertionError("GPTQ: dequantized codes differ from the solver's values")
        return piece, exact, codes_c, loss


def quantize_weight(W: torch.Tensor, H: torch.Tensor, grid: QuantSpec | str,
                    config: GPTQConfig = GPTQConfig()) -> GPTQResult:
    """GPTQ of W [out, in] given H [in, in]; `grid` a QuantSpec or a GGUF type name with a grid
    (codecs.registry.gptq_types(): legacy q4_0 .. q8_0, K-quants q6_k .. q2_k, IQ4 and the lattice
    IQ3 / IQ2 types; those take neither act-order nor a block size that splits their groups)."""
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"W {tuple(W.shape)} and H {tuple(H.shape)} do not match")
    out_f, in_f = W.shape
    g = make_grid(grid, in_f, config)
    k = getattr(g, "group_width", 1)
    if k > 1 and (config.act_order or config.block_size % k):
        raise ValueError(f"GPTQ on {grid} rounds {k} columns together: it needs natural column order "
                         f"(no act-order) and a block size that is a multiple of {k}")
    if not torch.isfinite(W).all():
        raise ValueError("weights contain NaN or Inf")
    box, dead, perm = _prepared_hessian(H, config)
    Hinv, damp = inverse_cholesky(box, config.damp)
    # a column's error costs (w - q)² / [U]_jj² in GPTQ's loss: its importance in a block search
    # (in visiting order; act-order's static groups index it through inv_perm). Weighting by
    # diag(H) instead, the raw activation energy, measured worse, out of domain most (BENCHMARKS.md).
    solve = _Solve(g, Hinv, torch.diagonal(Hinv).pow(-2), perm, torch.argsort(perm), config,
                   torch.get_num_threads())
    chunk = max(1, CHUNK_ELEMENTS // in_f)
    # full-matrix codes for the formats that keep them (legacy blocks as bytes: 0..255 fit)
    codes_i = None if g.codes_dtype is None else torch.empty(out_f, in_f, dtype=g.codes_dtype)
    deq = torch.empty(out_f, in_f, dtype=WORK_DTYPE)
    pieces: list = []
    loss = 0.0
    any_dead = bool(dead.any())
    for r0 in range(0, out_f, chunk):
        r1 = min(r0 + chunk, out_f)
        piece, exact, codes_c, loss = solve.rows(W[r0:r1], dead if any_dead else None, loss)
        deq[r0:r1] = exact
        if codes_i is not None:
            codes_i[r0:r1] = codes_c
        pieces.append(piece)
        del exact, codes_c
    weight = pieces[0] if len(pieces) == 1 else g.join(pieces, codes_i, (out_f, in_f))
    return GPTQResult(weight, deq, damp, loss)


# ---- many matrices of one shape at once -------------------------------------------------------
# The experts of a mixture of experts are many small matrices of one shape, each on its own
# Hessian. Their column loops run as one: every step's ops act on [E, rows] at once, so the
# Python overhead of the loop's ~10 small ops per column is paid once per batch, not per matrix.
# Every op is the serial solve's, on the same values, so the result is bit-identical to one
# `quantize_weight` call per matrix. The factorisations, the block searches and the lazy-batch
# products stay per matrix (the same calls as the serial solve).

def _cat_params(ps: list):
    """One grid-parameter object for the rows of several (a dataclass of per-row tensors)."""
    first = ps[0]
    return type(first)(**{f.name: torch.cat([getattr(p, f.name) for p in ps])
                          for f in dataclasses.fields(first)})


def batchable(grid: QuantSpec | str, in_features: int, config: GPTQConfig) -> bool:
    """Whether `quantize_weights` solves matrices on this grid as one batch: natural column
    order, one column rounded at a time (not the lattice types), and grid parameters that are a
    dataclass of per-row tensors."""
    if config.act_order:
        return False
    g = make_grid(grid, in_features, config)
    if getattr(g, "group_width", 1) != 1:
        return False
    p = g.params(torch.linspace(-1, 1, 2 * g.width).reshape(2, g.width), torch.ones(g.width))
    return dataclasses.is_dataclass(p) and all(
        isinstance(getattr(p, f.name), torch.Tensor) and getattr(p, f.name).shape[:1] == (2,)
        for f in dataclasses.fields(p))


class _Batch:
    """The column loop of E matrices [E, rows, in] on their own inverse-Hessian factors."""

    def __init__(self, g: Grid, Hinv: torch.Tensor, imp: torch.Tensor, config: GPTQConfig):
        self.g, self.Hinv, self.imp, self.config = g, Hinv, imp, config

    def params(self, W1: torch.Tensor, i: int, imp_at: int) -> list:
        """Each matrix's parameters of the group whose first column is W1's column i, asked for
        matrix by matrix as the serial solve asks, on one thread: a block search is elementwise
        ops and per-row reductions, the same on any number of threads, and a second thread
        spins at every op's barrier when the machine is busy (measured on 2048-row expert downs
        at load 8: 3.48 CPU s per expert with 2 threads, 0.81 with 1)."""
        return [self.g.params(W1[e, i:i + self.g.width].t(), self.imp[e, imp_at:imp_at + self.g.width])
                for e in range(W1.shape[0])]

    def block(self, Wc: torch.Tensor, i1: int, i2: int, params: list, codes, Q) -> torch.Tensor:
        """Columns i1..i2 of every matrix (`_Solve.block`, batched): errors [E, column, row]."""
        g, E, rows = self.g, Wc.shape[0], Wc.shape[1]
        Hinv1 = self.Hinv[:, i1:i2, i1:i2]
        W1 = Wc[:, :, i1:i2].transpose(1, 2).contiguous()
        Err1 = torch.zeros_like(W1)
        # one fused multiply-add per element, as addr_ computes it, exactly when no row is a
        # vector tail; otherwise each matrix's own addr_
        fused = rows % 64 == 0
        with _one_thread():
            for i in range(i2 - i1):
                col = i1 + i
                gi = col // g.width
                if params[gi] is None:          # width divides the block: the group lies in it
                    params[gi] = self.params(W1, i, col)
                    params[gi] = (params[gi], _cat_params(params[gi]))
                w = W1[:, i]
                q, dq = g.round(w.reshape(-1), params[gi][1], col % g.width)
                q, dq = q.view(E, rows), dq.view(E, rows)
                codes[:, :, col] = q
                Q[:, :, col] = dq
                err = (w - dq) / Hinv1[:, i, i, None]
                if fused:
                    W1[:, i:].addcmul_(Hinv1[:, i, i:, None], err[:, None, :], value=-1)
                else:
                    for e in range(E):
                        W1[e, i:].addr_(Hinv1[e, i, i:], err[e], alpha=-1)
                Err1[:, i] = err
        return Err1


def quantize_weights(W: torch.Tensor, H: torch.Tensor, grid: QuantSpec | str,
                     config: GPTQConfig = GPTQConfig()) -> list[GPTQResult]:
    """GPTQ of E matrices W [E, out, in], each on its own H [E, in, in]: one `quantize_weight`
    result per matrix, bit-identical to it, from one column loop over the batch. Grids that are
    not `batchable` (act-order, the lattice types) are solved one matrix after another."""
    if W.dim() != 3 or H.shape != (W.shape[0], W.shape[2], W.shape[2]):
        raise ValueError(f"W {tuple(W.shape)} and H {tuple(H.shape)} do not match")
    E, out_f, in_f = W.shape
    if E == 0:
        return []
    if not batchable(grid, in_f, config) or config.block_size % make_grid(grid, in_f, config).width:
        return [quantize_weight(W[e], H[e], grid, config) for e in range(E)]
    g = make_grid(grid, in_f, config)
    if not torch.isfinite(W).all():
        raise ValueError("weights contain NaN or Inf")
    Hinv = torch.empty(E, in_f, in_f, dtype=WORK_DTYPE)
    damps, Wc = [], W.to(WORK_DTYPE).clone()
    for e in range(E):
        box, dead, _ = _prepared_hessian(H[e], config)
        U, damp = inverse_cholesky(box, config.damp)
        Hinv[e] = U
        del U
        damps.append(damp)
        if bool(dead.any()):
            Wc[e][:, dead] = 0
    b = _Batch(g, Hinv, torch.diagonal(Hinv, dim1=1, dim2=2).pow(-2), config)
    params: list = [None] * (in_f // g.width)
    codes = torch.zeros(E, out_f, in_f, dtype=torch.int32)
    Q = torch.zeros_like(Wc)
    losses = [0.0] * E
    bs = config.block_size
    for i1 in range(0, in_f, bs):
        i2 = min(i1 + bs, in_f)
        Err1 = b.block(Wc, i1, i2, params, codes, Q)
        for e in range(E):
            losses[e] += float(Err1[e].pow(2).sum()) / 2
            Wc[e][:, i2:].addmm_(Err1[e].t(), Hinv[e, i1:i2, i2:], alpha=-1)
    del Wc, Hinv
    out = []
    for e in range(E):
        piece = g.stored([p[0][e] for p in params], codes[e])
        exact = piece.dequantize()
        if not torch.allclose(Q[e], exact, rtol=0, atol=1e-6 * (1 + float(exact.abs().max()))):
            raise AssertionError("GPTQ: dequantized codes differ from the solver's values")
        out.append(GPTQResult(piece, exact, damps[e], losses[e]))
    return out
