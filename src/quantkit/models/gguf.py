"""Read and write GGUF files.

Reading memory-maps the file (models/gguf_file.py): `load(name)` dequantizes one tensor, so
peak memory stays near the largest tensor. Writing streams: header, metadata and tensor infos
first, then each tensor's bytes as it is produced, into a temporary name renamed only when the
file is complete (gguf-py's GGUFWriter enforces the order).
"""

from __future__ import annotations

import os
import struct
import warnings
from typing import Callable

import numpy as np
import torch
from gguf import GGUFValueType, GGUFWriter
from gguf.gguf_writer import WriterState

from ..codecs.registry import qtype
from ..util.atomic import atomic_output
from ..util.errors import QuantkitError
from .gguf_file import GGUFFile, GGUFFormatError, GGUFStrings
from .gguf_hparams import read_hparams
from .source import ArchSpec, MetaValue, ModelSource, TensorInfo, Tokenizer

# Tensors over a read-only memory map are only ever read here.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

# Keys a writer sets itself, or that describe the container rather than the model.
_WRITER_KEYS = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.architecture",
                "general.file_type", "general.quantization_version", "general.alignment",
                "split.no", "split.count", "split.tensors.count"}


def dequantize_bytes(type_name: str, data: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """Stored bytes (or values) of a tensor -> float32 torch tensor of `shape` (row-major)."""
    return qtype(type_name).dequantize(data, shape)


def _u(meta: dict[str, MetaValue], key: str, default=None):
    v = meta.get(key)
    return default if v is None else v.value


def spec_from_metadata(meta: dict[str, MetaValue], tensors: dict[str, tuple[int, ...]], path: str) -> ArchSpec:
    """The architecture spec from checked metadata (models.gguf_hparams); `tensors`: name -> shape."""
    hp = read_hparams(meta, tensors, path)
    pattern = hp.sliding_window_pattern
    if hp.sliding_window and pattern is None:
        if hp.arch == "gemma3":
            # llama.cpp hard-codes Gemma-3's pattern: every 6th layer is global.
            pattern = [(i + 1) % 6 != 0 for i in range(hp.n_layer)]
        else:
            pattern = [True] * hp.n_layer
    return ArchSpec(
        arch=hp.arch, n_layer=hp.n_layer, n_embd=hp.n_embd, n_head=hp.n_head, n_head_kv=hp.n_head_kv,
        head_dim=hp.head_dim, n_ff=hp.n_ff, n_vocab=hp.n_vocab, n_ctx_train=hp.n_ctx_train,
        tied_embeddings="output.weight" not in tensors, sliding_window=hp.sliding_window,
        sliding_window_pattern=pattern if hp.sliding_window else None,
        norm="layer" if hp.layer_norm else "rms", rope_theta=hp.rope_theta, n_expert=hp.n_expert,
        n_expert_used=hp.n_expert_used)


class GGUFSource(ModelSource):
    """A GGUF file of any type llama.cpp writes, memory-mapped."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise QuantkitError("no such file", self.path, "check the path")
        if os.path.isdir(self.path):
            raise QuantkitError("is a directory, expected a .gguf file", self.path)
        try:
            with open(self.path, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise QuantkitError(f"cannot read: {e.strerror}", self.path) from None
        if magic != b"GGUF":
            raise QuantkitError("not a GGUF file (bad magic)", self.path, "expected a llama.cpp .gguf")
        try:
            self._file = GGUFFile(self.path)
        except GGUFFormatError as e:
            raise QuantkitError(f"corrupt or truncated GGUF: {e}", self.path,
                                "re-download or re-create the file") from None
        fields = self._file.fields
        self.metadata = {k: MetaValue(f.value, f.vtype, f.sub_type) for k, f in fields.items()
                         if k not in _WRITER_KEYS or k == "general.architecture"}
        self._entries = {t.name: t for t in self._file.tensors}
        self._infos = {t.name: TensorInfo(t.name, t.shape, t.ggml_type.name.lower(), t.nbytes)
                       for t in self._file.tensors}
        self.spec = spec_from_metadata(self.metadata, {t.name: t.shape for t in self._file.tensors}, self.path)
        self.tokenizer = Tokenizer(model=_u(self.metadata, "tokenizer.ggml.model") or "none",
                                   pre=_u(self.metadata, "tokenizer.ggml.pre"),
                                   n_tokens=len(_u(self.metadata, "tokenizer.ggml.tokens") or []))
        self.file_type = fields["general.file_type"].value if "general.file_type" in fields else None

    def tensors(self) -> list[TensorInfo]:
        return list(self._infos.values())

    def tensor_info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def raw(self, name: str):
        """Stored bytes: a read-only view of the memory map (no copy)."""
        return self._file.data(self._entries[name]), self._infos[name].type

    def load(self, name: str) -> torch.Tensor:
        """float32; for an F32 tensor a read-only view of the map (never write into it)."""
        info = self._infos[name]
        return dequantize_bytes(info.type, self._file.data(self._entries[name]), info.shape)

    def load_rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        """Rows r0:r1 (of ne1) of a 2-D tensor, float32, a fresh copy: only those rows' bytes are
        read and dequantized, and their pages dropped from RSS again."""
        info = self._infos[name]
        rows, n = info.shape
        if not 0 <= r0 <= r1 <= rows:
            raise IndexError(f"rows {r0}:{r1} of {name} with {rows} rows")
        e = self._entries[name]
        row_bytes = e.nbytes // rows
        data = self._file.data(e)[r0 * row_bytes:r1 * row_bytes]
        out = dequantize_bytes(info.type, data, (r1 - r0, n)).clone()
        del data
        self._file.release(e)
        return out

    def release(self, name: str) -> None:
        self._file.release(self._entries[name])

    def close(self) -> None:
        self._file.close()


# --------------------------------------------------------------------------------------------
# Writing

_NUMPY_OF = {GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
             GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
             GGUFValueType.FLOAT32: "<f4", GGUFValueType.UINT64: "<u8", GGUFValueType.INT64: "<i8",
             GGUFValueType.FLOAT64: "<f8"}


class _FastWriter(GGUFWriter):
    """GGUFWriter packing long arrays (a 262k-token vocabulary) in bulk instead of item by item;
    the bytes are the same as gguf-py's."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        if vtype != GGUFValueType.ARRAY or sub_type is None or len(val) < 64:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        head = struct.pack("<I", vtype) if add_vtype else b""
        head += struct.pack("<IQ", sub_type, len(val))
        if sub_type in _NUMPY_OF:
            return head + np.asarray(val, dtype=_NUMPY_OF[sub_type]).tobytes()
        if sub_type == GGUFValueType.STRING:
            if isinstance(val, GGUFStrings):     # as read from a GGUF: copy its bytes
                return head + val.payload
            enc = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in val]
            lens = np.fromiter((len(e) for e in enc), dtype="<u8", count=len(enc))
            parts = [None] * (2 * len(enc))
            parts[0::2] = [l.tobytes() for l in lens]
            parts[1::2] = enc
            return head + b"".join(parts)
        return super()._pack_val(val, vtype, add_vtype, sub_type)

    def write_tensor_data(self, tensor: np.ndarray, tensor_endianess=None) -> None:
        """gguf-py's, but through file.write: numpy's tofile reports a short write (a full disk)
        without an errno, file.write raises OSError(ENOSPC) that the caller can name."""
        if self.state not in (WriterState.TI_DATA, WriterState.WEIGHTS):
            raise ValueError(f"expected tensor info or weights, got {self.state}")
        file_id = next(i for i, ts in enumerate(self.tensors) if ts)
        fout = self.fout[file_id]
        ti = self.tensors[file_id].pop(next(iter(self.tensors[file_id])))
        assert ti.nbytes == tensor.nbytes
        self.write_padding(fout, fout.tell())
        fout.write(memoryview(np.ascontiguousarray(tensor).reshape(-1).view(np.uint8)))
        self.write_padding(fout, tensor.nbytes)
        self.state = WriterState.WEIGHTS


