"""GPU checkpoint formats for integer-quantized linear layers, written shard by shard.

GPTQ ("gptq", the layout AutoGPTQ, GPTQModel, transformers+optimum and vLLM read), per linear
`P` of weight W [out, in], codes q, scales s, zeros z ((q - z) * s, groups along `in`):

    P.qweight  int32 [in*bits/32, out]     codes packed along `in` (codecs.intpack)
    P.qzeros   int32 [groups, out*bits/32] z - 1, packed along `out`: checkpoint_format "gptq"
                                           (v1) stores zero - 1 and runtimes add the 1 back
    P.scales   fp16  [groups, out]
    P.g_idx    int32 [in]                  group of each input column: i // group_size, since
                                           quantkit's act-order uses static groups
    config.json quantization_config and quantize_config.json: bits, group_size, desc_act, sym,
    static_groups, checkpoint_format, quant_method "gptq"; other tensors fp16.

compressed-tensors "pack-quantized" (what llm-compressor writes, transformers and vLLM read):

    P.weight_packed      int32 [out, ceil(in*bits/32)]  signed codes q - 2**(bits-1), stored
                                                        offset by 2**(bits-1), i.e. q itself
    P.weight_scale       [out, groups] in the model dtype
    P.weight_zero_point  int32 [ceil(out*bits/32), groups] (asymmetric only): z, packed along
                                                        out as compressed-tensors' compressor
                                                        packs it (pack_to_int32, packed_dim=0),
                                                        what llm-compressor writes and vLLM reads
    P.weight_shape       int64 [2]  (out, in)
    quantization_config: quant_method "compressed-tensors", format "pack-quantized",
    config_groups.group_0 = {targets ["Linear"], weights {num_bits, type int, symmetric,
    strategy group|channel, group_size, actorder "weight" when act-order was used}}, ignore
    ["lm_head"]; asymmetric grids add `"dequantize": true` (ASYM_LOAD).

ASYM_LOAD: transformers 5 (with compressed-tensors 0.20) builds the empty compressed model
through the compressor's meta-device path, which registers weight_zero_point unpacked
([out, groups] int8) where the file holds the packed tensor above: the default load stops on
a size mismatch (with ignore_mismatched_sizes, the first forward pass fails on the
re-initialised int8 zero points). Files written by
llm-compressor have the same layout and fail the same way. `dequantize: true` is
transformers' own load option (CompressedTensorsConfig.dequantize) that instead decompresses
each linear at load with compressed-tensors' decompressor, which unpacks the zero point:
the loaded (dense) model is the one the default path gives after its first forward pass.
compressed-tensors' QuantizationConfig and vLLM ignore the key.

A mixture of experts (Qwen3-MoE, Mixtral) is stored as transformers' save_pretrained stores
it and as llm-compressor and GPTQModel write it: one linear per expert under the checkpoint's
own names (`mlp.experts.{e}.gate_proj`, Mixtral's `block_sparse_moe.experts.{e}.w1`), each in
the layout above; the router (`mlp.gate`, `block_sparse_moe.gate`) unquantized, and for
compressed-tensors named in `ignore` ("re:.*mlp.gate$"). transformers 5 loads such a checkpoint
through its MoE conversion: each expert's packed tensors are dequantized
(CompressedTensorsDequantize) before the experts are merged into its fused 3-D parameters.

v1 GPTQ cannot store a zero point of 0 (it would be -1 after the shift), so asymmetric GPTQ
grids use `QuantSpec(zero_min=1)` (quant.checkpoint.grid_spec); with z <= 2**bits - 1 every
stored z - 1 lies in [0, 2**bits - 2], so GPTQModel's v1 -> v2 load (adding 1 to each packed
field of qzeros, no carry) and AutoGPTQ's `zeros + 1` recover z exactly. The quantized weights passed in
are duck-typed (q, scales, zeros, spec.group_width): this floor does not import quant/.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

import torch

from ..recipe import DEFAULT_BITS, DEFAULT_DAMP, DEFAULT_GROUP_SIZE
from ..codecs.intpack import pack_int32, unpack_int32
from ..util.errors import QuantkitError
from ..util.finite import check_finite

GPU_FORMATS = ("gptq", "compressed-tensors")
FORMAT_BITS = {"gptq": (2, 3, 4, 8), "compressed-tensors": (2, 3, 4, 5, 6, 8)}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja", "added_tokens.json")
SHARD_BYTES = 4 * 1024**3     # tensors go to disk as they come: a shard's size bounds no memory
HEADER_RESERVE = 1 << 20      # bytes kept for a shard's JSON header, written last (space-padded)


@dataclass(frozen=True)
class GPUFormatConfig:
    """Everything a writer records about how the weights were quantized."""
    format: str                  # "gptq" | "compressed-tensors"
    bits: int = DEFAULT_BITS
    group_size: int = DEFAULT_GROUP_SIZE   # -1: per output channel
    sym: bool = True
    act_order: bool = False
    method: str = "gptq"         # "gptq" | "rtn", recorded in the metadata
    damp: float = DEFAULT_DAMP
    scale_search: bool = True    # GPTQ: each group's scale from an importance-weighted search
    true_sequential: bool = True  # GPTQ: a block's linears calibrated stage by stage on quantized outputs

    def __post_init__(self):
        if self.format not in GPU_FORMATS:
            raise QuantkitError(f"unknown GPU format '{self.format}'", hint="use gptq or compressed-tensors")
        if self.bits not in FORMAT_BITS[self.format]:
            raise QuantkitError(f"{self.format} does not support {self.bits}-bit weights",
                                hint="bits " + ", ".join(map(str, FORMAT_BITS[self.format])))
        if self.group_size not in (32, 64, 128, 1024, -1):
            raise QuantkitError(f"group size {self.group_size} is not supported",
                                hint="use 32, 64, 128, 1024 or -1 (per channel)")


def _gptq_quant_config(cfg: GPUFormatConfig, damp_raised: dict[str, float] | None = None) -> dict:
    meta = {"quantizer": ["quantkit"], "method": cfg.method, "scale_search": _searched(cfg)}
    if damp_raised:
        meta["damp_raised"] = dict(damp_raised)      # linears whose Hessian needed more than damp_percent
    return {"bits": cfg.bits, "group_size": cfg.group_size, "desc_act": cfg.act_order, "sym": cfg.sym,
            "static_groups": True, "true_sequential": cfg.method == "gptq" and cfg.true_sequential,
            "damp_percent": cfg.damp, "quant_method": "gptq", "checkpoint_format": "gptq", "meta": meta}


def _searched(cfg: GPUFormatConfig) -> bool:
    return cfg.method == "gptq" and cfg.scale_search


def _ct_quant_config(cfg: GPUFormatConfig, ignore: tuple[str, ...] = ()) -> dict:
    import compressed_tensors
    weights = {"num_bits": cfg.bits, "type": "int", "symmetric": cfg.sym,
               "strategy": "channel" if cfg.group_size == -1 else "group",
               "group_size": None if cfg.group_size == -1 else cfg.group_size,
               "dynamic": False, "observer": "mse" if _searched(cfg) else "minmax"}
    if cfg.act_order:
        weights["actorder"] = "weight"      # static groups: no g_idx, normal kernels
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                        "output_activations": None, "format": "pack-quantized"}},
          "ignore": ["lm_head", *ignore], "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {},
          "global_compression_ratio": None, "version": compressed_tensors.__version__}
    if not cfg.sym:
        qc["dequantize"] = True         # see ASYM_LOAD in the module docstring
    return qc


def linear_tensors(cfg: GPUFormatConfig, prefix: str, qw) -> dict[str, torch.Tensor]:
    """The tensors of one quantized linear (`qw`: quant.rtn.QuantizedWeight) in format `cfg`."""
    bits = cfg.bits
    out_f, in_f = qw.q.shape
    if cfg.format == "gptq":
        if in_f * bits % 32 or out_f * bits % 32:
            raise QuantkitError(f"{prefix}: GPTQ needs in and out features whose bits fill whole int32 words "
                                f"(in {in_f}, out {out_f}, {bits} bits)", hint="use compressed-tensors")
        if int(qw.zeros.min()) < 1:
            raise ValueError(f"{prefix}: GPTQ v1 cannot store a zero point of 0")
        gw = qw.spec.group_width(in_f)
        return {f"{prefix}.qweight": pack_int32(qw.q.t(), bits, dim=0),
                f"{prefix}.qzeros": pack_int32((qw.zeros - 1).t(), bits, dim=1),
                f"{prefix}.scales": qw.scales.t().to(torch.float16).contiguous(),
                f"{prefix}.g_idx": (torch.arange(in_f, dtype=torch.int32) // gw)}
    t = {f"{prefix}.weight_packed": pack_int32(qw.q, bits, dim=1),
         f"{prefix}.weight_scale": qw.scales.contiguous(),
         f"{prefix}.weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64)}
    if not cfg.sym:
        t[f"{prefix}.weight_zero_point"] = pack_int32(qw.zeros, bits, dim=0)
    return t


def dequantize_gptq(tensors: dict[str, torch.Tensor], prefix: str, bits: int) -> torch.Tensor:
    """W [out, in] float32 from a v1 GPTQ linear, as the runtimes compute it:
    (q - (qzeros + 1)) * scales[g_idx]."""
    qweight = tensors[f"{prefix}.qweight"]
    scales = tensors[f"{prefix}.scales"].float()
    g_idx = tensors[f"{prefix}.g_idx"].long()
    in_f, out_f = g_idx.numel(), qweight.shape[1]
    q = unpack_int32(qweight, bits, in_f, dim=0)                                  # [in, out]
    z = (unpack_int32(tensors[f"{prefix}.qzeros"], bits, out_f, dim=1) + 1)       # [groups, out]
    return ((q - z[g_idx]).float() * scales[g_idx]).t().contiguous()


def dequantize_compressed(tensors: dict[str, torch.Tensor], prefix: str, bits: int, group_size: int) -> torch.Tensor:
    """W [out, in] float32 from a pack-quantized linear: (q - z) * s."""
    out_f, in_f = (int(v) for v in tensors[f"{prefix}.weight_shape"])
    q = unpack_int32(tensors[f"{prefix}.weight_packed"], bits, in_f, dim=1)
    s = tensors[f"{prefix}.weight_scale"].float()
    zp = tensors.get(f"{prefix}.weight_zero_point")
    z = unpack_int32(zp, bits, out_f, dim=0) if zp is not None else torch.full_like(s, 2 ** (bits - 1), dtype=torch.int32)
    gw = in_f if group_size == -1 else group_size
    w = (q.reshape(out_f, -1, gw) - z[..., None]).float() * s[..., None]
    return w.reshape(out_f, in_f)


_ST_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.int32: "I32", torch.int64: "I64", torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16"}


class RowChunks:
    """A 2-D tensor written without ever being whole in memory: read(r0, r1) gives rows r0:r1
    (any float dtype; converted to `dtype`), `chunk` rows at a time."""

    def __init__(self, name: str, shape: tuple[int, int], dtype: torch.dtype, read, chunk: int = 8192):
        self.name, self.shape, self.dtype, self.read, self.chunk = name, tuple(shape), dtype, read, chunk

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def element_size(self) -> int:
        return torch.empty(0, dtype=self.dtype).element_size()

    def pieces(self):
        for r0 in range(0, self.shape[0], self.chunk):
            r1 = min(r0 + self.chunk, self.shape[0])
            t = self.read(r0, r1)
            if tuple(t.shape) != (r1 - r0, self.shape[1]):
                raise QuantkitError(f"tensor {self.name}: rows {r0}:{r1} came back with shape {tuple(t.shape)}")
            check_finite(t, self.name)
            yield t.to(self.dtype)


def write_safetensors(path: str, tensors: dict[str, torch.Tensor | RowChunks],
                      metadata: dict[str, str] | None = None) -> None:
    """A .safetensors file written tensor by tensor from each tensor's own memory (the
    `safetensors` package first copies the whole shard into one buffer), a RowChunks entry
    chunk by chunk. Same bytes layout: 8-byte little-endian header length, JSON header padded
    with spaces to 8 bytes, data."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    off = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors.values():
            _write_data(f, t)


