"""llama.cpp's importance-matrix files, read and written: the GGUF imatrix (what llama-imatrix
writes by default) and the legacy `.dat` format.

GGUF (tools/imatrix/imatrix.cpp, save_imatrix): key `general.type` = "imatrix", the string
array `imatrix.datasets`, u32 `imatrix.chunk_count` and `imatrix.chunk_size`; per weight NAME,
in sorted name order, an F32 tensor `NAME.in_sum2` of ggml shape [n_per_row, n_mat] (the sum
over calibration tokens of each input column's squared activation, one row per expert of a 3-D
MoE tensor) and an F32 tensor `NAME.counts` of shape [1, n_mat] (tokens summed, per expert).

Legacy `.dat` (save_imatrix_legacy): int32 n_entries; per entry int32 name length, the name,
int32 ncall, int32 nval, nval float32 = (sum / count) * ncall; then int32 chunk count, int32
length and the dataset's name.

llama-quantize's per-column importance (tools/quantize/quantize.cpp, load_imatrix) is sum /
count per expert (1 where an expert saw no token) for GGUF, value / ncall for legacy files
(`Imatrix.weights`). Every length, count and offset is checked; anything wrong is one
QuantkitError line naming the file.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from ..util.atomic import atomic_output
from ..util.errors import QuantkitError
from .gguf_file import GGUFFile, GGUFFormatError, shown

SUM_SUFFIX = ".in_sum2"
COUNT_SUFFIX = ".counts"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
HOW_TO_MAKE = "make one with: quantkit imatrix MODEL --calib FILE -o imatrix.gguf"
_ALIGN = 32


@dataclass
class ImatrixEntry:
    """One weight's statistics: sums float32 [n_mat, n_per_row] of squared input activations,
    counts float64 [n_mat] of the tokens summed (n_mat > 1 for a 3-D MoE expert tensor)."""
    sums: np.ndarray
    counts: np.ndarray

    @property
    def n_per_row(self) -> int:
        return int(self.sums.shape[1])


@dataclass
class Imatrix:
    entries: dict[str, ImatrixEntry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False                # read from a .dat: sums hold (sum / count) * ncall, counts ncall
    path: str | None = None

    def weights(self, name: str) -> np.ndarray | None:
        """llama-quantize's importance weights for weight `name`, float32 [n_mat * n_per_row],
        or None when the file has no entry for it."""
        e = self.entries.get(name)
        if e is None:
            return None
        if self.legacy:
            ncall = int(e.counts[0]) if e.counts.size else 0
            if ncall > 0:
                return (e.sums / np.float32(ncall)).astype(np.float32).reshape(-1)
            return e.sums.astype(np.float32).reshape(-1)
        c = e.counts.astype(np.float32)[:, None]
        out = np.where(c > 0, e.sums / np.where(c > 0, c, np.float32(1)), np.float32(1))
        return out.astype(np.float32).reshape(-1)

    def check_model(self, shapes: dict[str, tuple[int, ...]], model_path: str | None = None) -> None:
        """Refuse an imatrix made for another model: every entry must name a 2-D or 3-D weight
        of `shapes` (row-major) whose rows (times experts) have the entry's length."""
        if not self.entries:
            raise QuantkitError("the importance matrix has no entries", self.path, HOW_TO_MAKE)
        for name in sorted(self.entries):
            e = self.entries[name]
            shape = shapes.get(name)
            if shape is None:
                raise QuantkitError(f"importance matrix entry {shown(name)} names no tensor of the model"
                                    + (f" {model_path}" if model_path else ""), self.path,
                                    "it was made for another model; " + HOW_TO_MAKE)
            n_mat = shape[0] if len(shape) == 3 else 1
            if e.sums.size != shape[-1] * n_mat:
                raise QuantkitError(f"importance matrix entry {shown(name)} has {e.sums.size} values, the model's "
                                    f"tensor has rows of {shape[-1]}" + (f" x {n_mat} experts" if n_mat > 1 else ""),
                                    self.path, "it was made for another model; " + HOW_TO_MAKE)


