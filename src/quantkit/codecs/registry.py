"""Every GGUF tensor type, registered once: the only dispatch over types.

The block geometry comes from gguf-py's GGML_QUANT_SIZES (the format's own table), so sizes and
bits per weight are derived, never re-typed. Every type in that table has an entry (`QTYPES`,
looked up by `qtype`): a plain `QuantType`, which decodes through gguf-py's numpy decoder and
cannot encode, unless a subclass for it is registered (`@register`), carrying quantkit's own
encoder, decoder and GPTQ grid. A new type (an IQ type, say) is one such class:

    @register
    class IQ4_NL(QuantType):
        ggml = GGMLQuantizationType.IQ4_NL
        def encode_blocks(self, x): ...        # float32 [n, block_size] -> uint8 [n, type_size]
        def decode_blocks(self, b): ...        # uint8 [n, type_size] -> float32 [n, block_size]
        def gptq_grid(self, in_features, search=False): ...   # a codecs.grid.Grid (optional)
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from . import floats, fp4, iq1, iq1_grid, iq2, iq3, iq4, kquants, legacy, ternary
from .geometry import Geometry
from .grid import Grid
from .parallel import finite_checked, map_blocks

T = GGMLQuantizationType


class QuantType(Geometry):
    """A GGUF tensor type: its geometry (codecs.geometry, from GGML_QUANT_SIZES), and its codec.
    This base class is every type quantkit has no codec of its own for: decoding goes through
    gguf-py."""

    ggml: GGMLQuantizationType
    chunk_blocks = 8192                # blocks per step on a worker thread (codecs/parallel.py)
    imatrix_used = True                # whether llama.cpp's quantize_<type> reads importance weights
    needs_imatrix = False              # ggml_quantize_requires_imatrix: no encoding without them

    def __init__(self, ggml: GGMLQuantizationType | None = None):
        super().__init__(ggml if ggml is not None else type(self).ggml)

    # ---- what a registered type provides
    @property
    def implemented(self) -> bool:
        """Whether quantkit can encode this type."""
        return type(self).encode_blocks is not QuantType.encode_blocks

    def encode_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """float32 [n, block_size] -> uint8 [n, type_size]: llama.cpp's reference encoder."""
        raise KeyError(f"quantkit has no encoder for {self.name}")

    def decode_blocks(self, b: torch.Tensor) -> torch.Tensor:
        """uint8 [n, type_size] -> float32 [n, block_size]; here gguf-py's numpy decoder, the one
        path for the types without a decoder of quantkit's own."""
        out = gguf_quants.dequantize(b.numpy(), self.ggml)
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(b.shape[0], self.block_size)

    def encode_rows_weighted(self, x: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
        """float32 [rows, n] with importance weights qw float32 [n] (one per column: the tensor's
        importance-matrix entry) -> uint8 [rows, row_bytes]: llama.cpp's quantize_<type> given
        quant_weights. Row-level, because some types weight by statistics of the whole row."""
        raise KeyError(f"quantkit has no importance-weighted encoder for {self.name}")

    def _require_encoder(self) -> None:
        if not self.implemented:
            raise KeyError(f"quantkit has no encoder for {self.name}")

    def gptq_grid(self, in_features: int, search: bool = False) -> Grid:
        """The grid GPTQ rounds a weight with rows of `in_features` onto (codecs.grid)."""
        raise ValueError(f"no GPTQ grid for {self.name}")

    # ---- codec over tensors
    def quantize_blocks(self, x: torch.Tensor, threads: int | None = None, check_finite: bool = False) -> torch.Tensor:
        """float32 [n, block_size] -> uint8 [n, type_size], chunk by chunk on worker threads.
        check_finite: raise NonFiniteError on NaN/Inf (tested chunk by chunk while in cache)."""
        self._require_encoder()
        if x.dim() != 2 or x.shape[1] != self.block_size:
            raise ValueError(f"{self.name}: expected blocks of shape [n, {self.block_size}], got {tuple(x.shape)}")
        x = x.detach().to(device="cpu", dtype=torch.float32).contiguous()
        fn = finite_checked(self.encode_blocks) if check_finite else self.encode_blocks
        return map_blocks(fn, x, self.type_size, torch.uint8, self.chunk_blocks, threads)

    def dequantize_blocks(self, data: torch.Tensor, threads: int | None = None) -> torch.Tensor:
        """uint8 [n, type_size] (or its bytes) -> float32 [n, block_size], ggml's dequantize_row."""
        data = data.detach().to("cpu").contiguous()
        if data.dtype != torch.uint8 or data.numel() % self.type_size:
            raise ValueError(f"{self.name}: expected uint8 data, a multiple of {self.type_size} bytes")
        data = data.reshape(-1, self.type_size)
        return map_blocks(self.decode_blocks, data, self.block_size, torch.float32, self.chunk_blocks, threads)

    def quantize_rows(self, x: torch.Tensor, check_finite: bool = False, threads: int | None = None,
                      imatrix: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [rows, n] -> uint8 [rows, row_bytes] in this type's GGUF layout, llama.cpp's bytes.
        imatrix: float32 [n] importance weights (ignored by the types llama.cpp ignores them for)."""
        self._require_encoder()
        if x.dim() != 2:
            raise ValueError(f"{self.name}: expected a 2-D tensor, got shape {tuple(x.shape)}")
        rows, n = x.shape
        row_bytes = self.row_bytes(n)   # raises on a row that is not a multiple of the block size
        if imatrix is not None and self.imatrix_used:
            qw = imatrix.detach().to(device="cpu", dtype=torch.float32).reshape(-1).contiguous()
            if qw.numel() != n:
                raise ValueError(f"{self.name}: importance weights of {qw.numel()} values for rows of {n}")
            x = x.detach().to(device="cpu", dtype=torch.float32).contiguous()
            enc = lambda xr: self.encode_rows_weighted(xr, qw)  # noqa: E731
            fn = finite_checked(enc) if check_finite else enc
            chunk_rows = max(1, self.chunk_blocks * self.block_size // max(n, 1))
            return map_blocks(fn, x, row_bytes, torch.uint8, chunk_rows, threads)
        if self.needs_imatrix:
            raise ValueError(f"{self.name} needs an importance matrix (llama.cpp refuses it without one)")
        blocks = x.reshape(-1, self.block_size) if rows * n else x.new_zeros((0, self.block_size))
        return self.quantize_blocks(blocks, threads, check_finite).reshape(rows, row_bytes)

    def dequantize_rows(self, data: torch.Tensor, n: int, threads: int | None = None) -> torch.Tensor:
        """uint8 [rows, row_bytes] -> float32 [rows, n]."""
        data = data.contiguous().reshape(-1, self.row_bytes(n))
        return self.dequantize_blocks(data, threads).reshape(data.shape[0], n)

    def dequantize(self, data, shape, threads: int | None = None) -> torch.Tensor:
        """The stored bytes of a tensor of `shape` (row-major, last dim contiguous; a torch uint8
        tensor or any numpy array, viewed as bytes) -> float32 `shape`."""
        shape = tuple(int(s) for s in shape)
        if isinstance(data, np.ndarray):
            data = torch.from_numpy(np.ascontiguousarray(data).view(np.uint8).reshape(-1))
        rows_shape = shape or (1,)
        if data.numel() != self.nbytes(rows_shape):
            raise ValueError(f"{self.name}: {data.numel()} bytes do not hold a tensor of shape {shape} "
                             f"({self.nbytes(rows_shape)} bytes)")
        return self.dequantize_rows(data, rows_shape[-1], threads).reshape(shape)


QTYPES: dict[str, QuantType] = {t.name.lower(): QuantType(t) for t in GGMLQuantizationType if t in GGML_QUANT_SIZES}
_BY_GGML: dict[GGMLQuantizationType, QuantType] = {q.ggml: q for q in QTYPES.values()}


def register(cls: type[QuantType]) -> type[QuantType]:
    """Make `cls` the codec of its type (cls.ggml): lookups return an instance of it from now on."""
    q = cls()
    fmt = getattr(cls, "format", None)
    if fmt is not None and (fmt.ggml != q.ggml or fmt.layout.type_size != q.type_size):
        raise AssertionError(f"{cls.__name__}: its format is not {q.name}'s")
    QTYPES[q.name] = q
    _BY_GGML[q.ggml] = q
    return cls


def unregister(name_or_ggml) -> None:
    """Back to no codec of quantkit's own for that type (gguf-py decodes it)."""
    q = QuantType(qtype(name_or_ggml).ggml)
    QTYPES[q.name] = q
    _BY_GGML[q.ggml] = q


def qtype(name_or_ggml) -> QuantType:
    """Look up a type by name ("Q4_0", "q4_0") or GGMLQuantizationType / int."""
    if isinstance(name_or_ggml, QuantType):
        return name_or_ggml
    if isinstance(name_or_ggml, str):
        key = name_or_ggml.strip().lower()
        if key not in QTYPES:
            raise KeyError(name_or_ggml)
        return QTYPES[key]
    return _BY_GGML[GGMLQuantizationType(int(name_or_ggml))]


def can_encode(name_or_ggml) -> bool:
    try:
        return qtype(name_or_ggml).implemented
    except (KeyError, ValueError):
        return False


def gptq_types() -> list[str]:
    """The types with a GPTQ grid, in the table's order."""
    return [q.name for q in QTYPES.values() if type(q).gptq_grid is not QuantType.gptq_grid]


# ---- float types --------------------------------------------------------------------------------

class _Float(QuantType):
    """F32, F16, BF16: elementwise. Rows are cut into pieces of floats.PIECE values for the worker
    threads, or taken whole where the row length is not a multiple of it."""

    imatrix_used = False

    encode_values = staticmethod(floats.encode_f32)
    decode_values = staticmethod(floats.decode_f32)

    def encode_blocks(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_values(x)

    def decode_blocks(self, b: torch.Tensor) -> torch.Tensor:
        return self.decode_values(b, 1)

    def quantize_rows(self, x: torch.Tensor, check_finite: bool = False, threads: int | None = None,
                      imatrix: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError(f"{self.name}: expected a 2-D tensor, got shape {tuple(x.shape)}")
        x = x.detach().to(device="cpu", dtype=torch.float32).contiguous()
        rows, n = x.shape
        fn = finite_checked(self.encode_values) if check_finite else self.encode_values
        if n % floats.PIECE:                     # odd row length: one piece (these are small tensors)
            return fn(x)
        out = map_blocks(fn, x.reshape(-1, floats.PIECE), floats.PIECE * self.type_size, torch.uint8,
                         self.chunk_blocks, threads)
        return out.reshape(rows, n * self.type_size)

    def dequantize_rows(self, data: torch.Tensor, n: int, threads: int | None = None) -> torch.Tensor:
        return self.decode_values(data.contiguous().reshape(-1, self.row_bytes(n)), n)


@register
class F32(_Float):
    ggml = T.F32

    def dequantize(self, data, shape, threads: int | None = None) -> torch.Tensor:
        if isinstance(data, np.ndarray):         # no conversion: a view of the stored bytes
            return torch.from_numpy(np.ascontiguousarray(data).view(np.float32)).reshape(tuple(shape))
        return super().dequantize(data, shape, threads)


@register
class F16(_Float):
    ggml = T.F16
    encode_values = staticmethod(floats.encode_f16)
    decode_values = staticmethod(floats.decode_f16)


@register
class BF16(_Float):
    ggml = T.BF16
    encode_values = staticmethod(floats.encode_bf16)
    decode_values = staticmethod(floats.decode_bf16)


# ---- legacy block types (codecs/legacy.py) ------------------------------------------------------

class _Legacy(QuantType):
    format: legacy.LegacyFormat

    def encode_blocks(self, x: torch.Tensor) -> torch.Tensor:
        return self.format.encode(x)

    def decode_blocks(self, b: torch.Tensor) -> torch.Tensor:
        return legacy.decode(self.format, b)

    def encode_rows_weighted(self, x: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
        return legacy.encode_rows_weighted(self.format, x, qw)

    def gptq_grid(self, in_features: int, search: bool = False) -> legacy.LegacyGrid:
        return legacy.LegacyGrid(self.format, in_features, search)


@register
class Q4_0(_Legacy):
    ggml, format = T.Q4_0, legacy.Q4_0


@register
class Q4_1(_Legacy):
    ggml, format = T.Q4_1, legacy.Q4_1


@register
class Q5_0(_Legacy):
    ggml, format = T.Q5_0, legacy.Q5_0


@register
class Q5_1(_Legacy):
    ggml, format = T.Q5_1, legacy.Q5_1


@register
class Q8_0(_Legacy):
    ggml, format = T.Q8_0, legacy.Q8_0
    imatrix_used = False               # quantize_q8_0 ignores quant_weights


# ---- K-quants (codecs/kquants.py) ---------------------------------------------------------------

class _KQuant(QuantType):
    format: kquants.KFormat
    chunk_blocks = kquants.CHUNK_BLOCKS

    def encode_blocks(self, x: torch.Tensor) -> torch.Tensor:
        return self.format.encode(x)

    def decode_blocks(self, b: torch.Tensor) -> torch.Tensor:
        return self.format.decode(b)

    def encode_rows_weighted(self, x: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
        return kquants.encode_rows_weighted(self.format, x, qw)

    def gptq_grid(self, in_features: int, search: bool = False) -> kquants.KGrid:
        return kquants.KGrid(self, self.format, in_features)   # llama.cpp's own encoder sets the scales


@register
class Q2_K(_KQuant):
    ggml, format = T.Q2_K, kquants.Q2_K


@register
class Q3_K(_KQuant):
    ggml, format = T.Q3_K, kquants.Q3_K


@register
class Q4_K(_KQuant):
    ggml, format = T.Q4_K, kquants.Q4_K


@register
class Q5_K(_KQuant):
    ggml, format = T.Q5_K, kquants.Q5_K


@register
class Q6_K(_KQuant):
    ggml, format = T.Q6_K, kquants.Q6_K


# ---- IQ4 / ternary / FP4 types (codecs/iq4.py, codecs/ternary.py, codecs/fp4.py) -----------------

class _RowsWeighted(QuantType):
    """A type whose encoder takes per-value importance weights block by block: `encode(x, qw)`
    with x and qw float32 [n, block_size] (qw None: llama.cpp's weights without an imatrix)."""

    @staticmethod
    def encode(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def encode_blocks(self, x: torch.Tensor) -> torch.Tensor:
        if self.needs_imatrix:
            raise ValueError(f"{self.name} needs an importance matrix (llama.cpp refuses it without one)")
        return self.encode(x, None)

    def encode_rows_weighted(self, x: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
        rows, n = x.shape
        bs = self.block_size
        qwb = qw.reshape(1, n).expand(rows, n).reshape(-1, bs).contiguous()
        return self.encode(x.reshape(-1, bs), qwb).reshape(rows, self.row_bytes(n))


@register
class IQ4_NL(_RowsWeighted):
    ggml = T.IQ4_NL
    chunk_blocks = 1024
    encode = staticmethod(iq4.encode_nl)

    def decode_blocks(self, b: torch.Tensor) -> torch.Tensor:
        return iq4.decode_nl(b)

    def gptq_grid(self, in_features: int, search: bool = False) -> iq4.IQ4Grid:
        return iq4.IQ4Grid(False, in_features, search)


@register
class IQ4_XS(_RowsWeighted):
    ggml = T.IQ4_XS
    chunk_blocks = 128
    encode = staticmethod(iq4.encode_xs)

    def decode_blocks(self, b: torch.Tensor) -> torch.Tensor:
        return iq4.decode_xs(b)

    def gptq_grid(self, in_features: int, search: bool = False) -> iq4.IQ4Grid:
        return iq4.IQ4Grid(True, in_features, search)


class _Ignoring(QuantType):
    """A type whose quantize_<type> ignores importance weights: `encode(x)` over blocks."""
    imatrix_used = False

    @staticmethod
    def encode(x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def decode(b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_blocks(self, x: torch.Tensor) -> torch.Tensor:
        if not x.shape[0]:
            return torch.empty(0, self.type_size, dtype=torch.uint8)
        return self.encode(x)

    def decode_blocks(self, b: torch.Tensor) -> torch.Tensor:
        return self.decode(b)


@register
class TQ1_0(_Ignoring):
    ggml, chunk_blocks = T.TQ1_0, 1024
    encode, decode = staticmethod(ternary.encode_tq1), staticmethod(ternary.decode_tq1)


@register
class TQ2_0(_Ignoring):
    ggml, chunk_blocks = T.TQ2_0, 1024
    encode, decode = staticmethod(ternary.encode_tq2), staticmethod(ternary.decode_tq2)


@register
class Q1_0(_Ignoring):
    ggml, chunk_blocks = T.Q1_0, 2048
    encode, decode = staticmethod(ternary.encode_q1), staticmethod(ternary.decode_q1)


@register
class MXFP4(_Ignoring):
    ggml, chunk_blocks = T.MXFP4, 4096
    encode, decode = staticmethod(fp4.encode_mx), staticmethod(fp4.decode_mx)


@register
class NVFP4(_Ignoring):
    ggml, chunk_blocks = T.NVFP4, 2048
    encode, decode = staticmethod(fp4.encode_nv), staticmethod(fp4.decode_nv)


# ---- IQ2 lattice types (codecs/iq2.py) ----------------------------------------------------------

class _IQ2(_RowsWeighted):
    kind: iq2.IQ2Kind
    chunk_blocks = 512

    def encode(self, x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
        return iq2.encode(self.kind, x, qw)

    def decode_blocks(self, b: torch.Tensor) -> torch.Tensor:
        return iq2.decode(self.kind, b)

    def gptq_grid(self, in_features: int, search: bool = False) -> iq2.IQ2Grid:
        return iq2.IQ2Grid(self.kind, in_features, search)


@register
class IQ2_XXS(_IQ2):
    ggml, kind = T.IQ2_XXS, iq2.XXS
    needs_imatrix = True


@register
class IQ2_XS(_IQ2):
    ggml, kind = T.IQ2_XS, iq2.XS
    needs_imatrix = True


@register
class IQ2_S(_IQ2):
    ggml, kind = T.IQ2_S, iq2.S


# ---- IQ3 / IQ1 lattice types (codecs/iq3.py, codecs/iq1.py) ----------------------------------

class _LatticeType(_RowsWeighted):
    """A super-block of 256 on a lattice codebook; numpy codecs (codecs/lattice.py)."""

    chunk_blocks = 256

    @staticmethod
    def encode_np(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def decode_np(b: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def encode(self, x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
        return torch.from_numpy(self.encode_np(x.numpy(), None if qw is None else qw.numpy()))

    def decode_blocks(self, b: torch.Tensor) -> torch.Tensor:
        with np.errstate(all="ignore"):             # NaN / Inf scales decode as ggml decodes them
            return torch.from_numpy(self.decode_np(b.numpy()))


@register
class IQ3_XXS(_LatticeType):
    ggml = T.IQ3_XXS
    encode_np = staticmethod(lambda x, qw: iq3.encode(x, qw, xxs=True))
    decode_np = staticmethod(iq3.decode_xxs)

    def gptq_grid(self, in_features: int, search: bool = False) -> iq3.IQ3Grid:
        return iq3.IQ3Grid(True, in_features, search)


@register
class IQ3_S(_LatticeType):
    ggml = T.IQ3_S
    encode_np = staticmethod(lambda x, qw: iq3.encode(x, qw, xxs=False))
    decode_np = staticmethod(iq3.decode_s)

    def gptq_grid(self, in_features: int, search: bool = False) -> iq3.IQ3Grid:
        return iq3.IQ3Grid(False, in_features, search)


@register
class IQ1_S(_LatticeType):
    ggml = T.IQ1_S
    needs_imatrix = True               # ggml_quantize_requires_imatrix; quantize_row_iq1_s_impl asserts them
    encode_np = staticmethod(iq1.encode_s)
    decode_np = staticmethod(iq1.decode_s)

    def gptq_grid(self, in_features: int, search: bool = False) -> iq1_grid.IQ1Grid:
        return iq1_grid.IQ1Grid(False, in_features, search)


@register
class IQ1_M(_LatticeType):
    ggml = T.IQ1_M
    encode_np = staticmethod(iq1.encode_m)
    decode_np = staticmethod(iq1.decode_m)

    def gptq_grid(self, in_features: int, search: bool = False) -> iq1_grid.IQ1Grid:
        return iq1_grid.IQ1Grid(True, in_features, search)
