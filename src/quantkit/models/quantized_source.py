"""A quantized Hugging Face checkpoint as a source: its weights dequantized, and the grid each
quantized linear came from.

Formats read (config.json `quantization_config`, or quantize_config.json beside it):

    gptq                 P.qweight int32 [in*bits/32, out] (codes packed along `in`,
                         codecs.intpack), P.qzeros int32 [groups, out*bits/32], P.scales fp16
                         [groups, out], P.g_idx int32 [in] (optional: i // group_size).
                         checkpoint_format "gptq" (v1) stores zero - 1, "gptq_v2" the zero.
                         bits 2, 3, 4, 8; desc_act with a permuted g_idx is read as it is.
    awq (version gemm)   P.qweight int32 [in, out/8], P.qzeros int32 [in/g, out/8], nibbles in
                         AutoAWQ's order [0, 2, 4, 6, 1, 3, 5, 7] within each word; P.scales
                         fp16 [in/g, out]; W = (q - z) * s.
    compressed-tensors   pack-quantized: P.weight_packed int32 [out, in*bits/32], P.weight_scale
                         [out, groups], P.weight_zero_point int32 [out*bits/32, groups]
                         (asymmetric), P.weight_g_idx (act-order "group"), P.weight_shape;
                         float-quantized (FP8 E4M3): P.weight [out, in] with P.weight_scale per
                         output channel [out, 1], per block [out/bo, in/bi] or per tensor.

`QuantizedHFSource` is an `HFSource` whose quantized linears load as their dequantized float32
weights (W = (q - z) * s, exactly, in float32), so every consumer of a ModelSource (the GGUF
writers, GPTQ's block loop) reads such a checkpoint as it reads a float one; `grid(gguf_name)`
gives the `SourceGrid` a tensor came from (codes, scales, zeros, permutation). Inconsistent
checkpoints (tensors that disagree with the config's bits or group size, a missing qzeros) and
methods not read here end in one QuantkitError line.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from ..codecs.intpack import packed_length, unpack_int32
from ..util.errors import QuantkitError
from .hf import HFSource
from .safetensors_file import SafetensorsFile, shown

METHODS = ("gptq", "awq", "compressed-tensors")
CT_FORMATS = ("pack-quantized", "float-quantized")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)      # column of nibble k within an AWQ word
_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
          "I32": torch.int32, "I64": torch.int64, "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_FLOAT_TYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64"}


@dataclass
class QuantConfig:
    """What config.json says about how the weights were quantized."""
    method: str                   # gptq | awq | compressed-tensors
    bits: int
    group_size: int               # -1: one scale per output channel
    sym: bool
    fmt: str = ""                 # gptq: "gptq" | "gptq_v2"; awq: "gemm"; ct: pack-quantized | float-quantized
    act_order: bool = False
    strategy: str = "group"       # ct: group | channel | block | tensor
    block: tuple[int, int] | None = None    # ct FP8 block scales: (rows, columns) per scale
    ignore: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.fmt == "float-quantized":
            return f"{self.method} fp8 ({self.strategy})"
        g = "per channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"{self.method} {self.bits}-bit {g} {'sym' if self.sym else 'asym'}" + (" act-order" if self.act_order else "")


@dataclass
class SourceGrid:
    """The grid one linear was quantized onto, in Hugging Face orientation W [out, in]:
    integer grids W = (q - zeros[:, g]) * scales[:, g] with g = g_idx[column]; FP8 grids
    W = fp8 * scale (q None, `fp8` the decoded values)."""
    bits: int
    group_size: int               # columns per group as stored (-1: per output channel)
    sym: bool
    scales: torch.Tensor          # float32 [out, groups] (FP8: [out/bo, in/bi] or [out, 1] or [1, 1])
    scale_dtype: torch.dtype      # as stored
    q: torch.Tensor | None = None         # int32 [out, in], unsigned codes 0 .. 2**bits - 1
    zeros: torch.Tensor | None = None     # int32 [out, groups]
    g_idx: torch.Tensor | None = None     # int64 [in]; None: column // group_size
    fp8: torch.Tensor | None = None       # float32 [out, in] FP8 values before scaling
    block: tuple[int, int] | None = None  # FP8 block scales

    @property
    def shape(self) -> tuple[int, int]:
        t = self.q if self.q is not None else self.fp8
        return tuple(t.shape)

    def groups(self) -> torch.Tensor:
        """The group of each input column, int64 [in]."""
        out_f, in_f = self.shape
        if self.g_idx is not None:
            return self.g_idx
        width = in_f if self.group_size == -1 else self.group_size
        return torch.arange(in_f) // width

    def column_scales(self) -> torch.Tensor:
        return self.scales[:, self.groups()]

    def column_zeros(self) -> torch.Tensor:
        return self.zeros[:, self.groups()]

    def act_order_permuted(self) -> bool:
        """Columns are not in group order (desc_act without static groups)."""
        g = self.groups()
        return bool((g[1:] < g[:-1]).any()) if g.numel() > 1 else False

    def dequantize(self) -> torch.Tensor:
        """W [out, in] float32, exactly (q - z) * s (FP8: value * scale)."""
        if self.fp8 is not None:
            out_f, in_f = self.fp8.shape
            s = self.scales
            if self.block is not None:
                bo, bi = self.block
                s = s.repeat_interleave(bo, 0)[:out_f].repeat_interleave(bi, 1)[:, :in_f]
            return (self.fp8 * s).contiguous()
        g = self.groups()
        return ((self.q - self.zeros[:, g]).float() * self.scales[:, g]).contiguous()


def _fail(msg: str, path: str, hint: str | None = None):
    raise QuantkitError(msg, path, hint)


def read_quant_config(model_dir: str, config: dict) -> QuantConfig | None:
    """The quantization config of a checkpoint directory (None: a float checkpoint)."""
    qc = config.get("quantization_config")
    where = os.path.join(model_dir, "config.json")
    if qc is None:
        qpath = os.path.join(model_dir, "quantize_config.json")
        if not os.path.isfile(qpath):
            return None
        try:
            with open(qpath, encoding="utf-8") as f:
                qc = json.load(f)
        except (OSError, ValueError) as e:
            _fail(f"cannot read quantize_config.json ({type(e).__name__})", qpath, "the file is corrupt")
        qc.setdefault("quant_method", "gptq")
        where = qpath
    if not isinstance(qc, dict):
        _fail("quantization_config is not a JSON object", where)
    method = str(qc.get("quant_method", "")).lower()
    if method not in METHODS:
        _fail(f"quantization method '{shown(method or '(none)')}' is not read by quantkit", where,
              "supported: " + ", ".join(METHODS) + "; give a float checkpoint instead")
    try:
        if method == "gptq":
            fmt = str(qc.get("checkpoint_format", "gptq")).lower()
            if fmt not in ("gptq", "gptq_v2"):
                _fail(f"GPTQ checkpoint_format '{shown(fmt)}' is not read by quantkit", where,
                      "supported: gptq (v1), gptq_v2")
            return QuantConfig("gptq", int(qc["bits"]), int(qc.get("group_size", -1)), bool(qc.get("sym", True)),
                               fmt, bool(qc.get("desc_act", False)))
        if method == "awq":
            version = str(qc.get("version", "gemm")).lower()
            if version != "gemm":
                _fail(f"AWQ version '{shown(version)}' is not read by quantkit", where, "supported: gemm")
            return QuantConfig("awq", int(qc.get("bits", qc.get("w_bit", 4))),
                               int(qc.get("group_size", qc.get("q_group_size", 128))),
                               not bool(qc.get("zero_point", True)), "gemm")
        return _ct_config(qc, where)
    except (KeyError, TypeError, ValueError) as e:
        _fail(f"quantization_config is incomplete ({type(e).__name__}: {shown(str(e))})", where)


def _ct_config(qc: dict, where: str) -> QuantConfig:
    fmt = str(qc.get("format", "")).lower()
    if fmt not in CT_FORMATS:
        _fail(f"compressed-tensors format '{shown(fmt or '(none)')}' is not read by quantkit", where,
              "supported: " + ", ".join(CT_FORMATS))
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        _fail(f"compressed-tensors with {len(groups)} config groups is not read by quantkit", where,
              "one group of Linear targets is")
    w = next(iter(groups.values())).get("weights") or {}
    strategy = str(w.get("strategy", "group"))
    typ = str(w.get("type", "int"))
    if (typ == "float") != (fmt == "float-quantized"):
        _fail(f"compressed-tensors weights of type {typ} cannot be {fmt}", where)
    block = tuple(int(x) for x in w["block_structure"]) if strategy == "block" else None
    gs = w.get("group_size")
    return QuantConfig("compressed-tensors", int(w["num_bits"]), -1 if gs is None else int(gs),
                       bool(w.get("symmetric", True)), fmt, w.get("actorder") in ("group", "weight"), strategy,
                       block, tuple(qc.get("ignore") or ()))


class _Tensors:
    """Every tensor of a checkpoint's safetensors shards, by name, as torch tensors."""

    def __init__(self, model_dir: str):
        files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
        if not files:
            _fail("no *.safetensors weights", model_dir, "a quantized checkpoint stores its tensors in safetensors")
        self.files = [SafetensorsFile(f) for f in files]
        self.where: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for name in f.entries:
                self.where[name] = f

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.where[name].entries[name].shape)

    def get(self, name: str) -> torch.Tensor:
        f = self.where[name]
        e = f.entries[name]
        if e.dtype not in _TORCH:
            _fail(f"tensor {shown(name)} has dtype {e.dtype}, which quantkit does not read", f.path)
        buf = f.read(name, e.begin, e.nbytes)
        dt = _TORCH[e.dtype]
        if not buf:
            return torch.empty(e.shape, dtype=dt)
        if dt in (torch.float8_e4m3fn, torch.float8_e5m2):
            return torch.frombuffer(buf, dtype=torch.uint8).view(dt).reshape(e.shape)
        return torch.frombuffer(buf, dtype=dt).reshape(e.shape)

    def close(self) -> None:
        for f in self.files:
            f.close()