# ---------------------------------------------------------------------------------------------- reading

def read_imatrix(path: str | os.PathLike) -> Imatrix:
    """Read a GGUF or legacy imatrix file (told apart by the GGUF magic)."""
    p = os.fspath(path)
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise QuantkitError("no such importance-matrix file", p, HOW_TO_MAKE) from None
    except OSError as e:
        raise QuantkitError(f"cannot read the importance matrix ({e.strerror})", p) from None
    imx = _read_gguf(p) if magic == b"GGUF" else _read_dat(p)
    imx.path = p
    for name, e in imx.entries.items():
        if not (np.isfinite(e.sums).all() and np.isfinite(e.counts).all()):
            raise QuantkitError(f"importance matrix entry {shown(name)} holds NaN or Inf", p,
                                "the calibration overflowed; " + HOW_TO_MAKE)
        if (e.counts < 0).any():
            raise QuantkitError(f"importance matrix entry {shown(name)} has a negative count", p, "corrupt file")
    return imx


def _read_gguf(p: str) -> Imatrix:
    try:
        g = GGUFFile(p)
    except GGUFFormatError as e:
        raise QuantkitError(f"corrupt GGUF importance matrix: {e}", p, HOW_TO_MAKE) from None
    try:
        return _entries_from_gguf(g, p)
    finally:
        g.close()


