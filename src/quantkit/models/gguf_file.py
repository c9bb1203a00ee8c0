"""A fast GGUF container parser: metadata, tensor infos and memory-mapped tensor data.

gguf-py's GGUFReader builds one numpy view per array element, which takes tens of seconds for
a 262k-token vocabulary; this reads the same header in a fraction of a second (numeric arrays
in bulk, strings in one pass) and maps the data section without copying. No torch import, so
the planner can use it cheaply. The file is untrusted: GGUFFile checks it against the format
and llama.cpp's loader before reading anything a count or offset points at.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

_SCALAR = {GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
           GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
           GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
           GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d"}
_NP = {GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
       GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
       GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "<u8",
       GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8"}


class GGUFFormatError(ValueError):
    pass


class GGUFStrings(Sequence):
    """A string array read from a file (a 262k-token vocabulary), decoded on first use.

    Keeps the encoded payload (the bytes after the element type and count), so a writer copies
    it as it is and equality between two files' arrays is a byte comparison."""

    def __init__(self, payload: bytes, count: int):
        self.payload, self.count = payload, count
        self._items: list[str] | None = None

    def _decoded(self) -> list[str]:
        if self._items is None:
            items, pos, p = [], 0, self.payload
            unpack_q = struct.Struct("<Q").unpack_from
            for _ in range(self.count):
                (ln,) = unpack_q(p, pos)
                items.append(p[pos + 8:pos + 8 + ln].decode("utf-8", errors="replace"))
                pos += 8 + ln
            self._items = items
        return self._items

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i):
        return self._decoded()[i]

    def __iter__(self):
        return iter(self._decoded())

    def __eq__(self, other) -> bool:
        if isinstance(other, GGUFStrings):
            return self.count == other.count and self.payload == other.payload
        return list(self) == list(other)

    def __repr__(self) -> str:
        return f"GGUFStrings({self.count} strings)"


