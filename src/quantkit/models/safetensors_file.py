"""A .safetensors file: its header checked against the file, its tensor bytes read with pread.

The container (huggingface/safetensors): an 8-byte little-endian header length n, n bytes of
JSON mapping each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets
relative to the data section that starts at 8 + n) plus an optional "__metadata__" object of
strings, then the data. Every length, offset, dtype and shape is checked against the file size
before anything is read; a bad file ends in one QuantkitError line naming it.

Data is read with pread (util.memory.pread_into), never memory-mapped: memory holds only the
tensors asked for, so a model larger than RAM streams through. No torch import: the planner
reads headers through this module, the HF reader turns the bytes into tensors.
"""

from __future__ import annotations

import json
import math
import os
from typing import NamedTuple

from ..util.errors import QuantkitError
from ..util.memory import pread_into

# safetensors dtypes -> bits per element (the library's Dtype enum); any other dtype is refused,
# as the library refuses it
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
# bytes per element of the whole-byte dtypes
DTYPE_SIZES: dict[str, int] = {k: b // 8 for k, b in DTYPE_BITS.items() if b % 8 == 0}
MAX_HEADER_BYTES = 100_000_000   # the safetensors library's own limit (MAX_HEADER_SIZE)
MAX_DIMS = 64


def shown(name: str, limit: int = 80) -> str:
    """A name read from a file for an error line: as it is when short and printable, else
    quoted (escapes, no line breaks) and cut."""
    if len(name) <= limit and name.isprintable():
        return name
    return repr(name if len(name) <= limit else name[:limit] + "...")


class SafetensorsEntry(NamedTuple):
    dtype: str                   # as stored: "F16", "BF16", "I32", ...
    shape: tuple[int, ...]
    begin: int                   # offsets in the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _entry(name: str, e, data_bytes: int) -> SafetensorsEntry:
    """One header entry, checked; ValueError says what is wrong."""
    name = shown(name)
    if not isinstance(e, dict):
        raise ValueError(f"tensor {name}: entry is not a JSON object")
    dt, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
    if not isinstance(dt, str) or not dt:
        raise ValueError(f"tensor {name} has no dtype")
    if dt not in DTYPE_BITS:
        raise ValueError(f"tensor {name} has unknown dtype {shown(dt, 20)}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_int(d) and d >= 0 for d in shape):
        raise ValueError(f"tensor {name}: shape {shown(str(shape), 60)} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_int(x) for x in offsets):
        raise ValueError(f"tensor {name}: data_offsets {shown(str(offsets), 60)} is not two integers")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise ValueError(f"tensor {name}: data_offsets {offsets} are not an ascending range")
    if end > data_bytes:
        raise ValueError(f"tensor {name} lies past the end of the file (truncated download?)")
    bits = math.prod(shape) * DTYPE_BITS[dt]
    if end - begin != (bits + 7) // 8:
        raise ValueError(f"tensor {name}: {end - begin} bytes for shape {shape} of {dt}")
    return SafetensorsEntry(dt, tuple(shape), begin, end)


def _check_layout(entries: dict[str, SafetensorsEntry], data_bytes: int) -> None:
    """The tensors tile the data section, as the safetensors library requires: no overlap, no
    gap, nothing after the last one."""
    ranges = sorted((e.begin, e.end, n) for n, e in entries.items() if e.end > e.begin)
    pos, prev = 0, None
    for begin, end, n in ranges:
        if begin < pos:
            raise ValueError(f"tensors {shown(prev)} and {shown(n)} overlap")
        if begin > pos:
            raise ValueError(f"{begin - pos} bytes before tensor {shown(n)} belong to no tensor")
        pos, prev = end, n
    if pos != data_bytes:
        raise ValueError(f"{data_bytes - pos} bytes after the last tensor belong to no tensor")


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"key {shown(k)} appears twice in the header")
        d[k] = v
    return d


def parse_header(fd: int) -> tuple[dict[str, str], dict[str, SafetensorsEntry], int]:
    """(metadata, entries in header order, data start) of the open file; ValueError if bad."""
    size = os.fstat(fd).st_size
    head = os.pread(fd, 8, 0)
    if len(head) < 8:
        raise ValueError("file shorter than its 8-byte header length")
    n = int.from_bytes(head, "little")
    if n > size - 8:
        raise ValueError(f"header length {n} exceeds the file")
    if n > MAX_HEADER_BYTES:
        raise ValueError(f"header length {n} is over the safetensors limit of {MAX_HEADER_BYTES} bytes")
    raw = os.pread(fd, n, 8)
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"header is not JSON: {str(e)[:100]}") from None
    if not isinstance(header, dict):
        raise ValueError(f"header is a JSON {type(header).__name__}, not an object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError("__metadata__ is not a JSON object of strings")
    data_start = 8 + n
    entries = {name: _entry(name, e, size - data_start) for name, e in header.items()}
    _check_layout(entries, size - data_start)
    return meta, entries, data_start


class SafetensorsFile:
    """An open .safetensors file: `entries` from its header, `read` for a tensor's bytes."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise QuantkitError(f"cannot open ({e.strerror})", self.path) from None
        try:
            self.metadata, self.entries, self.data_start = parse_header(self._fd)
        except (OSError, ValueError) as e:
            os.close(self._fd)
            self._fd = -1
            raise QuantkitError(f"corrupt or truncated safetensors file ({e})", self.path,
                                "download the file again") from None

    def keys(self) -> list[str]:
        return list(self.entries)

    def read(self, name: str, start: int, n: int) -> bytearray:
        """n bytes from `start` in the data section (an entry's begin, or a row inside it)."""
        buf = bytearray(n)
        pread_into(self._fd, buf, self.data_start + start, name)
        return buf

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
