"""llama.cpp's own K-quant quantizer and dequantizer, called through ctypes (test reference).

`ggml_quantize_chunk` with no importance matrix is the path llama-quantize takes for a tensor
without an imatrix (it ends in `quantize_row_<type>_ref`); `to_float` of ggml's type traits is
`dequantize_row_<type>`. The library is libggml-base.so from the llama-cpp-python install; set
QUANTKIT_LIBGGML_BASE to point at another build. `load()` returns None when none is found, so
the tests that need it skip instead of failing.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_LIB = None


class _TypeTraits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def _candidates():
    env = os.environ.get("QUANTKIT_LIBGGML_BASE")
    if env:
        yield Path(env)
    spec = importlib.util.find_spec("llama_cpp")
    if spec is not None and spec.origin:
        lib_dir = Path(spec.origin).parent / "lib"
        yield lib_dir / "libggml-base.so"
        yield from sorted(lib_dir.glob("libggml-base.so*"))


def load():
    global _LIB
    if _LIB is not None:
        return _LIB
    for path in _candidates():
        if path.is_file():
            lib = ctypes.CDLL(str(path))
            lib.ggml_quantize_chunk.restype = ctypes.c_size_t
            lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
            lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
            lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
            _LIB = lib
            return lib
    return None


def _ggml_type(name: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[name.upper()]


def ggml_quantize(name: str, x: np.ndarray) -> np.ndarray:
    """x float32 [rows, n_per_row] -> uint8 [rows, row_bytes], llama.cpp's bytes (no imatrix)."""
    lib = load()
    t = _ggml_type(name)
    block, size = GGML_QUANT_SIZES[t]
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, n = x.shape
    out = np.zeros((rows, n // block * size), dtype=np.uint8)
    written = lib.ggml_quantize_chunk(int(t), x.ctypes.data, out.ctypes.data, 0, rows, n, None)
    assert written == out.nbytes
    return out


def ggml_dequantize(name: str, data: np.ndarray, n_per_row: int) -> np.ndarray:
    """uint8 [rows, row_bytes] -> float32 [rows, n_per_row] through ggml's dequantize_row."""
    lib = load()
    t = _ggml_type(name)
    data = np.ascontiguousarray(data, dtype=np.uint8)
    rows = data.shape[0]
    out = np.zeros((rows, n_per_row), dtype=np.float32)
    to_float = _TO_FLOAT(lib.ggml_get_type_traits(int(t)).contents.to_float)
    to_float(data.ctypes.data, out.ctypes.data, rows * n_per_row)
    return out
