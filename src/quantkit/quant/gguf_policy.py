"""Which type each tensor gets in a GGUF of a given file type: llama-quantize's rules.

Transcribed from llama.cpp's llama-quant.cpp (`tensor_allows_quantization`,
`llama_tensor_get_type_impl`, `tensor_type_fallback`) for the file types quantkit writes, so a
file quantkit writes has the same tensor types as `llama-quantize` would give it. Tensor order
is llama-quantize's too (`tensor_order`): non-block tensors first, then by layer, by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import LlamaFileType

from ..codecs.geometry import type_geometry

# file type name -> (llama_ftype, default tensor type)
FILE_TYPES: dict[str, tuple[LlamaFileType, str]] = {
    "f32": (LlamaFileType.ALL_F32, "f32"),
    "f16": (LlamaFileType.MOSTLY_F16, "f16"),
    "bf16": (LlamaFileType.MOSTLY_BF16, "bf16"),
    "q8_0": (LlamaFileType.MOSTLY_Q8_0, "q8_0"),
    "q5_1": (LlamaFileType.MOSTLY_Q5_1, "q5_1"),
    "q5_0": (LlamaFileType.MOSTLY_Q5_0, "q5_0"),
    "q4_1": (LlamaFileType.MOSTLY_Q4_1, "q4_1"),
    "q4_0": (LlamaFileType.MOSTLY_Q4_0, "q4_0"),
    "q6_k": (LlamaFileType.MOSTLY_Q6_K, "q6_k"),
    "q5_k_m": (LlamaFileType.MOSTLY_Q5_K_M, "q5_k"),
    "q5_k_s": (LlamaFileType.MOSTLY_Q5_K_S, "q5_k"),
    "q4_k_m": (LlamaFileType.MOSTLY_Q4_K_M, "q4_k"),
    "q4_k_s": (LlamaFileType.MOSTLY_Q4_K_S, "q4_k"),
    "q3_k_l": (LlamaFileType.MOSTLY_Q3_K_L, "q3_k"),
    "q3_k_m": (LlamaFileType.MOSTLY_Q3_K_M, "q3_k"),
    "q3_k_s": (LlamaFileType.MOSTLY_Q3_K_S, "q3_k"),
    "q2_k": (LlamaFileType.MOSTLY_Q2_K, "q2_k"),
}

_NOT_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "altup", "laurel", "per_layer_model_proj",
                  "ssm_conv1d", "shortconv.conv.weight", "attn_rel_b.weight", ".position_embd",
                  "time_mix_", "channel_mix_")
_FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def tensor_order(names: list[str]) -> list[str]:
    def key(n: str):
        m = re.match(r"blk\.(\d+)\.", n)
        return (int(m.group(1)) if m else -1, n)
    return sorted(names, key=key)


def allows_quantization(name: str, ndim: int) -> bool:
    if ndim < 2 or not name.endswith("weight"):
        return False
    if name in ("position_embd.weight", "token_types.weight"):
        return False
    return not any(s in name for s in _NOT_QUANTIZED)


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"),
                     ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
                     ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
                     ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


@dataclass
class ModelFacts:
    """What the rules look at besides the tensor itself."""
    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0
    is_70b: bool = False


class TypePolicy:
    """Stateful like llama.cpp's quantize_state_impl: call `choose` in tensor order."""

    def __init__(self, file_type: str, names: list[str], facts: ModelFacts, pure: bool = False,
                 token_embedding_type: str | None = None, output_tensor_type: str | None = None):
        if file_type not in FILE_TYPES:
            raise KeyError(file_type)
        self.file_type = file_type
        self.default = FILE_TYPES[file_type][1]
        self.facts = facts
        self.pure = pure
        self.token_embedding_type = token_embedding_type
        self.output_tensor_type = output_tensor_type
        cats = [_category(n) for n in names]
        self.tied = "output" not in cats
        self.n_attention_wv = sum(c in ("attn_v", "attn_qkv", "attn_kv_b") for c in cats)
        self.i_attention_wv = 0
        self.i_ffn = {"ffn_down": 0, "ffn_gate": 0, "ffn_up": 0}

    def choose(self, name: str, shape: tuple[int, ...], src_type: str) -> str:
        """Target type for a tensor (row-major shape; shape[-1] is ggml's ne[0])."""
        if not allows_quantization(name, len(shape)):
            return src_type
        cat = _category(name)
        if self.token_embedding_type and cat == "token_embd":
            return self.token_embedding_type
        if self.output_tensor_type and cat == "output":
            return self.output_tensor_type
        new = self.default
        if type_geometry(new).block_size == 1:       # f32 / f16 / bf16 file types: no mixing
            return new
        if not self.pure:
            new = self._impl(name, shape, new, cat)
        return self._fallback(shape, new)

    @staticmethod
    def _fallback(shape, new: str) -> str:
        ncols = shape[-1]
        if ncols % type_geometry(new).block_size == 0:
            return new
        ret = _FALLBACK.get(new, new)
        if ncols % type_geometry(ret).block_size:
            ret = "f16"
        return ret

    def _layer(self, name: str, cat: str) -> tuple[int, int]:
        i = self.i_ffn[cat]
        if self.facts.n_expert > 1:
            m = re.match(r"blk\.(\d+)\.", name)
            i = int(m.group(1)) if m else i
        return i, self.facts.n_layer

    def _impl(self, name: str, shape, new: str, cat: str) -> str:
        ft, f = self.file_type, self.facts
        n_gqa = f.n_head // max(1, f.n_head_kv)

        def more_bits(i, n):
            return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2

        if cat == "output" or (self.tied and cat == "token_embd"):
            nx = shape[-1]
            if f.arch == "falcon" or nx % type_geometry(new).block_size:
                return "q8_0"
            return new if new == "q8_0" else "q6_k"
        if cat == "token_embd":
            return new
        # attn_qkv counts as attn_v in llama.cpp (category_is_attn_v), so its own branch there is unreachable.
        if cat in ("attn_v", "attn_qkv", "attn_kv_b"):
            i, n = self.i_attention_wv, self.n_attention_wv
            if ft == "q2_k":
                new = "q4_k" if n_gqa >= 4 else "q3_k"
            elif ft == "q3_k_m":
                new = "q5_k" if i < 2 else "q4_k"
            elif ft == "q3_k_l":
                new = "q5_k"
            elif ft in ("q4_k_m", "q5_k_m") and more_bits(i, n):
                new = "q6_k"
            elif ft == "q4_k_s" and i < 4:
                new = "q5_k"
            if f.is_70b and new in ("q3_k", "q4_k"):
                new = "q5_k"
            if f.n_expert == 8:
                new = "q8_0"
            self.i_attention_wv += 1
            return new
        if cat == "attn_k":
            return "q8_0" if f.n_expert == 8 else new
        if cat == "ffn_down":
            i, n = self._layer(name, cat)
            if ft == "q2_k":
                new = "q3_k"
            elif ft == "q3_k_m":
                new = "q5_k" if i < n // 16 else ("q4_k" if f.arch != "falcon" or more_bits(i, n) else "q3_k")
            elif ft == "q3_k_l":
                new = "q4_k" if f.arch == "falcon" else "q5_k"
            elif ft == "q4_k_m":
                if f.arch == "falcon":
                    new = "q6_k" if i < n // 16 else ("q5_k" if more_bits(i, n) else "q4_k")
                elif more_bits(i, n):
                    new = "q6_k"
            elif ft == "q5_k_m" and more_bits(i, n):
                new = "q6_k"
            elif ft == "q4_k_s" and f.arch != "falcon" and i < n // 8:
                new = "q5_k"
            self.i_ffn[cat] += 1
            return new
        if cat == "attn_output":
            if f.arch != "falcon":
                if f.n_expert == 8:
                    if ft in ("q2_k", "q3_k_s", "q3_k_m", "q4_k_s", "q4_k_m"):
                        new = "q5_k"
                else:
                    new = {"q2_k": "q3_k", "q3_k_m": "q4_k", "q3_k_l": "q5_k"}.get(ft, new)
            elif ft == "q3_k_l":
                new = "q4_k"
            return new
        if cat in ("ffn_gate", "ffn_up"):
            self.i_ffn[cat] += 1
        return new
