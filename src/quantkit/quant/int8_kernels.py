"""Int8 numerics for dynamic quantization: weights per output channel, activations per row/batch.

Pure functions on torch tensors. Two ways to compute an int8 linear layer:

- "reference": plain torch. Each row (token) is scaled to max |x| = 1, then the activation is
  quantized to uint8 with one scale and zero point for the whole batch (min/max of the batch,
  always containing 0), so the grid is effectively per row; the product of the integer
  matrices is taken in float32 and rescaled. Slow (it converts the int8 weight to float on
  every call) but obvious; the fast path is tested against it.
- "fbgemm": PyTorch's prepacked x86 kernel (`torch.ops.quantized.linear_dynamic`), the same
  integer arithmetic in one fused call. Measured on the 2-core dev box (MiniLM shapes,
  768x384 @ 384x1536): fp32 7.1 ms, fbgemm 4.3 ms, `torch._int_mm` 330-700 ms (its CPU kernel is a
  naive reference loop), `torch._weight_int8pack_mm` 470 ms. So the fbgemm op is the only fast
  int8 matmul in torch 2.13 CPU; `torch.ao.quantization` (the module-swapping front end) is
  deprecated and is not used, only the kernel is.
- "onednn": `onednn::qlinear_pointwise` (the kernel behind torch's x86 inductor int8 path) on
  activations quantized by `torch.quantize_per_tensor_dynamic` (or per row by
  `quantize_per_channel` along rows), bias and optionally GELU fused into its output stage.
  Per tensor at 2,400 rows it beats fbgemm (the GEMM itself ~1.9x fp32 where fbgemm's is
  ~1.5x), but it costs ~0.3 ms more per call at 1-10 rows (LSTM steps) and its per-row form is
  slower than fbgemm's row blocks; MiniLM needs per-row activations for its 0.99 cosine, so
  "auto" stays fbgemm and "onednn" is an explicit choice (benchmarks/encoders_int8_paths.py).

Activations are quantized with a 7-bit range (0..127, "reduce_range"), as fbgemm requires on
x86 without VNNI to keep the 16-bit intermediate sums from saturating; the reference does the
same so the two agree.
"""

from __future__ import annotations

import functools
import warnings

import torch

# Symmetric int8 weights use -127..127 so negation is exact and the fbgemm sums cannot overflow.
WEIGHT_QMAX = 127
ACT_QMAX = 127          # reduce_range: 7-bit activations
# rows per fbgemm call on the per-row path: 256 x 1536 fp32 activations (1.5 MB) stay in cache
# across the row max, the scaling, the kernel and the rescale (256-512 measured best of 64-512)
ROW_BLOCK = 256
KERNELS = ("auto", "onednn", "fbgemm", "reference")


def quantize_weight_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] float -> (int8 [out, in], scale float32 [out]); w ~= q * scale[:, None]."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"expected a 2-D float weight, got {tuple(w.shape)} {w.dtype}")
    w = w.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / WEIGHT_QMAX, torch.ones_like(amax))
    q = torch.clamp(torch.round(w / scale[:, None]), -WEIGHT_QMAX, WEIGHT_QMAX).to(torch.int8)
    return q, scale.to(torch.float32)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


def choose_act_qparams(x: torch.Tensor) -> tuple[float, int]:
    """Asymmetric per-tensor uint8 parameters (scale, zero_point) for the range [0, ACT_QMAX]."""
    lo = min(float(x.min()), 0.0)
    hi = max(float(x.max()), 0.0)
    if hi == lo:
        return 1.0, 0
    scale = (hi - lo) / ACT_QMAX
    zp = int(round(-lo / scale))
    return scale, max(0, min(ACT_QMAX, zp))


def quantize_act(x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    scale, zp = choose_act_qparams(x)
    q = torch.clamp(torch.round(x / scale) + zp, 0, ACT_QMAX)
    return q, scale, zp


def row_scale(x2: torch.Tensor) -> torch.Tensor:
    """max |x| of each row, [rows, 1]. abs().amax(): measured 10x faster on CPU than
    vector_norm(ord=inf) or aminmax, whose row reductions are not vectorised."""
    return x2.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12)


