"""GGUF -> Hugging Face checkpoint directory: safetensors weights (f32, f16 or bf16), config.json
(models.hf_export_config) and tokenizer files (models.gguf_tokenizer), loadable by transformers
with llama.cpp's outputs, for every architecture of arch.HF_ARCHS that transformers has.

Nothing here spells a tensor name. The names are transformers' own: the model class is built on
the meta device from the exported config and its state dict put through transformers' save-time
conversion (revert_weight_conversion), which gives the names and shapes `save_pretrained`
writes (mixtures of experts as one matrix per expert, experts.{e}.gate_proj / w1, the layout
published checkpoints use and transformers fuses into 3-D parameters on load). Each name goes
through the HF -> GGUF direction's own map (arch.hf_to_gguf_name, gguf-py's TensorNameMap),
which says which GGUF tensor holds it, and the value transforms HFSource applies are undone:
llama's q/k rows permuted back from llama.cpp's interleaved rotary layout, Gemma's stored
1 + w norms shifted back by 1 (exact in float32 for stored values in [0.5, 2], so a round trip
back to GGUF gives the same bits), one expert's matrix cut from the stacked [n_expert, rows,
cols] tensor. Phi-3's fused qkv / gate_up and GLM-4's gate_up are fused in transformers too
and pass as they are. Every GGUF tensor must be used and every transformers tensor found, with
equal shapes. Quantized tensors are dequantized to float32 first, then cast to the chosen dtype.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import torch

from ..util.atomic import atomic_output
from ..util.errors import QuantkitError
from ..util.progress import progress
from .arch import HFArch, hf_to_gguf_name, expert_index
from .gguf import GGUFSource, dequantize_bytes
from .gguf_tokenizer import write_tokenizer
from .gpu_formats import RowChunks, write_safetensors
from .hf_export_config import export_row, hf_config

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# tensors llama.cpp keeps that transformers computes from config.json (rope factors)
CONFIG_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def transformers_tensors(cfg) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor `save_pretrained` writes for a model of `cfg` (built on the
    meta device: no memory, no initialisation)."""
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    sd = revert_weight_conversion(model, model.state_dict())
    return {n: tuple(t.shape) for n, t in sd.items()}


@dataclass(frozen=True)
class Piece:
    """One Hugging Face tensor and where it lies in the GGUF."""
    hf: str
    gguf: str
    shape: tuple[int, ...]
    expert: int | None = None        # the expert's slice of a stacked [n_expert, ...] tensor


def plan_tensors(src: GGUFSource, arch: HFArch, cfg) -> list[Piece]:
    """transformers' tensors of `cfg` matched to the GGUF's, in save order; QuantkitError for a
    tensor on either side the other lacks, or shapes that disagree."""
    infos = {t.name: t for t in src.tensors()}
    hf_class = cfg.architectures[0]
    pieces, used = [], set()
    for hf, shape in transformers_tensors(cfg).items():
        try:
            g = hf_to_gguf_name(arch, hf)
        except KeyError:
            raise QuantkitError(f"{hf_class} tensor {hf} has no llama.cpp counterpart", src.path) from None
        if g is None:
            continue
        if g not in infos:
            if hf == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            raise QuantkitError(f"the GGUF has no {g}, which {hf_class} needs ({hf})", src.path,
                                "the file is incomplete for its architecture")
        e = expert_index(hf)
        want = shape if e is None else (src.spec.n_expert, *shape)
        if tuple(infos[g].shape) != want or (e is not None and e >= src.spec.n_expert):
            raise QuantkitError(f"tensor {g} has shape {list(infos[g].shape)}, but {hf_class}'s {hf} "
                                f"implies {list(want)}", src.path, "the file does not match its own metadata")
        pieces.append(Piece(hf, g, shape, e))
        used.add(g)
    extra = [n for n in infos if n not in used and n not in CONFIG_TENSORS]
    if extra:
        raise QuantkitError(f"tensor {extra[0]} has no Hugging Face counterpart in {hf_class}"
                            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""), src.path)
    return pieces


def to_hf_values(arch: HFArch, src: GGUFSource, piece: Piece, t: torch.Tensor) -> torch.Tensor:
    """A GGUF tensor's values in Hugging Face's convention (the inverse of HFSource.load)."""
    if arch.norm_shift and piece.hf.endswith("norm.weight"):
        t = t - arch.norm_shift
    if arch.permute_qk and (".attn_q." in piece.gguf or ".attn_k." in piece.gguf):
        n = src.spec.n_head if ".attn_q." in piece.gguf else src.spec.n_head_kv
        half = t.shape[0] // n // 2
        t = t.reshape(n, half, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)
    return t.contiguous()


