"""llama.cpp's own quantizer, called through ctypes in the libggml-base.so that llama-cpp-python
ships: the reference quantkit's codecs are tested against, byte for byte.

    ggml_quantize("q4_0", x)              # float32 [rows, n] -> uint8 [rows, row_bytes]
    ggml_quantize("iq4_xs", x, imatrix=w) # with importance weights float32 [n]
    ggml_dequantize("q4_0", data, n)      # uint8 [rows, row_bytes] -> float32 [rows, n]
"""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


class _Traits(ctypes.Structure):
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


@lru_cache(maxsize=1)
def libggml() -> ctypes.CDLL:
    import llama_cpp
    libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    lib = ctypes.CDLL(os.path.join(libdir, "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return lib


def _type(name: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[name.upper()]


def ggml_quantize(name: str, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """imatrix: float32 [n] importance weights, passed to ggml_quantize_chunk as quant_weights."""
    t = _type(name)
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, n = x.shape
    qw = None
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        assert imatrix.size == n, (imatrix.size, n)
        qw = imatrix.ctypes.data
    bs, ts = GGML_QUANT_SIZES[t]
    out = np.zeros((rows, n // bs * ts), dtype=np.uint8)
    lib = libggml()
    lib.ggml_quantize_init(int(t))
    size = lib.ggml_quantize_chunk(int(t), x.ctypes.data, out.ctypes.data, 0, rows, n, qw)
    assert size == out.nbytes, (size, out.nbytes)
    return out


def ggml_dequantize(name: str, data: np.ndarray, n: int) -> np.ndarray:
    t = _type(name)
    data = np.ascontiguousarray(data).view(np.uint8)
    if t == GGMLQuantizationType.F32:
        return data.view(np.float32).reshape(-1, n).copy()
    bs, ts = GGML_QUANT_SIZES[t]
    rows = data.size // (n // bs * ts)
    out = np.zeros((rows, n), dtype=np.float32)
    traits = libggml().ggml_get_type_traits(int(t)).contents
    fn = _TO_FLOAT(traits.to_float)
    fn(data.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), rows * n)
    return out


def llama_quantize(inp: str, out: str, file_type: str, *, pure: bool = False, nthread: int = 2,
                   imatrix: dict | None = None) -> None:
    """llama.cpp's llama_model_quantize (what `llama-quantize --allow-requantize` runs).
    imatrix: {tensor name: float32 importance weights}, what llama-quantize hands over after
    reading an imatrix file (params.imatrix; the file's quantize.imatrix.* keys are not added)."""
    import llama_cpp
    from quantkit.quant.gguf_policy import FILE_TYPES

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(FILE_TYPES[file_type][0])
    params.allow_requantize = True
    params.pure = pure
    params.nthread = nthread
    keep = []
    if imatrix is not None:
        arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, w) in enumerate(imatrix.items()):
            w = np.ascontiguousarray(w, dtype=np.float32)
            nm = name.encode()
            keep += [w, nm]
            arr[i].name = nm
            arr[i].data = w.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = w.size
        keep.append(arr)
        params.imatrix = ctypes.cast(arr, type(params.imatrix))
    rc = llama_cpp.llama_model_quantize(inp.encode(), out.encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed with {rc}"