def _row_normalise(x2: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not per_row:
        return x2, None
    s = row_scale(x2)
    return x2 / s, s


def linear_reference(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                     bias: torch.Tensor | None, per_row: bool = True) -> torch.Tensor:
    """Dynamic int8 linear in plain torch: y = r * sx * sw * ((xq - zx) @ wq^T) + b.

    per_row: each row (token) is first divided by its max |x| (r), so the batch-wide uint8
    grid becomes a per-row grid; r multiplies the result back. Without it one outlier token
    sets the step for the whole batch (MiniLM's FFN output layer: mean cosine 0.978 -> 0.996).
    """
    shape = x.shape
    x2, r = _row_normalise(x.reshape(-1, shape[-1]).float(), per_row)
    xq, sx, zx = quantize_act(x2)
    acc = (xq - zx) @ wq.float().t()             # integer values held in float32
    y = acc * (sx * w_scale)[None, :]
    if r is not None:
        y = y * r
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], wq.shape[0])


@functools.cache
def fbgemm_available() -> bool:
    engines = torch.backends.quantized.supported_engines
    if not hasattr(torch.ops, "quantized") or not ({"fbgemm", "x86"} & set(engines)):
        return False
    try:
        q, s = quantize_weight_per_channel(torch.randn(8, 16))
        linear_fbgemm(torch.randn(2, 16), pack_fbgemm(q, s), None)
        return True
    except Exception:  # any failure (no AVX2, op removed) means: use the reference path
        return False


