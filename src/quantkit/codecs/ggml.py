"""llama.cpp's legacy block types (Q8_0, Q5_1, Q5_0, Q4_1, Q4_0) and the float types, in torch.

Pure functions on block-shaped tensors: `quantize_blocks(name, x[n, 32]) -> uint8[n, type_size]`
and `dequantize_blocks(name, q[n, type_size]) -> float32[n, 32]`. Every rounding step follows
ggml-quants.c's `quantize_row_*_ref` (the path llama-quantize takes without an importance
matrix), operation by operation in float32, so the bytes are llama.cpp's bytes:

- the scale is taken from the first element of largest magnitude (strict `<` in C: first wins);
- `d` is stored as fp16 (round to nearest even) but the inverse `id = 1/d` uses the float32 d;
- `(int8_t)(x*id + 8.5f)` truncates toward zero; `roundf` rounds half away from zero.

A C build may contract `x*id + 8.5f` into one fused multiply-add; where that happens the result
can differ at exact .5 ties (a measured, bounded share of blocks; see tests/test_codecs_ggml.py).
"""

from __future__ import annotations

import torch

from .parallel import finite_checked, map_blocks
from .registry import QType, qtype

BLOCK = 32
SIMPLE_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")


def _u8(t: torch.Tensor) -> torch.Tensor:
    """View a contiguous tensor's bytes as uint8 [n, k*itemsize]."""
    t = t.contiguous()
    return t.view(torch.uint8).reshape(t.shape[0], -1)


def _f16_bytes(v: torch.Tensor) -> torch.Tensor:
    return _u8(v.to(torch.float16).reshape(-1, 1))


def _absmax_signed(x: torch.Tensor) -> torch.Tensor:
    """The value (with its sign) of the first element of largest magnitude in each row.

    From the row max and min (fast reductions); only rows where +a and -a tie need positions."""
    mx = x.amax(dim=1)
    mn = x.amin(dim=1)
    out = torch.where(-mn > mx, mn, mx)
    tie = (-mn == mx) & (mx != 0)
    if bool(tie.any()):
        rows = x[tie]
        idx = rows.abs().argmax(dim=1, keepdim=True)
        out[tie] = rows.gather(1, idx).squeeze(1)
    return out


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))


# Largest float below 0.5: trunc(v + copysign(HALF_DOWN, v)) is C's roundf (halves away from
# zero) for every float, including 0.49999997 where floor(v + 0.5) would give 1.
HALF_DOWN = torch.tensor(0.49999997, dtype=torch.float32)


def _roundf_to_int8(v: torch.Tensor) -> torch.Tensor:
    """C's roundf, then the (int8) store; the conversion truncates toward zero."""
    return v.add_(torch.copysign(HALF_DOWN, v)).to(torch.int8)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """q[n, 32] int8 in 0..15 -> uint8 [n, 16]: byte j holds q[j] (low) and q[j+16] (high)."""
    return (q[:, :16] | (q[:, 16:] << 4)).view(torch.uint8)


def _high_bits(q: torch.Tensor) -> torch.Tensor:
    """Bit 4 of each of 32 values packed into a little-endian uint32 (bit j = value j)."""
    bits = ((q >> 4) & 1).to(torch.int64)
    word = (bits << torch.arange(32, dtype=torch.int64)).sum(dim=1)
    return _u8(word.reshape(-1, 1))[:, :4]


def _trunc_u8(v: torch.Tensor, top: int | None) -> torch.Tensor:
    """(int8_t)(v) for 0 <= v < 32.5, then MIN(top, .): the C casts truncate toward zero.
    Kept as int8 (a fast conversion in torch; float->uint8 is 4x slower): the nibble packing
    below gives the same bits, and the caller views the bytes as uint8."""
    q = v.to(torch.int8)
    return q.clamp_(max=top) if top is not None else q


def _q4_0(x):
    d = _absmax_signed(x) / -8
    q = _trunc_u8((x * _inverse(d)[:, None]).add_(8.5), 15)
    return torch.cat([_f16_bytes(d), _pack_nibbles(q)], dim=1)


def _q5_0(x):
    d = _absmax_signed(x) / -16
    q = _trunc_u8((x * _inverse(d)[:, None]).add_(16.5), 31)
    return torch.cat([_f16_bytes(d), _high_bits(q), _pack_nibbles(q & 15)], dim=1)


def _minmax(x, levels):
    mn = x.min(dim=1).values
    mx = x.max(dim=1).values
    d = (mx - mn) / levels
    return mn, d, _inverse(d)


def _q4_1(x):
    mn, d, idv = _minmax(x, 15)
    q = _trunc_u8((x - mn[:, None]).mul_(idv[:, None]).add_(0.5), 15)
    return torch.cat([_f16_bytes(d), _f16_bytes(mn), _pack_nibbles(q)], dim=1)


def _q5_1(x):
    mn, d, idv = _minmax(x, 31)
    # (uint8_t) cast without a clamp in C; values cannot exceed 31.5 here.
    q = _trunc_u8((x - mn[:, None]).mul_(idv[:, None]).add_(0.5), None)
    return torch.cat([_f16_bytes(d), _f16_bytes(mn), _high_bits(q), _pack_nibbles(q & 15)], dim=1)


