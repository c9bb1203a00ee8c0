"""The float tensor types (F32, F16, BF16): elementwise conversions, as ggml does them."""

from __future__ import annotations

import torch

from .bits import u8

# Values per row piece handed to a worker thread; rows whose length it does not divide go whole.
PIECE = 32


def encode_f32(x: torch.Tensor) -> torch.Tensor:
    return u8(x)


def encode_f16(x: torch.Tensor) -> torch.Tensor:
    return u8(x.to(torch.float16))


def _bf16_bits(x: torch.Tensor) -> torch.Tensor:
    """ggml_compute_fp32_to_bf16 -> int16 bits: round to nearest even; NaN kept quiet (bit 6 set).
    int32 arithmetic wraps exactly like C's uint32 in the low 16 bits we keep."""
    u = x.contiguous().view(torch.int32)
    rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return torch.where(nan, (u >> 16) | 64, rounded).to(torch.int16)


def encode_bf16(x: torch.Tensor) -> torch.Tensor:
    return u8(_bf16_bits(x).reshape(x.shape[0], -1))


def decode_f32(b: torch.Tensor, n: int) -> torch.Tensor:
    return b.view(torch.float32).reshape(-1, n).clone()


def decode_f16(b: torch.Tensor, n: int) -> torch.Tensor:
    return b.view(torch.float16).reshape(-1, n).float()


def decode_bf16(b: torch.Tensor, n: int) -> torch.Tensor:
    return b.view(torch.bfloat16).reshape(-1, n).float()
