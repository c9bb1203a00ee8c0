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
    "q2_k_s": (LlamaFileType.MOSTLY_Q2_K_S, "q2_k"),
    "iq4_xs": (LlamaFileType.MOSTLY_IQ4_XS, "iq4_xs"),
    "iq4_nl": (LlamaFileType.MOSTLY_IQ4_NL, "iq4_nl"),
    "iq3_m": (LlamaFileType.MOSTLY_IQ3_M, "iq3_s"),
    "iq3_s": (LlamaFileType.MOSTLY_IQ3_S, "iq3_s"),
    "iq3_xs": (LlamaFileType.MOSTLY_IQ3_XS, "iq3_s"),
    "iq3_xxs": (LlamaFileType.MOSTLY_IQ3_XXS, "iq3_xxs"),
    "iq2_m": (LlamaFileType.MOSTLY_IQ2_M, "iq2_s"),
    "iq2_s": (LlamaFileType.MOSTLY_IQ2_S, "iq2_xs"),
    "iq2_xs": (LlamaFileType.MOSTLY_IQ2_XS, "iq2_xs"),
    "iq2_xxs": (LlamaFileType.MOSTLY_IQ2_XXS, "iq2_xxs"),
    "iq1_m": (LlamaFileType.MOSTLY_IQ1_M, "iq1_m"),
    "iq1_s": (LlamaFileType.MOSTLY_IQ1_S, "iq1_s"),
    "tq2_0": (LlamaFileType.MOSTLY_TQ2_0, "tq2_0"),
    "tq1_0": (LlamaFileType.MOSTLY_TQ1_0, "tq1_0"),
}

# tensor types llama.cpp will not write without an importance matrix (tensor_requires_imatrix;
# q2_k only in a Q2_K_S file), and the file types whose lowest-bit mix uses the IQ rules
NEEDS_IMATRIX = ("iq3_xxs", "iq2_xxs", "iq2_xs", "iq2_s", "iq1_m", "iq1_s")
_IQ_LOW = ("iq2_xxs", "iq2_xs", "iq1_s", "iq2_s", "iq2_m", "iq1_m")

_NOT_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "altup", "laurel", "per_layer_model_proj",
                  "ssm_conv1d", "shortconv.conv.weight", "attn_rel_b.weight", ".position_embd",
                  "time_mix_", "channel_mix_")
_FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0",
             "tq1_0": "q4_0", "tq2_0": "q4_0", "q2_0": "q4_0",
             **{t: "iq4_nl" for t in ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq4_xs")}}


def requires_imatrix(name: str, tensor_type: str, file_type: str) -> bool:
    """llama.cpp's tensor_requires_imatrix: the token embeddings and the output never do."""
    if name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight"):
        return False
    if tensor_type == "q2_k":
        return file_type == "q2_k_s"
    return tensor_type in NEEDS_IMATRIX


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
                 token_embedding_type: str | None = None, output_tensor_type: str | None = None,
                 has_imatrix: bool = False):
        if file_type not in FILE_TYPES:
            raise KeyError(file_type)
        self.file_type = file_type
        self.default = FILE_TYPES[file_type][1]
        self.facts = facts
        self.pure = pure
        self.token_embedding_type = token_embedding_type
        self.output_tensor_type = output_tensor_type
        self.has_imatrix = has_imatrix
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

    # llama_tensor_get_type_impl, branch for branch (an 80-line transcription: one function like the C one)
    def _impl(self, name: str, shape, new: str, cat: str) -> str:
        ft, f = self.file_type, self.facts
        n_gqa = f.n_head // max(1, f.n_head_kv)

        def more_bits(i, n):
            return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2

        if cat == "output" or (self.tied and cat == "token_embd"):
            if self.output_tensor_type:
                return self.output_tensor_type
            if f.arch == "falcon" or shape[-1] % type_geometry(new).block_size:
                return "q8_0"
            if ft in _IQ_LOW or ft == "iq3_xxs":
                return "q5_k"
            return new if new == "q8_0" else "q6_k"
        if cat == "token_embd":
            if ft in ("iq2_xxs", "iq2_xs", "iq1_s", "iq1_m"):
                return "q2_k"
            if ft in ("iq2_s", "iq2_m", "iq3_xxs"):
                return "iq3_s"
            if ft in ("tq1_0", "tq2_0", "q2_0"):
                return "q4_k"
            return new
        if ft in _IQ_LOW:
            return self._iq_low(name, new, cat, n_gqa)
        # attn_qkv counts as attn_v in llama.cpp (category_is_attn_v), so its own branch there is unreachable.
        if cat in ("attn_v", "attn_qkv", "attn_kv_b"):
            return self._attn_v(new, n_gqa, more_bits)
        if cat == "attn_k":
            if f.n_expert == 8:
                return "q8_0"
            return {"iq3_xs": "iq3_xxs", "iq3_xxs": "iq2_s"}.get(ft, new)
        if cat == "attn_q":
            return {"iq3_xs": "iq3_xxs", "iq3_xxs": "iq2_s"}.get(ft, new)
        if cat == "ffn_down":
            return self._ffn_down(name, new, more_bits)
        if cat == "attn_output":
            if f.arch != "falcon":
                if f.n_expert == 8:
                    if ft in ("q2_k", "iq3_xs", "iq3_xxs", "q3_k_s", "q3_k_m", "iq4_nl", "q4_k_s", "q4_k_m", "iq3_s",
                              "iq3_m", "iq4_xs"):
                        new = "q5_k"
                else:
                    new = {"q2_k": "q3_k", "iq3_xxs": "iq3_s", "q3_k_m": "q4_k", "q3_k_l": "q5_k",
                           "iq3_m": "q4_k"}.get(ft, new)
            elif ft == "q3_k_l":
                new = "q4_k"
            return new
        if cat in ("ffn_gate", "ffn_up"):
            i, n = self._layer(name, cat)
            if ft == "iq3_xs" and n // 8 <= i < 7 * n // 8:
                new = "iq3_xxs"
            self.i_ffn[cat] += 1
        return new

    def _iq_low(self, name: str, new: str, cat: str, n_gqa: int) -> str:
        """The IQ2_XXS, IQ2_XS, IQ2_S, IQ2_M, IQ1_S, IQ1_M mixes."""
        ft, f = self.file_type, self.facts
        if cat in ("attn_v", "attn_qkv", "attn_kv_b"):
            if n_gqa >= 4 or f.n_expert >= 4:
                new = "q4_k"
            else:
                new = "iq3_s" if ft in ("iq2_s", "iq2_m") else "q2_k"
            self.i_attention_wv += 1
        elif f.n_expert == 8 and cat == "attn_k":
            new = "q4_k"
        elif cat == "ffn_down":
            if self.i_ffn["ffn_down"] < f.n_layer // 8:
                new = "iq3_s" if ft in ("iq2_s", "iq2_m") else "q2_k"
            self.i_ffn["ffn_down"] += 1
        elif cat == "attn_output":
            if f.n_expert == 8:
                new = "q5_k"
            elif ft in ("iq1_s", "iq1_m"):
                new = "iq2_xxs"
            elif ft in ("iq2_s", "iq2_m"):
                new = "iq3_s"
        return new

    def _attn_v(self, new: str, n_gqa: int, more_bits) -> str:
        ft, f = self.file_type, self.facts
        i, n = self.i_attention_wv, self.n_attention_wv
        if ft == "q2_k":
            new = "q4_k" if n_gqa >= 4 else "q3_k"
        elif ft == "q2_k_s" and n_gqa >= 4:
            new = "q4_k"
        elif ft == "iq3_xxs":
            new = "q4_k" if n_gqa >= 4 else ("iq3_xxs" if self.has_imatrix else "iq3_s")
        elif ft in ("iq3_xs", "iq3_s") and n_gqa >= 4:
            new = "q4_k"
        elif ft == "iq3_m":
            new = "q4_k"
        elif ft == "q3_k_m":
            new = "q5_k" if i < 2 else "q4_k"
        elif ft == "q3_k_l":
            new = "q5_k"
        elif ft in ("iq4_nl", "iq4_xs") and n_gqa >= 4:
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

    def _ffn_down(self, name: str, new: str, more_bits) -> str:
        ft, f = self.file_type, self.facts
        i, n = self._layer(name, "ffn_down")
        if ft == "q2_k":
            new = "q3_k"
        elif ft == "q2_k_s":
            if i < n // 8:
                new = "q4_k"
        elif ft == "iq3_xxs" and not self.has_imatrix:
            new = "q4_k" if i < n // 8 else "q3_k"
        elif ft == "q3_k_m":
            new = "q5_k" if i < n // 16 else ("q4_k" if f.arch != "falcon" or more_bits(i, n) else "q3_k")
        elif ft == "iq3_m" and (i < n // 8 or (f.n_expert == 8 and more_bits(i, n))):
            new = "q4_k"
        elif ft == "q3_k_l":
            new = "q4_k" if f.arch == "falcon" else "q5_k"
        elif ft == "q4_k_m":
            if f.arch == "falcon":
                new = "q6_k" if i < n // 16 else ("q5_k" if more_bits(i, n) else "q4_k")
            elif more_bits(i, n):
                new = "q6_k"
        elif i < n // 8 and ft in ("iq4_nl", "iq4_xs") and not self.has_imatrix:
            new = "q5_k"
        elif ft == "q5_k_m" and more_bits(i, n):
            new = "q6_k"
        elif ft == "q4_k_s" and f.arch != "falcon" and i < n // 8:
            new = "q5_k"
        elif ft in ("q4_0", "q5_0") and self.has_imatrix and i < n // 8:
            new = "q4_1" if ft == "q4_0" else "q5_1"
        self.i_ffn["ffn_down"] += 1
        return new