def _check_vocabulary(metadata: dict[str, MetaValue], path) -> None:
    """llama.cpp aborts on a vocabulary that holds one token string twice (an assert in its
    loader; it reads each token as a C string, so up to its first NUL byte, and names an empty
    one "[EMPTY_i]"): such a file is never written."""
    mv = metadata.get("tokenizer.ggml.tokens")
    if mv is None:
        return
    if isinstance(mv.value, GGUFStrings):
        p, pos, items = mv.value.payload, 0, []
        unpack_q = struct.Struct("<Q").unpack_from
        for _ in range(len(mv.value)):
            (n,) = unpack_q(p, pos)
            items.append(p[pos + 8:pos + 8 + n])
            pos += 8 + n
    else:
        items = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in mv.value]
    items = [t.split(b"\0", 1)[0] or b"[EMPTY_%d]" % i for i, t in enumerate(items)]
    if len(set(items)) != len(items):
        seen = set()
        dup = next(t for t in items if t in seen or seen.add(t))
        raise QuantkitError(f"the vocabulary holds the token {dup[:60]!r} twice; llama.cpp cannot load such a "
                            "file", path, "fix tokenizer.ggml.tokens of the source model")


def write_gguf_file(path: str | os.PathLike, arch: str, metadata: dict[str, MetaValue],
                    tensors: list[tuple[str, tuple[int, ...], str]],
                    produce: Callable[[str], np.ndarray], file_type: int | None = None,
                    on_tensor: Callable[[str, int], None] | None = None,
                    extra_metadata: dict[str, MetaValue] | None = None) -> None:
    """Stream a GGUF: `tensors` lists (name, row-major shape, type name) in file order;
    `produce(name)` returns the tensor's bytes (uint8, exactly qtype.nbytes(shape)) one at a time.
    `extra_metadata`: keys written last, after general.file_type, replacing any of the same name
    in `metadata` (llama-quantize's quantize.imatrix.* keys). The file appears at `path` only
    when complete."""
    _check_vocabulary(metadata, path)
    with atomic_output(path) as tmp:
        w = _FastWriter(tmp, arch)
        extra = extra_metadata or {}
        for key, mv in metadata.items():
            if key in _WRITER_KEYS or key in extra:
                continue
            if mv.vtype == GGUFValueType.ARRAY and len(mv.value) == 0:
                continue
            w.add_key_value(key, mv.value, mv.vtype, mv.sub_type)
        w.add_quantization_version(2)
        if file_type is not None:
            w.add_file_type(int(file_type))
        for key, mv in extra.items():
            w.add_key_value(key, mv.value, mv.vtype, mv.sub_type)
        sizes = {}
        for name, shape, tname in tensors:
            q = qtype(tname)
            nbytes = q.nbytes(shape)
            sizes[name] = nbytes
            # GGUFWriter takes the numpy shape of the bytes for quantized types and derives ne from it.
            if q.block_size == 1 and q.name in ("f32", "f16"):
                w.add_tensor_info(name, shape, np.dtype(np.float32 if q.name == "f32" else np.float16), nbytes)
            else:
                byte_shape = tuple(shape[:-1]) + (q.row_bytes(shape[-1]),)
                w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=q.ggml)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for name, shape, tname in tensors:
            data = np.ascontiguousarray(produce(name)).view(np.uint8).reshape(-1)
            if data.nbytes != sizes[name]:
                raise ValueError(f"{name}: produced {data.nbytes} bytes, expected {sizes[name]}")
            w.write_tensor_data(data)
            if on_tensor:
                on_tensor(name, data.nbytes)
        w.close()
