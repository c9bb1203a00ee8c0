"""A fast GGUF container parser: metadata, tensor infos and memory-mapped tensor data.

gguf-py's GGUFReader builds one numpy view per array element, which takes tens of seconds for
a 262k-token vocabulary; this reads the same header in a fraction of a second (numeric arrays
in bulk, strings in one pass) and maps the data section without copying. No torch import, so
the planner can use it cheaply.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

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


@dataclass(frozen=True)
class GGUFField:
    value: object                       # python scalar, str, or list
    vtype: GGUFValueType
    sub_type: GGUFValueType | None = None


@dataclass(frozen=True)
class GGUFTensorEntry:
    name: str
    shape: tuple[int, ...]              # row-major (numpy order)
    ggml_type: GGMLQuantizationType
    offset: int                         # absolute offset in the file
    nbytes: int


class GGUFFile:
    """Parsed header plus a read-only memory map of the whole file."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise GGUFFormatError(f"file of {size} bytes is too short for a GGUF header")
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.fields: dict[str, GGUFField] = {}
        self.tensors: list[GGUFTensorEntry] = []
        try:
            self._parse(size)
        except (struct.error, UnicodeDecodeError, IndexError, KeyError) as e:
            raise GGUFFormatError(f"header is truncated or corrupt ({type(e).__name__}: {e})") from None

    def _parse(self, size: int) -> None:
        mm = self._mm
        if mm[:4] != b"GGUF":
            raise GGUFFormatError("no GGUF magic")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", mm, 4)
        if version not in (2, 3):
            raise GGUFFormatError(f"unsupported GGUF version {version}")
        pos = 24

        def string(p):
            (n,) = struct.unpack_from("<Q", mm, p)
            if p + 8 + n > size:
                raise GGUFFormatError("a string runs past the end of the file")
            return mm[p + 8:p + 8 + n].decode("utf-8"), p + 8 + n

        for _ in range(n_kv):
            key, pos = string(pos)
            (vt,) = struct.unpack_from("<I", mm, pos)
            pos += 4
            vt = GGUFValueType(vt)
            if vt == GGUFValueType.ARRAY:
                et, n = struct.unpack_from("<IQ", mm, pos)
                pos += 12
                et = GGUFValueType(et)
                if et in _NP:
                    width = np.dtype(_NP[et]).itemsize
                    if pos + n * width > size:
                        raise GGUFFormatError(f"array {key} runs past the end of the file")
                    val = np.frombuffer(mm, dtype=_NP[et], count=n, offset=pos).tolist()
                    pos += n * width
                elif et == GGUFValueType.STRING:
                    start = pos
                    unpack_q = struct.Struct("<Q").unpack_from
                    for _ in range(n):
                        pos += 8 + unpack_q(mm, pos)[0]
                    if pos > size:
                        raise GGUFFormatError(f"array {key} runs past the end of the file")
                    val = GGUFStrings(mm[start:pos], n)
                else:
                    raise GGUFFormatError(f"nested arrays are not supported ({key})")
                self.fields[key] = GGUFField(val, vt, et)
            elif vt == GGUFValueType.STRING:
                s, pos = string(pos)
                self.fields[key] = GGUFField(s, vt)
            else:
                fmt = _SCALAR[vt]
                (v,) = struct.unpack_from(fmt, mm, pos)
                pos += struct.calcsize(fmt)
                self.fields[key] = GGUFField(v, vt)
        infos = []
        for _ in range(n_tensors):
            name, pos = string(pos)
            (nd,) = struct.unpack_from("<I", mm, pos)
            dims = struct.unpack_from(f"<{nd}Q", mm, pos + 4)
            tt, off = struct.unpack_from("<IQ", mm, pos + 4 + 8 * nd)
            pos += 4 + 8 * nd + 12
            infos.append((name, tuple(int(d) for d in reversed(dims)), GGMLQuantizationType(tt), off))
        align = int(self.fields["general.alignment"].value) if "general.alignment" in self.fields else 32
        data_start = (pos + align - 1) // align * align
        from gguf import GGML_QUANT_SIZES
        for name, shape, tt, off in infos:
            bs, ts = GGML_QUANT_SIZES[tt]
            n = 1
            for s in shape:
                n *= s
            nbytes = n // bs * ts
            if data_start + off + nbytes > size:
                raise GGUFFormatError(f"tensor {name} runs past the end of the file (truncated?)")
            self.tensors.append(GGUFTensorEntry(name, shape, tt, data_start + off, nbytes))

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