class GGUFNumbers(Sequence):
    """A long numeric array read from a file (a vocabulary's scores), kept as a read-only numpy
    view of the map: a Python list of 262k floats would take more memory than the file."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i):
        v = self.array[i]
        return v.tolist()

    def __iter__(self):
        return iter(self.array.tolist())

    def __array__(self, dtype=None, copy=None):
        return self.array if dtype is None else self.array.astype(dtype)

    def __eq__(self, other) -> bool:
        return len(self) == len(other) and bool(np.array_equal(self.array, np.asarray(other)))

    def __repr__(self) -> str:
        return f"GGUFNumbers({len(self.array)} x {self.array.dtype})"


# Numeric arrays longer than this stay numpy views (GGUFNumbers); shorter ones (per-layer
# values) become lists.
LAZY_ARRAY_MIN = 4096


@dataclass(frozen=True)
class GGUFField:
    value: object                       # scalar, str, list, GGUFStrings or GGUFNumbers
    vtype: GGUFValueType
    sub_type: GGUFValueType | None = None


@dataclass(frozen=True)
class GGUFTensorEntry:
    name: str
    shape: tuple[int, ...]              # row-major (numpy order)
    ggml_type: GGMLQuantizationType
    offset: int                         # absolute offset in the file
    nbytes: int


# Limits of llama.cpp's loader (ggml/src/gguf.cpp, ggml.h): a file outside them is refused
# there, so it is refused here too.
MAX_STRING_BYTES = 1 << 30          # GGUF_MAX_STRING_LENGTH
MAX_ARRAY_ELEMENTS = 1 << 30        # GGUF_MAX_ARRAY_ELEMENTS
MAX_DIMS = 4                        # GGML_MAX_DIMS
MAX_NAME_BYTES = 63                 # GGML_MAX_NAME - 1 (the terminating NUL)
DEFAULT_ALIGNMENT = 32
_INT64_MAX = (1 << 63) - 1
_VTYPES = {int(t): t for t in GGUFValueType}
_QSIZES = {int(t): (t, bs, ts) for t, (bs, ts) in GGML_QUANT_SIZES.items()}
_U64 = struct.Struct("<Q").unpack_from
_U32 = struct.Struct("<I").unpack_from
# smallest encodings: a key/value (empty key, u8 value) and a tensor info (empty name, 0 dims)
_MIN_KV_BYTES, _MIN_TENSOR_INFO_BYTES = 8 + 4 + 1, 8 + 4 + 4 + 8


def shown(s: str, limit: int = 80) -> str:
    """A name read from a file, quoted and cut for an error line."""
    return repr(s if len(s) <= limit else s[:limit] + "...")


class GGUFFile:
    """Parsed header plus a read-only memory map of the whole file.

    Every count, length, type id, shape and offset is checked against the file size and the
    format's rules before anything is read or allocated; the rules are llama.cpp's loader's
    (ggml/src/gguf.cpp): no duplicate keys or tensor names, general.alignment a u32 power of
    two, at most 4 dimensions, known tensor types whose block divides the row, and tensor data
    laid out as llama.cpp requires (each tensor at the padded end of the one before). Any
    violation raises GGUFFormatError with one line saying what is wrong."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise GGUFFormatError(f"file of {size} bytes is too short for a GGUF header")
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.size = size
        self.fields: dict[str, GGUFField] = {}
        self.tensors: list[GGUFTensorEntry] = []
        try:
            self._parse(size)
        except GGUFFormatError:
            self.close()
            raise
        except (struct.error, IndexError) as e:     # a read past the end the checks missed
            self.close()
            raise GGUFFormatError(f"header is truncated or corrupt ({type(e).__name__}: {e})") from None

    def _string(self, pos: int, what: str) -> tuple[str, int]:
        if pos + 8 > self.size:
            raise GGUFFormatError(f"{what} runs past the end of the file (truncated?)")
        (n,) = _U64(self._mm, pos)
        if n > MAX_STRING_BYTES or pos + 8 + n > self.size:
            raise GGUFFormatError(f"{what} claims {n} bytes, more than the file holds")
        return self._mm[pos + 8:pos + 8 + n].decode("utf-8", errors="replace"), pos + 8 + n

    def _need(self, pos: int, n: int, what: str) -> None:
        if pos + n > self.size:
            raise GGUFFormatError(f"{what} runs past the end of the file (truncated?)")

    def _parse(self, size: int) -> None:
        mm = self._mm
        if mm[:4] != b"GGUF":
            raise GGUFFormatError("no GGUF magic")
        version, n_tensors, n_kv = struct.unpack_from("<Iqq", mm, 4)
        if version not in (2, 3):
            raise GGUFFormatError(f"unsupported GGUF version {version} (llama.cpp reads 2 and 3)")
        if not 0 <= n_kv <= (size - 24) // _MIN_KV_BYTES:
            raise GGUFFormatError(f"key/value count {n_kv} does not fit in a file of {size} bytes")
        if not 0 <= n_tensors <= (size - 24) // _MIN_TENSOR_INFO_BYTES:
            raise GGUFFormatError(f"tensor count {n_tensors} does not fit in a file of {size} bytes")
        pos = 24
        for i in range(n_kv):
            pos = self._read_kv(pos, i)
        align = self._alignment()
        infos, seen = [], set()
        for i in range(n_tensors):
            name, pos = self._string(pos, f"name of tensor {i}")
            if len(name.encode("utf-8", errors="surrogatepass")) > MAX_NAME_BYTES:
                raise GGUFFormatError(f"tensor name {shown(name)} is longer than {MAX_NAME_BYTES} bytes")
            if name in seen:
                raise GGUFFormatError(f"tensor {shown(name)} appears twice")
            seen.add(name)
            self._need(pos, 4, f"tensor {shown(name)}")
            (nd,) = _U32(mm, pos)
            if nd > MAX_DIMS:
                raise GGUFFormatError(f"tensor {shown(name)} has {nd} dimensions (at most {MAX_DIMS})")
            self._need(pos, 4 + 8 * nd + 12, f"tensor {shown(name)}")
            dims = struct.unpack_from(f"<{nd}q", mm, pos + 4)
            tt, off = struct.unpack_from("<iQ", mm, pos + 4 + 8 * nd)
            pos += 4 + 8 * nd + 12
            infos.append((name, self._shape(name, dims), self._type(name, tt, dims), off))
        data_start = (pos + align - 1) // align * align if n_tensors else pos
        if data_start > size:
            raise GGUFFormatError("the tensor data section starts past the end of the file (truncated?)")
        expect = 0
        for name, shape, (tt, bs, ts), off in infos:
            n = 1
            for s in shape:
                n *= s
            nbytes = n // bs * ts
            # llama.cpp requires each tensor right after the one before, padded to the alignment:
            # a misaligned, overlapping or out-of-order offset is refused there.
            if off != expect:
                raise GGUFFormatError(f"tensor {shown(name)} has data offset {off}, expected {expect} "
                                      f"(misaligned, overlapping or out of order)")
            if data_start + off + nbytes > size:
                raise GGUFFormatError(f"tensor {shown(name)} runs past the end of the file (truncated?)")
            expect = off + (nbytes + align - 1) // align * align
            self.tensors.append(GGUFTensorEntry(name, shape, tt, data_start + off, nbytes))
        self.data_start = data_start

    def _read_kv(self, pos: int, i: int) -> int:
        mm, size = self._mm, self.size
        key, pos = self._string(pos, f"key {i}")
        if not key:
            raise GGUFFormatError(f"key {i} is empty")
        if key in self.fields:
            raise GGUFFormatError(f"key {shown(key)} appears twice")
        self._need(pos, 4, f"value of {shown(key)}")
        (vt,) = _U32(mm, pos)
        pos += 4
        if vt not in _VTYPES:
            raise GGUFFormatError(f"key {shown(key)} has unknown value type {vt}")
        vt = _VTYPES[vt]
        if vt == GGUFValueType.ARRAY:
            self._need(pos, 12, f"array {shown(key)}")
            et, n = struct.unpack_from("<IQ", mm, pos)
            pos += 12
            if et not in _VTYPES or et == GGUFValueType.ARRAY:
                raise GGUFFormatError(f"array {shown(key)} has invalid element type {et}")
            et = _VTYPES[et]
            if n > MAX_ARRAY_ELEMENTS:
                raise GGUFFormatError(f"array {shown(key)} claims {n} elements (at most {MAX_ARRAY_ELEMENTS})")
            if et == GGUFValueType.STRING:
                if pos + 8 * n > size:
                    raise GGUFFormatError(f"array {shown(key)} runs past the end of the file (truncated?)")
                start = pos
                unpack_q = _U64
                try:
                    for _ in range(n):
                        pos += 8 + unpack_q(mm, pos)[0]
                except (struct.error, OverflowError):   # a length that runs off the map
                    pos = size + 1
                if pos > size:
                    raise GGUFFormatError(f"array {shown(key)} runs past the end of the file (truncated?)")
                if pos - start > MAX_STRING_BYTES:
                    self._check_string_lengths(key, start, n)
                val = GGUFStrings(mm[start:pos], n)
            else:
                width = np.dtype(_NP[et]).itemsize
                if pos + n * width > size:
                    raise GGUFFormatError(f"array {shown(key)} runs past the end of the file (truncated?)")
                arr = np.frombuffer(mm, dtype=_NP[et], count=n, offset=pos)
                val = GGUFNumbers(arr) if n >= LAZY_ARRAY_MIN else arr.tolist()
                pos += n * width
            self.fields[key] = GGUFField(val, vt, et)
        elif vt == GGUFValueType.STRING:
            s, pos = self._string(pos, f"value of {shown(key)}")
            self.fields[key] = GGUFField(s, vt)
        else:
            fmt = _SCALAR[vt]
            width = struct.calcsize(fmt)
            self._need(pos, width, f"value of {shown(key)}")
            (v,) = struct.unpack_from(fmt, mm, pos)
            self.fields[key] = GGUFField(v, vt)
            pos += width
        return pos

    def _check_string_lengths(self, key: str, pos: int, n: int) -> None:
        for _ in range(n):
            (ln,) = _U64(self._mm, pos)
            if ln > MAX_STRING_BYTES:
                raise GGUFFormatError(f"a string of array {shown(key)} claims {ln} bytes (at most {MAX_STRING_BYTES})")
            pos += 8 + ln

    def _alignment(self) -> int:
        f = self.fields.get("general.alignment")
        if f is None:
            return DEFAULT_ALIGNMENT
        if f.vtype != GGUFValueType.UINT32:
            raise GGUFFormatError(f"general.alignment is of type {f.vtype.name.lower()}, must be uint32")
        a = f.value
        if a <= 0 or a & (a - 1):
            raise GGUFFormatError(f"general.alignment = {a} is not a power of two")
        return a

    @staticmethod
    def _shape(name: str, dims: tuple[int, ...]) -> tuple[int, ...]:
        n = 1
        for d in dims:
            if d <= 0:
                raise GGUFFormatError(f"tensor {shown(name)} has dimension {d} (must be positive)")
            n *= d
        if n > _INT64_MAX:
            raise GGUFFormatError(f"tensor {shown(name)} has {n} elements, more than 2^63")
        return tuple(reversed(dims))

    @staticmethod
    def _type(name: str, tt: int, dims: tuple[int, ...]):
        if tt not in _QSIZES:
            raise GGUFFormatError(f"tensor {shown(name)} has unknown ggml type {tt}")
        q = _QSIZES[tt]
        if (dims[0] if dims else 1) % q[1]:
            raise GGUFFormatError(f"tensor {shown(name)} of type {q[0].name.lower()}: rows of {dims[0]} "
                                  f"values are not a multiple of its block size {q[1]}")
        return q

    def data(self, t: GGUFTensorEntry) -> np.ndarray:
        """The tensor's stored bytes as a read-only uint8 view of the map (no copy)."""
        return np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)

    def release(self, t: GGUFTensorEntry) -> None:
        """Drop the tensor's pages from this process's RSS once it has been used.

        Streaming a model touches every page of the map once; mapped pages count towards RSS
        until unmapped (1 GB for an F32 Gemma-3-270M). MADV_DONTNEED on a read-only file map only
        drops the page-table entries: a later access reads the same bytes again from the page
        cache, so views handed out stay valid."""
        page = mmap.PAGESIZE
        start = t.offset // page * page
        end = min(len(self._mm), t.offset + t.nbytes)
        if hasattr(self._mm, "madvise") and end > start:
            self._mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        try:
            self._mm.close()
        except BufferError:
            pass  # views still alive; the map closes with them
