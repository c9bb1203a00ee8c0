"""GGUF -> Hugging Face checkpoint directory: safetensors weights (f32, f16 or bf16), config.json
and tokenizer files (models.gguf_tokenizer), loadable by transformers with llama.cpp's outputs.

The inverse of the HF -> GGUF conversion, one `ExportArch` row per llama.cpp architecture: the
transformers class and config that compute what llama.cpp computes, and the arch.HF_ARCHS row
whose names and value transforms are undone (canonical GGUF names back to HF names through
GGUF_TO_HF_GLOBAL and the architecture's block map; llama's q/k rows permuted back from llama.cpp's
interleaved rotary layout; Gemma's stored 1 + w norms shifted back by 1, exact in float32 for
the stored values in [0.5, 2], so a round trip back to GGUF gives the same bits). Quantized
tensors are dequantized to float32 first, then cast to the chosen dtype. A new architecture is
a new row (and its config function).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..util.atomic import atomic_output
from ..util.errors import QuantkitError
from ..util.progress import progress
from .arch import HF_ARCHS, HFArch
from .gguf import GGUFSource
from .gguf_tokenizer import write_tokenizer
from .gpu_formats import RowChunks, write_safetensors

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def _meta(src: GGUFSource, key: str, default=None):
    v = src.metadata.get(f"{src.spec.arch}.{key}")
    return default if v is None else v.value


def _common(src: GGUFSource) -> dict:
    s = src.spec
    tok = src.metadata
    out = dict(vocab_size=s.n_vocab, hidden_size=s.n_embd, intermediate_size=s.n_ff, num_hidden_layers=s.n_layer,
               num_attention_heads=s.n_head, num_key_value_heads=s.n_head_kv, head_dim=s.head_dim,
               max_position_embeddings=s.n_ctx_train or 4096,
               rms_norm_eps=float(_meta(src, "attention.layer_norm_rms_epsilon", 1e-6)),
               tie_word_embeddings=s.tied_embeddings)
    for k, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                   ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{key}" in tok:
            out[k] = int(tok[f"tokenizer.ggml.{key}"].value)
    return out


def _rope_scaling(src: GGUFSource) -> dict:
    kind = _meta(src, "rope.scaling.type")
    if kind in (None, "none"):
        return {}
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(_meta(src, "rope.scaling.factor"))}
    raise QuantkitError(f"RoPE scaling '{kind}' is not written back to Hugging Face", src.path,
                        "supported: none, linear")


def _llama_config(src: GGUFSource):
    import transformers as tf
    if any(t.name == "rope_freqs.weight" for t in src.tensors()):
        raise QuantkitError("llama-3 RoPE factors (rope_freqs.weight) are not written back to Hugging Face",
                            src.path)
    rp = {"rope_type": "default", "rope_theta": src.spec.rope_theta or 10000.0, **_rope_scaling(src)}
    return tf.LlamaConfig(rope_parameters=rp, attention_bias=False, mlp_bias=False, **_common(src))


def _qwen2_config(src: GGUFSource):
    import transformers as tf
    rp = {"rope_type": "default", "rope_theta": src.spec.rope_theta or 10000.0, **_rope_scaling(src)}
    return tf.Qwen2Config(rope_parameters=rp, use_sliding_window=False, **_common(src))


def _gemma3_config(src: GGUFSource):
    import transformers as tf
    s = src.spec
    pattern = s.sliding_window_pattern or [False] * s.n_layer
    scale = s.n_embd // s.n_head if s.n_layer == 62 else s.head_dim     # llama.cpp's attention scale
    cfg = tf.Gemma3TextConfig(
        query_pre_attn_scalar=scale, sliding_window=s.sliding_window or s.n_ctx_train,
        layer_types=["sliding_attention" if p else "full_attention" for p in pattern],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": s.rope_theta or 1e6},
                         "sliding_attention": {"rope_type": "default",
                                               "rope_theta": float(_meta(src, "rope.freq_base_swa", 10000.0))}},
        final_logit_softcapping=_meta(src, "final_logit_softcapping"), attn_logit_softcapping=None,
        **_common(src))
    return cfg


# GGUF names -> the transformers names of the exported checkpoints (the inverse of what
# arch.hf_to_gguf_name maps through gguf-py's TensorNameMap for these classes).
GGUF_TO_HF_GLOBAL: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LLAMA_BLOCK: dict[str, str] = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GEMMA3_BLOCK: dict[str, str] = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight", "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}


@dataclass(frozen=True)
class ExportArch:
    """How one llama.cpp architecture becomes a transformers model."""
    hf_key: str                                   # the arch.HF_ARCHS row whose transforms are undone
    hf_class: str                                 # config.json "architectures"
    config: Callable[[GGUFSource], object]        # the transformers config
    block: dict[str, str]                         # GGUF block suffix -> HF suffix after model.layers.{i}.


EXPORT_ARCHS: dict[str, ExportArch] = {
    "llama": ExportArch("llama", "LlamaForCausalLM", _llama_config, _LLAMA_BLOCK),
    "qwen2": ExportArch("qwen2", "Qwen2ForCausalLM", _qwen2_config, _LLAMA_BLOCK),
    "gemma3": ExportArch("gemma3", "Gemma3ForCausalLM", _gemma3_config, _GEMMA3_BLOCK),
}


def gguf_to_hf_names(arch: HFArch, names: list[str]) -> dict[str, str]:
    """Canonical GGUF name -> HF name (tensors with no HF counterpart are refused by the caller)."""
    inverse = GGUF_TO_HF_GLOBAL
    block = next(e.block for e in EXPORT_ARCHS.values() if e.hf_key == arch.key)
    out = {}
    for n in names:
        if n in inverse:
            out[n] = inverse[n]
        elif n.startswith("blk."):
            _, i, suffix = n.split(".", 2)
            if suffix in block:
                out[n] = f"model.layers.{i}.{block[suffix]}"
    return out


def to_hf_values(arch: HFArch, src: GGUFSource, name: str, t: torch.Tensor) -> torch.Tensor:
    """A canonical tensor's values in Hugging Face's convention (the inverse of HFSource.load)."""
    if arch.norm_shift and name.endswith("norm.weight"):
        t = t - arch.norm_shift
    if arch.permute_qk and (".attn_q." in name or ".attn_k." in name):
        n = src.spec.n_head if ".attn_q." in name else src.spec.n_head_kv
        half = t.shape[0] // n // 2
        t = t.reshape(n, half, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)
    return t.contiguous()


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


def export_hf(gguf_path: str, output: str, dtype: str | None = None, show_progress: bool = True) -> HFExportReport:
    """Write the GGUF at `gguf_path` as a Hugging Face directory `output` (temporary name,
    renamed when complete). dtype: f32 | f16 | bf16 (None: default_dtype)."""
    t0 = time.perf_counter()
    src = GGUFSource(gguf_path)
    try:
        ea = EXPORT_ARCHS.get(src.spec.arch)
        if ea is None:
            raise QuantkitError(f"architecture '{src.spec.arch}' is not written back to Hugging Face", gguf_path,
                                "supported: " + ", ".join(EXPORT_ARCHS))
        arch = HF_ARCHS[ea.hf_key]
        dtype = dtype or default_dtype(src)
        infos = {t.name: t for t in src.tensors()}
        names = gguf_to_hf_names(arch, list(infos))
        missing = [n for n in infos if n not in names]
        if missing:
            raise QuantkitError(f"tensor {missing[0]} has no Hugging Face counterpart for {src.spec.arch}"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""), gguf_path)
        cfg = ea.config(src)
        cfg.architectures = [ea.hf_class]
        tensors: dict[str, torch.Tensor | RowChunks] = {}
        tdt = DTYPES[dtype]
        bar = progress(total=len(names), desc="GGUF -> HF", unit="tensor") if show_progress else None

        def reader(name: str):
            def read(r0: int, r1: int) -> torch.Tensor:
                t = to_hf_values(arch, src, name, src.load(name))
                src.release(name)
                if bar:
                    bar.update(1)
                return t[r0:r1]
            return read

        for g, h in names.items():
            shape = infos[g].shape
            if len(shape) == 2:
                tensors[h] = RowChunks(h, shape, tdt, reader(g), chunk=shape[0])
            else:
                tensors[h] = to_hf_values(arch, src, g, src.load(g)).to(tdt)
                if bar:
                    bar.update(1)
        with atomic_output(output, directory=True) as tmp:
            try:
                write_safetensors(os.path.join(tmp, "model.safetensors"), tensors, {"format": "pt"})
            finally:
                if bar:
                    bar.close()
            d = cfg.to_dict()
            d["dtype"] = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[dtype]
            d["architectures"] = [ea.hf_class]
            d.pop("quantization_config", None)
            with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
                json.dump(d, f, indent=2)
            files = write_tokenizer(src.metadata, tmp, gguf_path)
        types = {h: infos[g].type for g, h in names.items()}
    finally:
        src.close()
    size = sum(os.path.getsize(os.path.join(output, f)) for f in os.listdir(output))
    return HFExportReport(os.path.abspath(output), dtype, time.perf_counter() - t0, size, types, files)