def _write_data(f, t: torch.Tensor | RowChunks) -> None:
    """A tensor's raw bytes (little-endian on every platform torch runs on), chunk by chunk for
    a RowChunks."""
    for piece in (t.pieces() if isinstance(t, RowChunks) else (t,)):
        piece = piece.detach().contiguous()
        if piece.numel():
            f.write(memoryview(piece.reshape(-1).view(torch.uint8).numpy()))


def _prepend_header(path: str, raw: bytes, data_start: int) -> None:
    """Rewrite a shard whose data begins at data_start with header `raw` (padded to 8) in front."""
    raw += b" " * (-len(raw) % 8)
    tmp = path + ".tmp"
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        dst.write(len(raw).to_bytes(8, "little"))
        dst.write(raw)
        src.seek(data_start)
        shutil.copyfileobj(src, dst, 16 << 20)
    os.replace(tmp, path)


class CheckpointWriter:
    """Writes a Hugging Face checkpoint directory shard by shard (`flush()` ends a shard, e.g.
    after each decoder block), then config.json with quantization_config, the safetensors index
    and the tokenizer files. Write into a temporary directory (util.atomic) and rename."""

    def __init__(self, directory: str, cfg: GPUFormatConfig, hf_config: dict, dtype: torch.dtype):
        self.dir = directory
        self.cfg = cfg
        self.hf_config = dict(hf_config)
        self.dtype = torch.float16 if cfg.format == "gptq" else dtype
        self._file = None                       # the shard being written
        self._header: dict = {}                 # its tensors: name -> dtype, shape, data_offsets
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self._names: set[str] = set()
        self._total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """An unquantized tensor (embeddings, norms, head, biases): stored in the model dtype."""
        t = tensor.detach()
        if t.is_floating_point():
            t = t.to(self.dtype)
        self._put(name, t)

    def add_rows(self, name: str, shape: tuple[int, int], read) -> None:
        """An unquantized 2-D tensor (embeddings, head) read(r0, r1) a chunk of rows at a time
        and written as it comes, in the model dtype: never whole in memory."""
        self._put(name, RowChunks(name, shape, self.dtype, read))

    def add_linear(self, prefix: str, qw, bias: torch.Tensor | None = None) -> None:
        for name, t in linear_tensors(self.cfg, prefix, qw).items():
            self._put(name, t)
        if bias is not None:
            self.add(f"{prefix}.bias", bias)

    def _put(self, name: str, t) -> None:
        """Written to the open shard at once: its data after a reserved header space, the header
        itself when the shard is closed. Nothing is held in memory."""
        if name in self._names:
            raise ValueError(f"tensor {name} written twice")
        if self._file is None:
            path = os.path.join(self.dir, f"shard-{len(self._shards):05d}.safetensors")
            self._file = open(path, "wb")
            self._file.seek(8 + HEADER_RESERVE)
        n = t.numel() * t.element_size()
        self._header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self._pending_bytes, self._pending_bytes + n]}
        self._names.add(name)
        _write_data(self._file, t)
        self._pending_bytes += n
        if self._pending_bytes >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        """Close the shard being written: its header goes into the reserved space, padded with
        spaces (as the safetensors format allows); a header too large for it moves the data."""
        if self._file is None:
            return
        f, self._file = self._file, None
        header = {"__metadata__": {"format": "pt"}, **self._header}
        raw = json.dumps(header, separators=(",", ":")).encode()
        try:
            if len(raw) <= HEADER_RESERVE:
                f.seek(0)
                f.write(HEADER_RESERVE.to_bytes(8, "little"))
                f.write(raw + b" " * (HEADER_RESERVE - len(raw)))
                f.close()
            else:                                   # rare: rewrite with the header in front
                f.close()
                _prepend_header(f.name, raw, 8 + HEADER_RESERVE)
        except BaseException:
            f.close()
            raise
        self._shards.append(list(self._header))
        self._total += self._pending_bytes
        self._header, self._pending_bytes = {}, 0

    def finish(self, source_dir: str | None = None, damp_raised: dict[str, float] | None = None,
               ignore: tuple[str, ...] = ()) -> None:
        """Name the shards, write config.json (and quantize_config.json) and the tokenizer files.
        `damp_raised`: GPTQ's dampening per linear where it had to exceed cfg.damp (recorded in
        the GPTQ format's meta); `ignore`: compressed-tensors patterns of modules left
        unquantized besides lm_head (a mixture of experts' routers)."""
        self.flush()
        n = len(self._shards)
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.dir, f"shard-{i:05d}.safetensors"), os.path.join(self.dir, final))
            weight_map.update({k: final for k in names})
        if n > 1:
            with open(os.path.join(self.dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": self._total}, "weight_map": dict(sorted(weight_map.items()))},
                          f, indent=2)
        qc = _gptq_quant_config(self.cfg, damp_raised) if self.cfg.format == "gptq" else _ct_quant_config(self.cfg, ignore)
        config = dict(self.hf_config)
        config["quantization_config"] = qc
        dtype_name = str(self.dtype).removeprefix("torch.")
        config["torch_dtype"] = dtype_name
        if "dtype" in config:
            config["dtype"] = dtype_name
        with open(os.path.join(self.dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        if self.cfg.format == "gptq":
            with open(os.path.join(self.dir, "quantize_config.json"), "w", encoding="utf-8") as f:
                json.dump(qc, f, indent=2)
        if source_dir:
            for name in TOKENIZER_FILES:
                src = os.path.join(source_dir, name)
                if os.path.isfile(src):
                    shutil.copyfile(src, os.path.join(self.dir, name))


EXPERT_PARTS = ("gate_proj", "up_proj", "down_proj")


def expert_checkpoint_names(model, lp: str, names: list[str], n_expert: int) -> tuple[dict[str, str], dict]:
    """Checkpoint names of a sparse decoder block `lp` of `model` (a transformers model with
    fused experts `mlp.experts.gate_up_proj` / `down_proj`), as its save_pretrained writes them:
    transformers' own conversion mapping for the model, reverted. Returns ({name in the block's
    state dict, relative: checkpoint name, full} for `names`, {(part, expert): checkpoint
    prefix of that expert's linear} with part one of EXPERT_PARTS). The mapping runs on tiny
    tensors whose values say which input each output came from (the merge of the experts and
    the gate/up concatenation only split along the expert and row axes)."""
    from transformers.core_model_loading import revert_weight_conversion
    gate_up = torch.arange(2 * n_expert, dtype=torch.float64).reshape(n_expert, 2, 1)   # e*2 + (0 gate, 1 up)
    down = (2 * n_expert + torch.arange(n_expert, dtype=torch.float64)).reshape(n_expert, 1, 1)
    probe = {f"{lp}.{n}": torch.tensor([-1.0 - k], dtype=torch.float64) for k, n in enumerate(names)}
    probe.update({f"{lp}.mlp.experts.gate_up_proj": gate_up, f"{lp}.mlp.experts.down_proj": down})
    renamed: dict[str, str] = {}
    experts: dict[tuple[str, int], str] = {}
    for out, t in revert_weight_conversion(model, probe).items():
        if t.numel() != 1:
            break
        v = int(t.reshape(-1)[0])
        if v < 0:
            renamed[names[-1 - v]] = out
        elif out.endswith(".weight"):
            part = "down_proj" if v >= 2 * n_expert else EXPERT_PARTS[v % 2]
            experts[(part, v - 2 * n_expert if part == "down_proj" else v // 2)] = out.removesuffix(".weight")
    if len(renamed) != len(names) or len(experts) != 3 * n_expert:
        raise QuantkitError(f"{lp}: cannot name the experts of a {type(model).__name__} the way transformers saves "
                            "them", hint="this mixture of experts is not one transformers converts per expert")
    return renamed, experts