def _q8_0(x):
    d = x.abs().amax(dim=1) / 127
    q = _roundf_to_int8(x * _inverse(d)[:, None])
    return torch.cat([_f16_bytes(d), _u8(q)], dim=1)


_QUANTIZERS = {"q4_0": _q4_0, "q4_1": _q4_1, "q5_0": _q5_0, "q5_1": _q5_1, "q8_0": _q8_0}


def _f16_from(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).reshape(-1).float()


def _unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    qs = qs.to(torch.int32)
    return torch.cat([qs & 15, qs >> 4], dim=1)


def _unpack_high(qh: torch.Tensor) -> torch.Tensor:
    word = qh.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # [n, 1]
    return ((word >> torch.arange(32, dtype=torch.int64)) & 1).to(torch.int32)


def _dq(name: str, b: torch.Tensor) -> torch.Tensor:
    if name == "q4_0":
        return (_unpack_nibbles(b[:, 2:]) - 8).float() * _f16_from(b[:, :2])[:, None]
    if name == "q4_1":
        return _unpack_nibbles(b[:, 4:]).float() * _f16_from(b[:, :2])[:, None] + _f16_from(b[:, 2:4])[:, None]
    if name == "q5_0":
        q = _unpack_nibbles(b[:, 6:]) | (_unpack_high(b[:, 2:6]) << 4)
        return (q - 16).float() * _f16_from(b[:, :2])[:, None]
    if name == "q5_1":
        q = _unpack_nibbles(b[:, 8:]) | (_unpack_high(b[:, 4:8]) << 4)
        return q.float() * _f16_from(b[:, :2])[:, None] + _f16_from(b[:, 2:4])[:, None]
    if name == "q8_0":
        return b[:, 2:].contiguous().view(torch.int8).float() * _f16_from(b[:, :2])[:, None]
    raise KeyError(name)


def _bf16_bytes(x: torch.Tensor) -> torch.Tensor:
    """ggml_compute_fp32_to_bf16 -> int16 bits: round to nearest even; NaN kept quiet (bit 6 set).
    int32 arithmetic wraps exactly like C's uint32 in the low 16 bits we keep."""
    u = x.contiguous().view(torch.int32)
    rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return torch.where(nan, (u >> 16) | 64, rounded).to(torch.int16)


# Blocks per step (see codecs/parallel.py): every intermediate stays in cache.
CHUNK_BLOCKS = 8192


def _chunked(fn, blocks: torch.Tensor, width: int, dtype=torch.uint8, check_finite: bool = False) -> torch.Tensor:
    return map_blocks(finite_checked(fn) if check_finite else fn, blocks, width, dtype, CHUNK_BLOCKS)


def _f16_rows(b: torch.Tensor) -> torch.Tensor:
    return _u8(b.to(torch.float16))


def _bf16_rows(b: torch.Tensor) -> torch.Tensor:
    return _u8(_bf16_bytes(b).reshape(b.shape[0], -1))


_FLOAT_ENCODERS = {"f32": _u8, "f16": _f16_rows, "bf16": _bf16_rows}


def quantize_rows(name: str, x: torch.Tensor, check_finite: bool = False) -> torch.Tensor:
    """x: float32 [rows, n] -> uint8 [rows, row_bytes] in the GGUF layout of type `name`.
    check_finite: raise NonFiniteError on NaN/Inf (tested chunk by chunk while in cache)."""
    q = qtype(name)
    if x.dim() != 2:
        raise ValueError(f"quantize_rows expects a 2-D tensor, got shape {tuple(x.shape)}")
    x = x.to(torch.float32).contiguous()
    rows, n = x.shape
    if q.name in _FLOAT_ENCODERS:
        fn = _FLOAT_ENCODERS[q.name]
        if n % BLOCK:                       # odd row length: one piece (these are small tensors)
            return (finite_checked(fn) if check_finite else fn)(x)
        width = BLOCK * q.type_size
        return _chunked(fn, x.reshape(-1, BLOCK), width, check_finite=check_finite).reshape(rows, n * q.type_size)
    if q.name not in _QUANTIZERS:
        raise KeyError(f"quantkit has no encoder for {q.name}")
    if n % BLOCK:
        raise ValueError(f"rows of {n} values are not a multiple of {BLOCK}, the {q.name} block size")
    return _chunked(_QUANTIZERS[q.name], x.reshape(-1, BLOCK), q.type_size,
                    check_finite=check_finite).reshape(rows, q.row_bytes(n))


def dequantize_rows(name: str, data: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [rows, row_bytes] -> float32 [rows, n]."""
    q = qtype(name)
    data = data.contiguous().reshape(-1, q.row_bytes(n))
    rows = data.shape[0]
    if q.name == "f32":
        return data.view(torch.float32).reshape(rows, n).clone()
    if q.name == "f16":
        return data.view(torch.float16).reshape(rows, n).float()
    if q.name == "bf16":
        return data.view(torch.bfloat16).reshape(rows, n).float()
    return _chunked(lambda b: _dq(q.name, b), data.reshape(-1, q.type_size), BLOCK, torch.float32).reshape(rows, n)


def is_simple(name: str | QType) -> bool:
    return qtype(name).name in SIMPLE_TYPES