def pack_fbgemm(wq: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None):
    """Prepack an int8 per-channel weight for torch.ops.quantized.linear_dynamic.

    With a bias, the kernel adds it in its output stage (no extra pass over the output); only
    per-tensor activations can use that, since per-row scaling must come before the bias."""
    with warnings.catch_warnings():
        # creating a qint8 tensor is deprecated in 2.13; the kernel it feeds is not
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(
            wq, w_scale.double(), torch.zeros_like(w_scale, dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.detach().float().contiguous())


def linear_fbgemm(x: torch.Tensor, packed, bias: torch.Tensor | None, per_row: bool = True) -> torch.Tensor:
    """Same arithmetic as linear_reference in one fbgemm call per block of rows.

    Per row, the passes around the kernel (row max, x / r, r * y + b) are what int8 costs
    beyond the GEMM; run over a whole batch (2,400 tokens x 1,536) they went to memory and
    ate half to two thirds of what the int8 GEMM saved over fp32 (1 thread). Blocks of
    ROW_BLOCK rows keep x, x / r and y in cache between the passes and the kernel, and
    r * y + b is written straight into the output (addcmul, no temporary): MiniLM at batch 32,
    1 thread, 1.06x -> 1.29x faster than fp32. Per tensor there are no extra passes: pack the bias into
    `packed` (pack_fbgemm(..., bias)) and pass bias=None here.
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.dtype != torch.float32:
        x2 = x2.float()
    x2 = x2.contiguous()
    op = torch.ops.quantized.linear_dynamic
    if not per_row:
        y = op(x2, packed, True)
        if bias is not None:
            y = y.add_(bias)
        return y.reshape(*shape[:-1], y.shape[-1])
    rows = x2.shape[0]
    y = None
    for i in range(0, max(rows, 1), ROW_BLOCK):
        xs = x2[i:i + ROW_BLOCK]
        r = row_scale(xs)
        ys = op(xs / r, packed, True)
        if y is None:
            if rows <= ROW_BLOCK:
                y = ys.mul_(r) if bias is None else torch.addcmul(bias, ys, r, out=ys)
                break
            y = x2.new_empty(rows, ys.shape[1])
        if bias is None:
            torch.mul(ys, r, out=y[i:i + ROW_BLOCK])
        else:
            torch.addcmul(bias, ys, r, out=y[i:i + ROW_BLOCK])
    return y.reshape(*shape[:-1], y.shape[-1])


def resolve_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    if kernel == "auto":
        return "fbgemm" if fbgemm_available() else "reference"
    if kernel == "fbgemm" and not fbgemm_available():
        raise RuntimeError("the fbgemm int8 kernel is not available in this torch build")
    if kernel == "onednn" and not onednn_available():
        raise RuntimeError("the oneDNN int8 kernel is not available in this torch build")
    return kernel


def quantize_rows_symmetric(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Embedding tables: one scale per row (per token), symmetric int8."""
    return quantize_weight_per_channel(w)


# ---- oneDNN ---------------------------------------------------------------------------
# Activations to uint8 with a 7-bit range here too: oneDNN's AVX2 int8 GEMM (no VNNI) also sums
# u8 x s8 pairs in 16 bits (vpmaddubsw), so 127 * 127 * 2 must not overflow.
ROW_ZERO_POINT = 64     # per-row grid: symmetric, steps of max|x| / 63 around 64


@functools.cache
def onednn_available() -> bool:
    if not hasattr(torch.ops, "onednn") or not torch.backends.mkldnn.is_available():
        return False
    try:
        q, s = quantize_weight_per_channel(torch.randn(8, 16))
        p = pack_onednn(q)
        for per_row in (True, False):
            linear_onednn(torch.randn(3, 16), p, s, torch.zeros(8), per_row)
        return True
    except Exception:   # op missing or unsupported CPU: the fbgemm / reference paths remain
        return False


def pack_onednn(wq: torch.Tensor):
    return torch.ops.onednn.qlinear_prepack(wq, None)


def linear_onednn(x: torch.Tensor, packed, w_scale: torch.Tensor, bias: torch.Tensor | None,
                  per_row: bool = True, post_op: str = "none") -> torch.Tensor:
    """Dynamic int8 linear through oneDNN's int8 matmul (`onednn::qlinear_pointwise`, fp32 out).

    Per tensor: torch's fused dynamic quantizer (one min/max pass, one rounding pass), then the
    kernel adds the bias and, with post_op="gelu", applies GELU (erf) in its output stage, so a
    BERT FFN's first layer costs no pass beyond the GEMM. Per row: each row quantized on its own
    symmetric grid (quantize_per_channel along rows), the GEMM run with scale 1, and the row
    scales and the bias applied in one addcmul; no fused activation (it must follow the rescale).
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.dtype != torch.float32:
        x2 = x2.float()
    x2 = x2.contiguous()
    op = torch.ops.onednn.qlinear_pointwise
    wz = _zeros_like_scale(w_scale)
    if not per_row:
        q = torch.quantize_per_tensor_dynamic(x2, torch.quint8, True)
        algo = "none" if post_op == "gelu" else ""
        y = op(q.int_repr(), q.q_scale(), q.q_zero_point(), packed, w_scale, wz, bias, 1.0, 0,
               torch.float32, post_op, [], algo)
        return y.reshape(*shape[:-1], y.shape[-1])
    if post_op != "none":
        raise ValueError("a fused activation needs per-tensor activations")
    s = row_scale(x2).div_(ROW_ZERO_POINT - 1)                     # [rows, 1]
    zp = torch.full((x2.shape[0],), ROW_ZERO_POINT, dtype=torch.long)
    xq = torch.quantize_per_channel(x2, s.view(-1), zp, 0, torch.quint8).int_repr()
    y = op(xq, 1.0, ROW_ZERO_POINT, packed, w_scale, wz, None, 1.0, 0, torch.float32, "none", [], "")
    y = y.mul_(s) if bias is None else torch.addcmul(bias, y, s, out=y)
    return y.reshape(*shape[:-1], y.shape[-1])


_ZEROS: dict[int, torch.Tensor] = {}


def _zeros_like_scale(w_scale: torch.Tensor) -> torch.Tensor:
    n = w_scale.numel()
    z = _ZEROS.get(n)
    if z is None:
        z = _ZEROS[n] = torch.zeros(n, dtype=torch.long)
    return z