def expert_rows(src: GGUFSource, name: str, e: int, r0: int, r1: int) -> torch.Tensor:
    """Rows r0:r1 of expert e of a stacked [n_expert, rows, cols] tensor, float32: only their
    bytes are read and dequantized."""
    info = src.tensor_info(name)
    n_exp, rows, cols = info.shape
    data, kind = src.raw(name)
    row_bytes = info.nbytes // (n_exp * rows)
    first = e * rows + r0
    out = dequantize_bytes(kind, data[first * row_bytes:(first + r1 - r0) * row_bytes], (r1 - r0, cols)).clone()
    del data
    src.release(name)
    return out


def default_dtype(src: GGUFSource) -> str:
    """The GGUF's own float type when every tensor is stored in it (f16 / bf16), else f32:
    quantized weights are dequantized without a second rounding."""
    kinds = {t.type for t in src.tensors() if len(t.shape) > 1}
    return kinds.pop() if len(kinds) == 1 and kinds <= {"f16", "bf16"} else "f32"


@dataclass
class HFExportReport:
    path: str
    dtype: str
    seconds: float
    n_bytes: int
    types: dict[str, str] = field(default_factory=dict)      # HF tensor -> GGUF type it came from
    tokenizer_files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        paths: dict[str, int] = {}
        for t in self.types.values():
            k = "copy" if t == self.dtype else "cast" if t in DTYPES else "dequantized"
            paths[k] = paths.get(k, 0) + 1
        return {"output": self.path, "dtype": self.dtype, "seconds": self.seconds, "file_bytes": self.n_bytes,
                "paths": paths, "tensors": {h: {"path": "copy" if t == self.dtype else "cast" if t in DTYPES
                                                else "dequantized", "type": t} for h, t in self.types.items()},
                "tokenizer_files": self.tokenizer_files}


def _reader(arch: HFArch, src: GGUFSource, p: Piece, bar):
    """read(r0, r1) -> rows r0:r1 of piece `p` in Hugging Face's convention, float32."""
    permuted = arch.permute_qk and (".attn_q." in p.gguf or ".attn_k." in p.gguf)

    def read(r0: int, r1: int) -> torch.Tensor:
        if p.expert is not None:
            t = expert_rows(src, p.gguf, p.expert, r0, r1)
        elif permuted:                          # rows move within a head: the whole tensor
            t = to_hf_values(arch, src, p, src.load(p.gguf))[r0:r1]
            src.release(p.gguf)
        else:
            t = src.load_rows(p.gguf, r0, r1)
        if bar and r1 == p.shape[0]:
            bar.update(1)
        return t
    return read


def _config_json(cfg, dtype: str) -> dict:
    d = cfg.to_diff_dict()
    d["dtype"] = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[dtype]
    d["architectures"] = list(cfg.architectures)
    d.pop("quantization_config", None)
    return d


def export_hf(gguf_path: str, output: str, dtype: str | None = None, show_progress: bool = True) -> HFExportReport:
    """Write the GGUF at `gguf_path` as a Hugging Face directory `output` (temporary name,
    renamed when complete). dtype: f32 | f16 | bf16 (None: default_dtype)."""
    t0 = time.perf_counter()
    src = GGUFSource(gguf_path)
    try:
        arch = export_row(src)
        dtype = dtype or default_dtype(src)
        cfg = hf_config(src, arch)
        pieces = plan_tensors(src, arch, cfg)
        infos = {t.name: t for t in src.tensors()}
        tdt = DTYPES[dtype]
        bar = progress(total=len(pieces), desc="GGUF -> HF", unit="tensor") if show_progress else None
        tensors: dict[str, torch.Tensor | RowChunks] = {}
        for p in pieces:
            if len(p.shape) == 2:
                whole = arch.permute_qk and (".attn_q." in p.gguf or ".attn_k." in p.gguf)
                tensors[p.hf] = RowChunks(p.hf, p.shape, tdt, _reader(arch, src, p, bar),
                                          chunk=p.shape[0] if whole else 4096)
            else:
                tensors[p.hf] = to_hf_values(arch, src, p, src.load(p.gguf)).to(tdt)
                if bar:
                    bar.update(1)
        with atomic_output(output, directory=True) as tmp:
            try:
                write_safetensors(os.path.join(tmp, "model.safetensors"), tensors, {"format": "pt"})
            finally:
                if bar:
                    bar.close()
            with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
                json.dump(_config_json(cfg, dtype), f, indent=2)
            files = write_tokenizer(src.metadata, tmp, gguf_path)
        types = {p.hf: infos[p.gguf].type for p in pieces}
    finally:
        src.close()
    size = sum(os.path.getsize(os.path.join(output, f)) for f in os.listdir(output))
    return HFExportReport(os.path.abspath(output), dtype, time.perf_counter() - t0, size, types, files)
