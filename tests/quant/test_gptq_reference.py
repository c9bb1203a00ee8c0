"""quantize_weight against a slow, obvious GPTQ: Frantar et al. 2022, Algorithm 1 transcribed
plainly in float64 (dampen H, act-order permutation, H^-1 by Cholesky, the upper Cholesky factor
U of H^-1, then a Python loop over the columns: quantize, error / U_jj, update every later
column at once; no lazy batches, no blocking, no row chunks).

Per-group parameters are fixed when the loop reaches a group's first column, from the weights
updated so far (act-order: static groups, from the original weights in natural order). Two ways
of getting them, so the comparison does not depend on quantkit's scale search:

- own: the reference computes them itself with the plain rules (integer grid: min/max with an
  fp16 scale; llama.cpp legacy blocks: its reference quantizer's max-based rule), compared with
  quantkit run with scale_search off: fully independent;
- borrowed: the parameters quantkit chose (its scale search; the K-quants' sub-block scales and
  mins decoded here from the GGUF bytes), and the reference rounds each column onto that grid
  itself: nearest level, clamped to the code range, written from the format.

At a rounding tie the reference takes quantkit's choice and counts it (see TIE below): the
float32 and float64 solvers may round a tie apart, and a row would then go its own way.

Every grid is compared on random weights with outlier columns and a correlated Hessian."""

import pytest
import torch

from quantkit.quant.gptq import GPTQConfig, quantize_weight
from quantkit.quant.rtn import QuantSpec

LEGACY = {"q4_0": (15, 8, False), "q4_1": (15, 0, True), "q5_0": (31, 16, False),
          "q5_1": (31, 0, True), "q8_0": (255, 128, False)}   # levels - 1, offset, has a min
K_TYPES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")


# ---- the one adapter onto quantkit's result ------------------------------------------------
def quantkit_result(res, grid) -> dict:
    """Everything this file reads from a quantkit GPTQResult, as plain tensors: the dequantized
    weight "deq" [out, in], and per grid
      integer: "scale", "zero" [out, groups], "codes" [out, in] (0..2**bits-1);
      legacy:  "d", "m" (None without a min) [out, in/32], fp16 values, "codes" [out, in] as
               stored (unsigned; q8_0 holds code + 128);
      K-quant: "data" uint8 [out, row_bytes], the GGUF rows."""
    w = res.weight
    out = {"deq": res.dequantized.double()}
    if isinstance(grid, QuantSpec):
        out.update(scale=w.scales.double(), zero=w.zeros.double(), codes=w.q.double())
    elif grid in LEGACY:
        out.update(d=w.d.double(), m=None if w.m is None else w.m.double(), codes=w.codes.double())
    else:
        out.update(data=w.to_bytes())
    return out


# ---- grids, written from the formats ---------------------------------------------------------
# Rounding at a tie. quantkit solves in float32 with lazy batches, the reference in float64 one
# column at a time: the same weight differs between them by float error (a few 1e-6 of a level
# typically), so where a value sits on a rounding tie the two may round apart, both correctly;
# the rows would then follow different, equally valid, trajectories, and nothing after that
# could be compared. So at a tie the reference takes quantkit's choice and counts it: a code
# where its unrounded position x is within TIE of k + 1/2 and quantkit's code is one of the two
# levels around x; an fp16 scale (or min) where the float value is within TIE_F16 (relative) of
# the midpoint between its own fp16 rounding and quantkit's stored value (an integer zero point:
# as a code). The two were seen to round apart at most 6e-5 of a level from a tie (these
# problems, and three more seeds of each); TIE is 16x that, and the window it leaves, 1/500 of
# a level, would not hide a rounding rule that differed from the format's anywhere but at ties.
# Without following, one tie costs its row 30-100 codes and the objective up to 1e-2.
TIE = 1e-3
TIE_F16 = 1e-4