# tensor suffixes that make a linear quantized, per method (the first names the linear)
_MARKERS = {"gptq": ".qweight", "awq": ".qweight", "pack-quantized": ".weight_packed",
            "float-quantized": ".weight_scale"}
_PARTS = {"gptq": (".qweight", ".qzeros", ".scales", ".g_idx"), "awq": (".qweight", ".qzeros", ".scales"),
          "pack-quantized": (".weight_packed", ".weight_scale", ".weight_zero_point", ".weight_g_idx",
                             ".weight_shape"),
          "float-quantized": (".weight_scale", ".input_scale", ".weight_zero_point")}


class QuantizedCheckpoint:
    """The tensors of a quantized checkpoint: float ones as stored, each quantized linear P as a
    virtual float tensor P.weight (its dequantized weight) with its grid."""

    def __init__(self, model_dir: str, cfg: QuantConfig):
        self.dir, self.cfg = model_dir, cfg
        self.t = _Tensors(model_dir)
        key = cfg.fmt if cfg.method == "compressed-tensors" else cfg.method
        marker = _MARKERS[key]
        self.linears = sorted(n[: -len(marker)] for n in self.t.where if n.endswith(marker)
                              and (key != "float-quantized" or n[: -len(marker)] + ".weight" in self.t))
        if not self.linears:
            _fail(f"config.json says {cfg.describe()} but no tensor ends in {marker}", model_dir,
                  "the weights do not match quantization_config")
        owned = {p + s for p in self.linears for s in _PARTS[key]}
        if key == "float-quantized":
            owned |= {p + ".weight" for p in self.linears}
        self.floats = {n: self.t.shape(n) for n in self.t.where if n not in owned}
        self.info: dict[str, tuple[tuple[int, int], torch.dtype]] = {}
        for p in self.linears:          # every linear checked up front: a bad one fails before any work
            g = self.grid(p)
            self.info[p] = (g.shape, g.scale_dtype)

    def path_of(self, name: str) -> str:
        return self.t.where[name].path

    def grid(self, prefix: str) -> SourceGrid:
        """The grid of quantized linear `prefix`, read from the files now (nothing is cached)."""
        return {"gptq": self._gptq, "awq": self._awq}.get(self.cfg.method, self._ct)(prefix)

    def get_tensor(self, name: str) -> torch.Tensor:
        """A float tensor as stored, or (P.weight of a quantized linear) its dequantized weight."""
        if name.endswith(".weight") and name[:-7] in self.info:
            return self.grid(name[:-7]).dequantize()
        return self.t.get(name)

    # ---- per method ------------------------------------------------------------------------
    def _need(self, prefix: str, suffix: str) -> torch.Tensor:
        name = prefix + suffix
        if name not in self.t:
            _fail(f"{name} is missing ({self.cfg.describe()} needs it)", self.path_of(_first(self.t, prefix)),
                  "the checkpoint is incomplete or its config.json names the wrong method")
        return self.t.get(name)

    def _mismatch(self, prefix: str, what: str) -> None:
        _fail(f"{prefix}: {what}, which disagrees with config.json ({self.cfg.describe()})",
              self.path_of(_first(self.t, prefix)), "the config and the tensors come from different checkpoints")

    def _groups_of(self, in_f: int) -> int:
        gs = self.cfg.group_size
        return 1 if gs == -1 else -(-in_f // gs)

    def _gptq(self, prefix: str) -> SourceGrid:
        bits = self.cfg.bits
        qweight, scales = self._need(prefix, ".qweight"), self._need(prefix, ".scales")
        qzeros = self._need(prefix, ".qzeros")
        if bits not in (2, 3, 4, 8) or qweight.dim() != 2 or scales.dim() != 2:
            self._mismatch(prefix, f"bits {bits} / qweight {list(qweight.shape)}")
        out_f = qweight.shape[1]
        in_f = qweight.shape[0] * 32 // bits
        g_idx = self.t.get(prefix + ".g_idx").long() if prefix + ".g_idx" in self.t else None
        if g_idx is not None and g_idx.numel() != in_f:
            self._mismatch(prefix, f"qweight {list(qweight.shape)} holds {in_f} input columns at {bits} bits "
                                   f"but g_idx has {g_idx.numel()}")
        n_groups = self._groups_of(in_f)
        if tuple(scales.shape) != (n_groups, out_f):
            self._mismatch(prefix, f"scales {list(scales.shape)} for {in_f} input columns "
                                   f"(expected [{n_groups}, {out_f}])")
        if tuple(qzeros.shape) != (n_groups, packed_length(out_f, bits)):
            self._mismatch(prefix, f"qzeros {list(qzeros.shape)} (expected [{n_groups}, {packed_length(out_f, bits)}])")
        if g_idx is not None and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
            self._mismatch(prefix, f"g_idx names groups outside 0..{n_groups - 1}")
        q = unpack_int32(qweight, bits, in_f, dim=0).t().contiguous()
        z = unpack_int32(qzeros, bits, out_f, dim=1).t().contiguous()
        if self.cfg.fmt == "gptq":
            z = z + 1
        return SourceGrid(bits, self.cfg.group_size, self.cfg.sym, scales.float().t().contiguous(), scales.dtype,
                          q, z, _nontrivial(g_idx, in_f, self.cfg.group_size))

    def _awq(self, prefix: str) -> SourceGrid:
        bits = self.cfg.bits
        if bits != 4:
            self._mismatch(prefix, f"AWQ GEMM packs 4-bit codes, not {bits}")
        qweight, scales = self._need(prefix, ".qweight"), self._need(prefix, ".scales")
        qzeros = self._need(prefix, ".qzeros")
        in_f, out_f = qweight.shape[0], qweight.shape[1] * 8
        n_groups = self._groups_of(in_f)
        if tuple(scales.shape) != (n_groups, out_f):
            self._mismatch(prefix, f"scales {list(scales.shape)} for qweight {list(qweight.shape)} "
                                   f"(expected [{n_groups}, {out_f}])")
        if tuple(qzeros.shape) != (n_groups, out_f // 8):
            self._mismatch(prefix, f"qzeros {list(qzeros.shape)} (expected [{n_groups}, {out_f // 8}])")
        q = awq_unpack(qweight).t().contiguous()
        z = awq_unpack(qzeros).t().contiguous()
        return SourceGrid(4, self.cfg.group_size, self.cfg.sym, scales.float().t().contiguous(), scales.dtype, q, z)

    def _ct(self, prefix: str) -> SourceGrid:
        cfg = self.cfg
        if cfg.fmt == "float-quantized":
            w, s = self._need(prefix, ".weight"), self._need(prefix, ".weight_scale")
            if w.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2) or w.dim() != 2:
                self._mismatch(prefix, f"weight of dtype {w.dtype} (FP8 expected)")
            out_f, in_f = w.shape
            s = s.float().reshape(s.shape[0] if s.dim() else 1, -1)
            if cfg.block is not None:
                bo, bi = cfg.block
                want = (-(-out_f // bo), -(-in_f // bi))
            else:
                want = (out_f, 1) if cfg.strategy == "channel" else (1, 1)
            if tuple(s.shape) != want:
                self._mismatch(prefix, f"weight_scale {list(s.shape)} for weight {list(w.shape)} (expected {list(want)})")
            return SourceGrid(cfg.bits, -1, True, s, torch.float32, fp8=w.float(), block=cfg.block)
        bits = cfg.bits
        packed, scales = self._need(prefix, ".weight_packed"), self._need(prefix, ".weight_scale")
        shape = self._need(prefix, ".weight_shape")
        out_f, in_f = (int(v) for v in shape)
        if tuple(packed.shape) != (out_f, packed_length(in_f, bits)):
            self._mismatch(prefix, f"weight_packed {list(packed.shape)} for shape [{out_f}, {in_f}] at {bits} bits")
        n_groups = self._groups_of(in_f)
        if tuple(scales.shape) != (out_f, n_groups):
            self._mismatch(prefix, f"weight_scale {list(scales.shape)} (expected [{out_f}, {n_groups}])")
        q = unpack_int32(packed, bits, in_f, dim=1)
        if cfg.sym:
            z = torch.full((out_f, n_groups), 2 ** (bits - 1), dtype=torch.int32)
        else:
            zp = self._need(prefix, ".weight_zero_point")
            if tuple(zp.shape) != (packed_length(out_f, bits), n_groups):
                self._mismatch(prefix, f"weight_zero_point {list(zp.shape)}")
            z = unpack_int32(zp, bits, out_f, dim=0)
        g_idx = self.t.get(prefix + ".weight_g_idx").long() if prefix + ".weight_g_idx" in self.t else None
        return SourceGrid(bits, cfg.group_size, cfg.sym, scales.float(), scales.dtype, q, z,
                          _nontrivial(g_idx, in_f, cfg.group_size))

    def close(self) -> None:
        self.t.close()


def _first(t: _Tensors, prefix: str) -> str:
    return next(n for n in t.where if n.startswith(prefix + "."))


def _nontrivial(g_idx: torch.Tensor | None, in_f: int, group_size: int) -> torch.Tensor | None:
    """g_idx, or None where it is the plain column // group_size."""
    if g_idx is None or group_size == -1:
        return g_idx if group_size != -1 else None
    return None if torch.equal(g_idx, torch.arange(in_f) // group_size) else g_idx


def awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    """AutoAWQ GEMM int32 [rows, cols/8] -> 4-bit codes int32 [rows, cols] (nibble k of a word
    holds column AWQ_ORDER[k] of its 8)."""
    nib = unpack_int32(packed, 4, packed.shape[1] * 8, dim=1).reshape(packed.shape[0], -1, 8)
    out = torch.empty_like(nib)
    out[..., list(AWQ_ORDER)] = nib
    return out.reshape(packed.shape[0], -1)


def awq_pack(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes int [rows, cols] -> AutoAWQ GEMM int32 [rows, cols/8]; the inverse of awq_unpack."""
    from ..codecs.intpack import pack_int32
    c = codes.reshape(codes.shape[0], -1, 8)[..., list(AWQ_ORDER)]
    return pack_int32(c.reshape(codes.shape[0], -1), 4, dim=1)


def is_quantized_dir(path: str) -> bool:
    """A Hugging Face directory whose config.json (or quantize_config.json) names a quantization."""
    cfg = os.path.join(path, "config.json")
    if not os.path.isdir(path) or not os.path.isfile(cfg):
        return False
    try:
        with open(cfg, encoding="utf-8") as f:
            c = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(c, dict) and ("quantization_config" in c
                                    or os.path.isfile(os.path.join(path, "quantize_config.json")))


class QuantizedHFSource(HFSource):
    """An HFSource over a quantized checkpoint: the quantized linears read as their dequantized
    float32 weights; `grid(name)` (a canonical GGUF name) is the SourceGrid behind one."""

    def __init__(self, path: str | os.PathLike, tokenizer: bool = True):
        self.quant: QuantizedCheckpoint | None = None
        super().__init__(path, tokenizer=tokenizer)

    def _index_weights(self) -> dict[str, tuple[str, tuple[int, ...], str]]:
        cfg = read_quant_config(self.path, self.config)
        if cfg is None:
            _fail("config.json names no quantization", self.path, "a float checkpoint is read as it is")
        self.qconfig = cfg
        self.quant = qc = QuantizedCheckpoint(self.path, cfg)
        self._handles["<quantized>"] = qc
        index: dict[str, tuple[str, tuple[int, ...], str]] = {}
        for name, shape in qc.floats.items():
            dt = qc.t.where[name].entries[name].dtype
            if _TORCH.get(dt) not in _FLOAT_TYPES:
                _fail(f"tensor {shown(name)} of dtype {dt} belongs to no quantized linear", qc.path_of(name),
                      "the config and the tensors come from different checkpoints")
            index[name] = ("<quantized>", shape, _FLOAT_TYPES[_TORCH[dt]])
        for p in qc.linears:
            shape, scale_dtype = qc.info[p]
            index[p + ".weight"] = ("<quantized>", shape, _FLOAT_TYPES.get(scale_dtype, "f32"))
        return index

    def grid(self, gguf_name: str) -> SourceGrid | None:
        """The grid a canonical tensor came from (HF orientation, before any q/k permutation),
        None for a tensor stored as float."""
        hf = self.hf_name(gguf_name)
        if not hf.endswith(".weight") or hf[:-7] not in self.quant.linears:
            return None
        return self.quant.grid(hf[:-7])

    def close(self) -> None:
        if self.quant is not None:
            self.quant.close()
        super().close()


def describe_config(cfg: QuantConfig) -> dict[str, Any]:
    return {"method": cfg.method, "bits": cfg.bits, "group_size": cfg.group_size, "sym": cfg.sym,
            "format": cfg.fmt, "act_order": cfg.act_order}