def _entries_from_gguf(g: GGUFFile, p: str) -> Imatrix:
    imx = Imatrix()
    kind = g.fields.get("general.type")
    if kind is not None and kind.value != "imatrix":
        raise QuantkitError(f"a GGUF of general.type {shown(str(kind.value))}, not an importance matrix", p,
                            HOW_TO_MAKE)
    for key in (KEY_CHUNK_COUNT, KEY_CHUNK_SIZE):
        f = g.fields.get(key)
        if f is None:
            raise QuantkitError(f"the importance matrix lacks {key} (llama-quantize refuses it)", p, HOW_TO_MAKE)
        if f.vtype != GGUFValueType.UINT32:
            raise QuantkitError(f"{key} is of type {f.vtype.name.lower()}, must be uint32", p, "corrupt file")
    imx.chunk_count = int(g.fields[KEY_CHUNK_COUNT].value)
    imx.chunk_size = int(g.fields[KEY_CHUNK_SIZE].value)
    ds = g.fields.get(KEY_DATASETS)
    if ds is None:
        raise QuantkitError(f"the importance matrix lacks {KEY_DATASETS} (llama-quantize refuses it)", p,
                            HOW_TO_MAKE)
    if ds.vtype != GGUFValueType.ARRAY or ds.sub_type != GGUFValueType.STRING:
        raise QuantkitError(f"{KEY_DATASETS} is not an array of strings", p, "corrupt file")
    imx.datasets = [str(s) for s in ds.value]
    if g.tensors:                               # llama.cpp reads the data section whole, padding included
        last = g.tensors[-1]
        if last.offset + (last.nbytes + _ALIGN - 1) // _ALIGN * _ALIGN > g.size:
            raise QuantkitError("corrupt GGUF importance matrix: the tensor data section is truncated", p,
                                HOW_TO_MAKE)
    pairs: dict[str, list] = {}
    for t in g.tensors:
        for suffix, slot in ((SUM_SUFFIX, 0), (COUNT_SUFFIX, 1)):
            if t.name.endswith(suffix) and len(t.name) > len(suffix):
                pairs.setdefault(t.name[: -len(suffix)], [None, None])[slot] = t
    if not pairs:
        raise QuantkitError("the GGUF holds no .in_sum2/.counts tensors: not an importance matrix", p, HOW_TO_MAKE)
    for name in sorted(pairs):
        s, c = pairs[name]
        if s is None or c is None:
            missing = SUM_SUFFIX if s is None else COUNT_SUFFIX
            raise QuantkitError(f"importance matrix entry {shown(name)} has no {missing} tensor", p, "corrupt file")
        for t in (s, c):
            if t.ggml_type != GGMLQuantizationType.F32:
                raise QuantkitError(f"tensor {shown(t.name)} is {t.ggml_type.name}, must be F32", p, "corrupt file")
        n_mat = int(np.prod(c.shape))
        n = int(np.prod(s.shape))
        if n_mat < 1 or n % n_mat:
            raise QuantkitError(f"importance matrix entry {shown(name)}: {n} sums do not divide into {n_mat} counts",
                                p, "corrupt file")
        sums = np.array(g.data(s).view(np.float32)).reshape(n_mat, n // n_mat)
        counts = np.rint(g.data(c).view(np.float32).astype(np.float64))    # std::lround
        imx.entries[name] = ImatrixEntry(sums, counts)
    return imx


class _Cursor:
    def __init__(self, data: bytes, path: str):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise QuantkitError(f"legacy importance matrix truncated: {what} at byte {self.pos} needs {n} bytes, "
                                f"{len(self.data) - self.pos} left", self.path, HOW_TO_MAKE)
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def i32(self, what: str) -> int:
        return struct.unpack("<i", self.take(4, what))[0]


def _read_dat(p: str) -> Imatrix:
    with open(p, "rb") as f:
        data = f.read()
    cur = _Cursor(data, p)
    n_entries = cur.i32("the entry count")
    if n_entries < 1 or n_entries > len(data) // 16:
        raise QuantkitError(f"not an importance matrix (neither GGUF nor a legacy .dat: entry count {n_entries})",
                            p, HOW_TO_MAKE)
    imx = Imatrix(legacy=True)
    for i in range(n_entries):
        ln = cur.i32(f"the name length of entry {i}")
        if not 0 < ln <= 1024:
            raise QuantkitError(f"legacy importance matrix entry {i} has a name of {ln} bytes", p, "corrupt file")
        try:
            name = cur.take(ln, f"the name of entry {i}").decode("utf-8")
        except UnicodeDecodeError:
            raise QuantkitError(f"legacy importance matrix entry {i} has a name that is not UTF-8", p,
                                "corrupt file") from None
        ncall = cur.i32(f"the call count of {shown(name)}")
        nval = cur.i32(f"the value count of {shown(name)}")
        if nval < 1 or ncall < 0:
            raise QuantkitError(f"legacy importance matrix entry {shown(name)} has {nval} values and call count "
                                f"{ncall}", p, "corrupt file")
        if name in imx.entries:
            raise QuantkitError(f"legacy importance matrix entry {shown(name)} appears twice", p, "corrupt file")
        vals = np.frombuffer(cur.take(4 * nval, f"the {nval} values of {shown(name)}"), dtype="<f4")
        imx.entries[name] = ImatrixEntry(vals.astype(np.float32).reshape(1, -1), np.array([float(ncall)]))
    if cur.pos < len(data):                     # optional trailer: chunk count, dataset name
        imx.chunk_count = cur.i32("the chunk count")
        if cur.pos < len(data):
            ln = cur.i32("the dataset name length")
            if ln < 0:
                raise QuantkitError(f"legacy importance matrix has a dataset name of {ln} bytes", p, "corrupt file")
            if ln:
                imx.datasets.append(cur.take(ln, "the dataset name").decode("utf-8", errors="replace"))
        if cur.pos != len(data):
            raise QuantkitError(f"legacy importance matrix has {len(data) - cur.pos} unexpected bytes at its end",
                                p, "corrupt file")
    return imx


# ---------------------------------------------------------------------------------------------- writing

def _gguf_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def write_imatrix(imx: Imatrix, path: str | os.PathLike) -> None:
    """Write `imx` as llama-imatrix's GGUF (layout of gguf_write_to_file: keys, tensor infos,
    data padded to 32 bytes), atomically."""
    if imx.legacy:
        raise ValueError("a legacy imatrix holds no raw sums; convert it with from_legacy first")
    names = sorted(imx.entries)
    kv = [_gguf_string("general.type") + struct.pack("<I", GGUFValueType.STRING) + _gguf_string("imatrix"),
          _gguf_string(KEY_DATASETS) + struct.pack("<IIQ", GGUFValueType.ARRAY, GGUFValueType.STRING,
                                                   len(imx.datasets)) + b"".join(_gguf_string(d) for d in imx.datasets),
          _gguf_string(KEY_CHUNK_COUNT) + struct.pack("<II", GGUFValueType.UINT32, imx.chunk_count),
          _gguf_string(KEY_CHUNK_SIZE) + struct.pack("<II", GGUFValueType.UINT32, imx.chunk_size)]
    infos, blobs, off = [], [], 0
    for name in names:
        e = imx.entries[name]
        n_mat, n = e.sums.shape
        for tname, ne, arr in ((name + SUM_SUFFIX, (n, n_mat), e.sums.astype(np.float32)),
                               (name + COUNT_SUFFIX, (1, n_mat), e.counts.astype(np.float32))):
            raw = np.ascontiguousarray(arr, dtype="<f4").tobytes()
            nd = 2 if ne[1] > 1 else 1                  # ggml_n_dims: trailing 1s are not written
            infos.append(_gguf_string(tname) + struct.pack("<I", nd) + struct.pack(f"<{nd}Q", *ne[:nd])
                         + struct.pack("<IQ", GGMLQuantizationType.F32, off))
            pad = (-len(raw)) % _ALIGN
            blobs.append(raw + b"\0" * pad)
            off += len(raw) + pad
    head = b"GGUF" + struct.pack("<IQQ", 3, len(infos), len(kv)) + b"".join(kv) + b"".join(infos)
    head += b"\0" * ((-len(head)) % _ALIGN)
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(head)
            for b in blobs:
                f.write(b)


def write_imatrix_dat(imx: Imatrix, path: str | os.PathLike) -> None:
    """Write `imx` as llama-imatrix's legacy .dat (save_imatrix_legacy): entries with no token
    at all are left out; values become (sum / count) * ncall, ncall = ceil(max count / chunk_size)."""
    if imx.legacy:
        raise ValueError("already a legacy imatrix")
    chunk = max(1, imx.chunk_size)
    parts = []
    names = [n for n in sorted(imx.entries) if (imx.entries[n].counts > 0).any()]
    for name in names:
        e = imx.entries[name]
        ncall = int((int(e.counts.max()) + chunk - 1) // chunk)
        c = e.counts.astype(np.float32)[:, None]
        s = e.sums.astype(np.float32)
        zero = c == 0
        val = np.where(zero, np.float32(1), s) / np.where(zero, np.float32(1), c)
        val = (val.astype(np.float32) * np.float32(ncall)).astype("<f4")
        b = name.encode("utf-8")
        parts.append(struct.pack("<i", len(b)) + b + struct.pack("<ii", ncall, val.size) + val.tobytes())
    dataset = (imx.datasets[-1] if imx.datasets else "").encode("utf-8")
    data = (struct.pack("<i", len(names)) + b"".join(parts) + struct.pack("<i", imx.chunk_count)
            + struct.pack("<i", len(dataset)) + dataset)
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def save_imatrix(imx: Imatrix, path: str | os.PathLike) -> None:
    """GGUF unless the name ends in .dat (llama-imatrix's --output-format dat)."""
    if os.fspath(path).endswith(".dat"):
        write_imatrix_dat(imx, path)
    else:
        write_imatrix(imx, path)


def from_legacy(imx: Imatrix, chunk_size: int) -> Imatrix:
    """A legacy imatrix as raw sums and counts, as llama-imatrix's load_imatrix rebuilds them
    (sums * chunk_size, counts ncall * chunk_size)."""
    out = Imatrix(datasets=list(imx.datasets), chunk_count=imx.chunk_count, chunk_size=chunk_size)
    for name, e in imx.entries.items():
        out.entries[name] = ImatrixEntry((e.sums * np.float32(chunk_size)).astype(np.float32),
                                         e.counts[:1] * chunk_size)
    return out