class Grid:
    """A grid: `width` columns per group; params(g, w) for group g from its current weights w
    [rows, width]; position(w, p, j) for column j of a group: x, the unrounded code; value(q, p,
    j): what code q decodes to; codes lo..hi. `kit` holds quantkit's codes (natural column
    order), which the reference follows at a tie."""

    lo = 0

    def __init__(self, kit_codes):
        self.kit = kit_codes
        self.followed: list[float] = []       # |x - (k + 1/2)| of each code taken from quantkit
        self.followed_f16 = 0                 # fp16 parameters taken from quantkit

    def round(self, w, p, col):
        """(code, value) of column col: the nearest level, clamped to the code range."""
        j = col % self.width
        x = self.position(w, p, j)
        q = torch.round(x).clamp(self.lo, self.hi)
        k = self.kit[:, col]
        below = torch.floor(x).clamp(self.lo, self.hi)
        around = (k == below) | (k == (torch.floor(x) + 1).clamp(self.lo, self.hi))
        tie = ((x - torch.floor(x) - 0.5).abs() < TIE) & around & (k != q)
        if bool(tie.any()):
            self.followed += (x - torch.floor(x) - 0.5).abs()[tie].tolist()
            q = torch.where(tie, k, q)
        return q, self.value(q, p, j)

    def f16(self, v, kit):
        """v rounded to fp16, or quantkit's stored fp16 value where v is at the tie between them."""
        v16 = v.half().double()
        tie = (kit != v16) & ((v - (v16 + kit) / 2).abs() < TIE_F16 * v.abs())
        self.followed_f16 += int(tie.sum())
        return torch.where(tie, kit, v16)


class IntGrid(Grid):
    """rtn.QuantSpec's grid, (q - z) * s with q in 0..2**bits - 1. own: (s, z) by the min/max
    rule (0 kept in range; s rounded to fp16 first); else quantkit's."""

    def __init__(self, spec: QuantSpec, r, own: bool):
        super().__init__(r["codes"])
        self.spec, self.width, self.hi = spec, spec.group_width(r["codes"].shape[1]), 2**spec.bits - 1
        self.r, self.own = r, own

    def params(self, g, w):
        ks, kz = self.r["scale"][:, g], self.r["zero"][:, g]
        if not self.own:
            return ks, kz
        mn, mx = w.min(1).values.clamp(max=0), w.max(1).values.clamp(min=0)
        if self.spec.sym:
            s = self.f16(torch.maximum(-mn, mx) / (self.hi / 2), ks)
            return s, torch.full_like(s, 2 ** (self.spec.bits - 1))
        s = self.f16((mx - mn) / self.hi, ks)
        x = -mn / s
        z = torch.round(x).clamp(self.spec.zero_min, self.hi)
        tie = ((x - torch.floor(x) - 0.5).abs() < TIE) & ((kz - x).abs() < 0.5 + TIE) & (kz != z)
        self.followed_f16 += int(tie.sum())
        return s, torch.where(tie, kz, z)

    def position(self, w, p, j):
        return w / p[0] + p[1]

    def value(self, q, p, j):
        return (q - p[1]) * p[0]


class LegacyGrid(Grid):
    """llama.cpp's Q4_0 Q4_1 Q5_0 Q5_1 Q8_0, blocks of 32: code = clamp(round(w / d) + offset),
    value = (code - offset) d16, or with a min code = clamp(round((w - min) / d)), value =
    code d16 + m16. own: as llama.cpp's reference quantizer sets them, symmetric d = (signed
    value of largest magnitude) / -offset (Q8_0: max|w| / 127), with a min d = (max - min) /
    levels, the codes from the float d and min, the values from their fp16 copies; else
    quantkit's fp16 d and m for both."""

    width = 32

    def __init__(self, name, r, own: bool):
        super().__init__(r["codes"])
        self.name, self.r, self.own = name, r, own
        self.hi, self.offset, self.has_min = LEGACY[name]

    def params(self, g, w):
        kd = self.r["d"][:, g]
        km = self.r["m"][:, g] if self.has_min else torch.zeros_like(kd)
        if not self.own:
            return kd, km, kd, km
        if self.has_min:
            mn = w.min(1).values
            d = (w.max(1).values - mn) / self.hi
            return d, mn, self.f16(d, kd), self.f16(mn, km)
        if self.name == "q8_0":
            d = w.abs().max(1).values / 127
        else:
            d = w.gather(1, w.abs().argmax(1, keepdim=True)).squeeze(1) / -self.offset
        return d, torch.zeros_like(d), self.f16(d, kd), km

    def position(self, w, p, j):
        d, mn = p[0], p[1]
        return (w - mn) / d if self.has_min else w / d + self.offset

    def value(self, q, p, j):
        d16, m16 = p[2], p[3]
        return q * d16 + m16 if self.has_min else (q - self.offset) * d16


# K-quant layouts (ggml-common.h): bytes per 256-weight block, sub-block width, highest code,
# code offset.
K_LAYOUT = {"q2_k": (84, 16, 3, 0), "q3_k": (110, 16, 7, 4), "q4_k": (144, 32, 15, 0),
            "q5_k": (176, 32, 31, 0), "q6_k": (210, 16, 63, 32)}


def k_subblock_grid(name: str, data: torch.Tensor, rows: int):
    """GGUF K-quant rows -> (s, m) float64 [rows, in / sub]: every weight of a sub-block
    decodes as (code - offset) * s - m (dequantize_row_<name> of ggml-quants.c)."""
    size = K_LAYOUT[name][0]
    b = data.reshape(-1, size)
    f16 = lambda at: b[:, at:at + 2].contiguous().view(torch.float16).double()   # noqa: E731
    u = b.to(torch.int64)
    if name == "q6_k":                     # ql[128] qh[64] int8 scales[16] d
        s = f16(208) * b[:, 192:208].contiguous().view(torch.int8).double()
        m = torch.zeros_like(s)
    elif name in ("q4_k", "q5_k"):         # d dmin scales[12] ...: a 6-bit scale and min per sub-block
        q = u[:, 4:16]
        sc = torch.cat([q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)], 1)
        mn = torch.cat([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], 1)
        s, m = f16(0) * sc.double(), f16(2) * mn.double()
    elif name == "q3_k":                   # hmask[32] qs[64] scales[12] d: 6-bit scales, minus 32
        q = u[:, 96:108]
        j = torch.arange(16)
        low = torch.where(j < 8, q[:, j % 8] & 0xF, q[:, j % 8] >> 4)
        high = (q[:, 8 + j % 4] >> (2 * (j // 4))) & 3
        s = f16(108) * ((low | (high << 4)) - 32).double()
        m = torch.zeros_like(s)
    else:                                  # q2_k: scales[16] (scale | min << 4) qs[64] d dmin
        q = u[:, 0:16]
        s, m = f16(80) * (q & 0xF).double(), f16(82) * (q >> 4).double()
    return s.reshape(rows, -1), m.reshape(rows, -1)


class KGrid(Grid):
    """A K-quant super-block of 256 on quantkit's sub-block grids (decoded from its bytes):
    code = clamp(round((w + m) / s) + offset), value = (code - offset) s - m. A sub-block with
    s = 0 decodes to -m whatever its code: its code counts as -1 on both sides."""

    width = 256

    def __init__(self, name, r):
        _, self.sub, self.hi, self.off = K_LAYOUT[name]
        self.s, self.m = k_subblock_grid(name, r["data"], r["deq"].shape[0])
        super().__init__(self.codes_of(r["deq"]))
        self.per = 256 // self.sub

    def codes_of(self, deq):
        """The codes of a weight on these grids, from its values."""
        s = self.s.repeat_interleave(self.sub, 1)
        m = self.m.repeat_interleave(self.sub, 1)
        nz = s != 0
        q = (torch.round((deq + m) / torch.where(nz, s, torch.ones_like(s))) + self.off).clamp(0, self.hi)
        return torch.where(nz, q, torch.full_like(q, -1.0))

    def params(self, g, w):
        return self.s[:, g * self.per:(g + 1) * self.per], self.m[:, g * self.per:(g + 1) * self.per]

    def position(self, w, p, j):
        s, m = p[0][:, j // self.sub], p[1][:, j // self.sub]
        return (w + m) / torch.where(s != 0, s, torch.ones_like(s)) + self.off

    def value(self, q, p, j):
        s, m = p[0][:, j // self.sub], p[1][:, j // self.sub]
        return (q - self.off) * s - m

    def round(self, w, p, col):
        q, v = super().round(w, p, col)
        s = p[0][:, (col % 256) // self.sub]
        return torch.where(s != 0, q, torch.full_like(q, -1.0)), v


# ---- the reference ---------------------------------------------------------------------------
def reference_gptq(W, H, quantizer, damp, group_size, act_order):
    """Algorithm 1 of Frantar et al. (2022) in float64, one column at a time: the codes and the
    quantized weight Q [rows, n], natural column order. `quantizer` is a Grid."""
    W = W.double().clone()
    H = H.double().clone()
    rows, n = W.shape
    H += damp * H.diagonal().mean() * torch.eye(n, dtype=H.dtype)
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(n)
    params = {}
    if act_order:                          # static groups: the original weights, natural order
        for g in range(n // group_size):
            params[g] = quantizer.params(g, W[:, g * group_size:(g + 1) * group_size])
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    U = torch.linalg.cholesky(Hinv, upper=True)
    codes, Q = torch.zeros_like(W), torch.zeros_like(W)
    for j in range(n):
        col = int(perm[j])
        g = col // group_size
        if g not in params:                # a group's first column: its columns, updated so far
            params[g] = quantizer.params(g, W[:, j:j + group_size])
        q, v = quantizer.round(W[:, j], params[g], col)
        codes[:, col], Q[:, col] = q, v
        err = (W[:, j] - v) / U[j, j]
        W[:, j + 1:] -= err[:, None] * U[j, j + 1:][None, :]
    return codes, Q


# ---- problems --------------------------------------------------------------------------------
ROWS = 32


def problem(seed, n, rows=ROWS):
    """Weights with a few outlier columns; H = XᵀX / N for activations whose columns share n/8
    common factors, with some outlier channels, as a transformer layer's inputs do (the
    dampened H has a condition number of a few thousand)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, n, generator=g) * 0.05
    W[:, torch.randperm(n, generator=g)[:4]] *= 8
    N = 2 * n
    X = torch.randn(N, n // 8, generator=g) @ torch.randn(n // 8, n, generator=g) + 0.3 * torch.randn(N, n, generator=g)
    X[:, torch.randperm(n, generator=g)[:4]] *= 5
    return W, (X.double().t() @ X.double() / N).float()


def hessian_error(W, Q, H):
    """GPTQ's objective, tr((W - Q) H (W - Q)ᵀ), in float64."""
    D = W.double() - Q.double()
    return float(torch.einsum("ri,ij,rj->", D, H.double(), D))


def check(W, H, res, grid, config, make_grid):
    """The reference on quantkit's result `res`: the number of codes that differ beyond a tie
    (0 for a match, once the tolerances below are asserted)."""
    r = quantkit_result(res, grid)
    ref = make_grid(r)
    codes, Q = reference_gptq(W, H, ref, config.damp, ref.width, config.act_order)
    n_diff = int((codes != ref.kit).sum())
    if n_diff:
        return n_diff
    # Codes: the reference rounded apart from quantkit on at most 0.1% of the weights, each
    # within TIE of a tie (there it followed quantkit); its own rules chose the rest.
    assert len(ref.followed) <= 1e-3 * W.numel(), len(ref.followed)
    assert all(t < TIE for t in ref.followed)
    # own parameters: an fp16 (or zero-point) tie at most in 1% of the groups (or one)
    assert ref.followed_f16 <= max(1, 0.01 * W.numel() / ref.width), ref.followed_f16
    # Values: with codes and parameters equal, quantkit's float32 values are the reference's up
    # to float32 rounding (exact for the integer and legacy grids, s * (code - offset) - m in
    # float32 for K-quants), so the objective agrees to 1e-6 relative: float rounding only.
    assert torch.allclose(r["deq"], Q, rtol=0, atol=1e-6 * float(Q.abs().max()))
    e_kit, e_ref = hessian_error(W, r["deq"], H), hessian_error(W, Q, H)
    assert abs(e_kit - e_ref) <= 1e-6 * e_ref, (e_kit, e_ref)
    return 0


def reference_grid(grid, own: bool):
    """make_grid for check(): the reference's grid for quantkit's `grid`, with its own
    parameters or quantkit's."""
    if isinstance(grid, QuantSpec):
        return lambda r: IntGrid(grid, r, own)
    if grid in LEGACY:
        return lambda r: LegacyGrid(grid, r, own)
    assert not own, "K-quant parameters are always quantkit's"
    return lambda r: KGrid(grid, r)


def run(seed, grid, config, own: bool):
    """check() on a fresh problem: 256 columns (two super-blocks, 512, for K-quants)."""
    W, H = problem(seed, 512 if grid in K_TYPES else 256)
    return check(W, H, quantize_weight(W, H, grid, config), grid, config, reference_grid(grid, own))


# ---- every grid ------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread")      # two long chains of tiny ops per test

INT_SPECS = [QuantSpec(2, 64, False), QuantSpec(3, 32, False), QuantSpec(4, 128, True),
             QuantSpec(4, 128, False), QuantSpec(4, 32, False, zero_min=1), QuantSpec(8, -1, True)]
INT_IDS = [f"int{s.bits}_g{s.group_size}_{'sym' if s.sym else 'asym'}{'_z1' if s.zero_min else ''}" for s in INT_SPECS]
ACT = pytest.mark.parametrize("act", [False, True], ids=["natural", "act_order"])


@ACT
@pytest.mark.parametrize("i", range(len(INT_SPECS)), ids=INT_IDS)
def test_integer_grid_min_max_matches_the_reference(i, act):
    """Fully independent: the reference sets each group's scale and zero itself."""
    assert run(10 + i, INT_SPECS[i], GPTQConfig(act_order=act, scale_search=False), own=True) == 0


@ACT
@pytest.mark.parametrize("i", range(len(INT_SPECS)), ids=INT_IDS)
def test_integer_grid_scale_search_matches_the_reference(i, act):
    """The searched scales and zeros are quantkit's; the rounding and error feedback are checked."""
    assert run(20 + i, INT_SPECS[i], GPTQConfig(act_order=act), own=False) == 0


@ACT
@pytest.mark.parametrize("name", list(LEGACY))
def test_legacy_grid_llama_cpp_rule_matches_the_reference(name, act):
    """Fully independent: the reference sets each block's d (and min) by llama.cpp's rule."""
    assert run(30 + list(LEGACY).index(name), name, GPTQConfig(act_order=act, scale_search=False), own=True) == 0


@ACT
@pytest.mark.parametrize("name", [n for n in LEGACY if n != "q8_0"])   # q8_0 has no search
def test_legacy_grid_scale_search_matches_the_reference(name, act):
    assert run(40 + list(LEGACY).index(name), name, GPTQConfig(act_order=act), own=False) == 0


@ACT
@pytest.mark.parametrize("name", K_TYPES)
def test_k_quant_grid_matches_the_reference(name, act):
    """Sub-block scales and mins are quantkit's (llama.cpp's encoder on the updated weights)."""
    assert run(50 + K_TYPES.index(name), name, GPTQConfig(act_order=act), own=False) == 0


# ---- lazy batches ----------------------------------------------------------------------------
@pytest.mark.parametrize("grid,block", [("q4_k", 48), ("q5_0", 100), (QuantSpec(4, 32, False), 100)],
                         ids=["q4_k-48", "q5_0-100", "int4_g32-100"])
def test_lazy_batches_that_split_groups_with_quantkit_parameters(grid, block):
    """Lazy batches of 48 or 100 columns split the 32- and 256-column groups: the rounding and
    error feedback still match the column-by-column reference (parameters quantkit's)."""
    assert run(60, grid, GPTQConfig(block_size=block), own=False) == 0


@pytest.mark.parametrize("grid,block", [(QuantSpec(4, 64, False), 32), ("q4_0", 16)], ids=["int4_g64-32", "q4_0-16"])
def test_groups_over_whole_lazy_batches_match_the_reference(grid, block):
    """Groups that start where a lazy batch starts and span two: parameters from the updated
    weights, computed by the reference itself."""
    assert run(63, grid, GPTQConfig(scale_search=False, block_size=block), own=True) == 0


@pytest.mark.parametrize("grid", [QuantSpec(4, 32, False), "q4_1"], ids=["int4_g32", "q4_1"])
def test_act_order_static_groups_do_not_depend_on_lazy_batches(grid):
    """Static groups take their parameters from the original weights: lazy batches of 48
    columns, splitting the groups, change nothing."""
    assert run(61, grid, GPTQConfig(act_order=True, scale_search=False, block_size=48), own=True) == 0


@pytest.mark.parametrize("grid,block", [(QuantSpec(4, 32, False), 48), ("q4_1", 48), (QuantSpec(4, 32, False), 100)],
                         ids=["int4_g32-48", "q4_1-48", "int4_g32-100"])
def test_groups_that_straddle_lazy_batches_match_the_reference(grid, block):
    """Natural order, parameters set from the updated weights at a group's first column: with a
    lazy batch that ends inside the group, all of the group's columns must be up to date."""
    assert run(62, grid, GPTQConfig(scale_search=False, block_size=block), own=True) == 0
    # and so the codes do not depend on where the lazy batches end
    W, H = problem(62, 256)
    codes = [quantize_weight(W, H, grid, GPTQConfig(scale_search=False, block_size=bs)).dequantized
             for bs in (32, block, 128)]
    assert torch.allclose(codes[0], codes[1], atol=1e-5) and torch.allclose(codes[0], codes[2], atol=1e-5)


# ---- the comparison has teeth --------------------------------------------------------------
@pytest.mark.parametrize("grid", [QuantSpec(4, 128, False), "q4_0"], ids=["int4_g128", "q4_0"])
def test_a_solver_without_cross_column_updates_fails_the_comparison(grid):
    """quantkit run on diag(H), rounding with no error feedback to later columns, is far from
    GPTQ on H: the comparison must find codes apart well beyond ties."""
    W, H = problem(70, 256)
    cfg = GPTQConfig(scale_search=False)
    res = quantize_weight(W, torch.diag(H.diagonal()), grid, cfg)
    assert check(W, H, res, grid, cfg, reference_grid(grid, own=True)) > 0.05 * W.numel()
