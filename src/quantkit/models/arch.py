"""Architecture facts: which llama.cpp architecture a Hugging Face model becomes, and what
convert_hf_to_gguf.py does on the way that no library states.

Tensor names come from gguf-py: `gguf.get_tensor_name_map(MODEL_ARCH, n)` knows every Hugging
Face spelling of every tensor of every llama.cpp architecture, restricted to the tensors that
architecture has (`MODEL_TENSORS[arch]`), so Gemma's `post_attention_layernorm` becomes
`post_attention_norm` while Llama's becomes `ffn_norm`. Metadata keys are gguf-py's `Keys`
templates. What remains per architecture is one `HFArch` row: its config.json classes, the value
transforms (llama-style q/k row permutation for llama.cpp's interleaved rotary, Gemma's `1 + w`
norms), and the extra metadata rows (Granite's multipliers, Gemma-2's soft-capping). Readers
and writers look these up; nothing here touches a file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, Keys, get_tensor_name_map

# HF tensors that carry no weights llama.cpp needs.
HF_IGNORED_SUFFIXES: tuple[str, ...] = (
    "rotary_emb.inv_freq",
    ".attention.masked_bias",
    ".attention.bias",
)
# Prefixes of a multimodal wrapper's vision side (the language model is converted alone).
HF_VISION_PREFIXES: tuple[str, ...] = (
    "vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.",
    "model.visual.", "visual.", "vision_model.", "model.vision_model.",
)


@dataclass(frozen=True)
class MetaRow:
    """One GGUF key convert_hf_to_gguf.py writes from config.json for an architecture."""

    key: str                          # gguf-py Keys template ("{arch}.attention.scale")
    config: tuple[str, ...]           # config.json keys, the first present (and not null) wins
    kind: str = "f32"                 # f32 | u32
    default: float | int | None = None  # written when the config has none (None: key omitted)


@dataclass(frozen=True)
class HFArch:
    """How one Hugging Face architecture becomes a llama.cpp architecture."""

    key: str                          # our name: "llama", "qwen3", "gemma2", ...
    model_arch: MODEL_ARCH            # gguf-py's architecture (names, tensors, keys)
    hf_classes: tuple[str, ...]       # config.json "architectures" entries
    model_types: tuple[str, ...]      # config.json "model_type" values
    # Rotate q/k rows from HF's "rotate_half" layout to llama.cpp's interleaved (GPT-J style)
    # rotary layout, as convert_hf_to_gguf's LlamaModel.permute does (llama.cpp rope type NORM
    # on a checkpoint trained with rotate_half).
    permute_qk: bool = False
    # Gemma RMSNorm computes x * (1 + w); llama.cpp computes x * w, so the file stores 1 + w.
    norm_shift: float = 0.0
    # Gemma checkpoints always reuse the embedding as the head; a stray lm_head is skipped.
    skip_lm_head: bool = False
    # Gemma-3 drops embedding rows beyond the tokenizer's real vocabulary.
    trim_embedding_to_vocab: bool = False
    # SentencePiece vocab: tokenizer.ggml.add_space_prefix as convert_hf_to_gguf writes it
    # (None: not written, llama.cpp's default of True applies).
    spm_add_space_prefix: bool | None = None
    # SentencePiece vocab: tokenizer.json's added tokens override the pieces they share an id
    # with (<unk>, <s>, </s> become control tokens), as Phi-3's converter does
    spm_all_added_tokens: bool = False
    norm: str = "rms"                 # rms | layer (LayerNorm with bias: phi2)
    # What llama.cpp assumes when a config omits a key (convert_hf_to_gguf's defaults).
    defaults: dict[str, object] = field(default_factory=dict)
    # {arch}.rope.dimension_count: None (not written), "full" (head_dim) or "partial"
    # (head_dim x partial_rotary_factor, the factor defaulting to `partial_rotary`)
    rope_dims: str | None = None
    partial_rotary: float = 1.0
    write_vocab_size: bool = False    # {arch}.vocab_size (LlamaModel)
    head_dim_from_config: bool = True  # Granite's converter ignores head_dim
    add_bos: bool | None = None       # tokenizer.ggml.add_bos_token forced (phi2: False)
    # sliding window: "" none, "config" sliding_window when the config enables it (mistral,
    # qwen2/3 use_sliding_window), "always" (gemma2, phi3 write 0 for none), "pattern"
    # (gemma3/olmo2: window plus a per-layer pattern)
    swa: str = "config"
    meta: tuple[MetaRow, ...] = ()    # further keys

    @property
    def gguf_arch(self) -> str:
        return MODEL_ARCH_NAMES[self.model_arch]


_GEMMA = dict(norm_shift=1.0, skip_lm_head=True, spm_add_space_prefix=False)
_GRANITE_META = (
    MetaRow(Keys.Attention.SCALE, ("attention_multiplier",)),
    MetaRow(Keys.LLM.EMBEDDING_SCALE, ("embedding_multiplier",)),
    MetaRow(Keys.LLM.RESIDUAL_SCALE, ("residual_multiplier",)),
    MetaRow(Keys.LLM.LOGIT_SCALE, ("logits_scaling",)),
)
_SOFTCAP_META = (
    MetaRow(Keys.LLM.ATTN_LOGIT_SOFTCAPPING, ("attn_logit_softcapping",)),
    MetaRow(Keys.LLM.FINAL_LOGIT_SOFTCAPPING, ("final_logit_softcapping",)),
)

HF_ARCHS: dict[str, HFArch] = {a.key: a for a in (
    HFArch("llama", MODEL_ARCH.LLAMA, ("LlamaForCausalLM", "LLaMAForCausalLM"), ("llama",),
           permute_qk=True, rope_dims="full", write_vocab_size=True),
    # Mistral v0.x is a Llama block; convert_hf_to_gguf writes it as the llama architecture.
    HFArch("mistral", MODEL_ARCH.LLAMA, ("MistralForCausalLM",), ("mistral",),
           permute_qk=True, rope_dims="full", write_vocab_size=True),
    HFArch("qwen2", MODEL_ARCH.QWEN2, ("Qwen2ForCausalLM",), ("qwen2",)),
    HFArch("qwen3", MODEL_ARCH.QWEN3, ("Qwen3ForCausalLM",), ("qwen3",)),
    HFArch("gemma2", MODEL_ARCH.GEMMA2, ("Gemma2ForCausalLM",), ("gemma2",), swa="always",
           meta=_SOFTCAP_META, **_GEMMA),
    HFArch("gemma3", MODEL_ARCH.GEMMA3, ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"),
           ("gemma3_text", "gemma3"), trim_embedding_to_vocab=True, swa="pattern",
           meta=(MetaRow(Keys.LLM.FINAL_LOGIT_SOFTCAPPING, ("final_logit_softcapping",)),),
           defaults={"max_position_embeddings": 131072, "num_attention_heads": 8, "num_key_value_heads": 4,
                     "head_dim": 256, "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0,
                     "rope_local_base_freq": 10_000.0}, **_GEMMA),
    HFArch("phi2", MODEL_ARCH.PHI2, ("PhiForCausalLM",), ("phi",), norm="layer", rope_dims="partial",
           partial_rotary=0.5, add_bos=False, swa=""),
    # (convert_hf_to_gguf writes Phi-2's feed_forward_length as 4 * n_embd, which is its
    # intermediate_size; the config's value is written here, so a narrower MLP loads too)
    HFArch("phi3", MODEL_ARCH.PHI3, ("Phi3ForCausalLM",), ("phi3",), rope_dims="partial", swa="always",
           spm_all_added_tokens=True),
    HFArch("glm4", MODEL_ARCH.GLM4, ("Glm4ForCausalLM",), ("glm4",), rope_dims="partial", partial_rotary=0.5),
    HFArch("olmo2", MODEL_ARCH.OLMO2, ("Olmo2ForCausalLM",), ("olmo2",), swa="pattern"),
    HFArch("granite", MODEL_ARCH.GRANITE, ("GraniteForCausalLM",), ("granite",), permute_qk=True,
           rope_dims="full", write_vocab_size=True, head_dim_from_config=False, meta=_GRANITE_META),
    HFArch("smollm3", MODEL_ARCH.SMOLLM3, ("SmolLM3ForCausalLM",), ("smollm3",), permute_qk=True,
           rope_dims="full", write_vocab_size=True),
    # mixtures of experts: each expert's matrices are stacked into one [n_expert, rows, cols] tensor
    HFArch("qwen3moe", MODEL_ARCH.QWEN3MOE, ("Qwen3MoeForCausalLM",), ("qwen3_moe",),
           meta=(MetaRow(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, ("moe_intermediate_size",), "u32"),)),
    # Mixtral is a Llama block with a sparse MLP; convert_hf_to_gguf writes it as llama
    HFArch("mixtral", MODEL_ARCH.LLAMA, ("MixtralForCausalLM",), ("mixtral",), permute_qk=True, rope_dims="full",
           write_vocab_size=True),
)}


def supported_hf_architectures() -> list[str]:
    return sorted({c for a in HF_ARCHS.values() for c in a.hf_classes})


def find_hf_arch(architectures: list[str] | None, model_type: str | None) -> HFArch | None:
    """The row for a config.json, by its "architectures" class first, then its model_type."""
    for cls in architectures or []:
        for a in HF_ARCHS.values():
            if cls in a.hf_classes:
                return a
    for a in HF_ARCHS.values():
        if model_type in a.model_types:
            return a
    return None


@lru_cache(maxsize=None)
def _name_map(model_arch: MODEL_ARCH):
    """gguf-py's HF -> GGUF name map of an architecture for block 0 (other blocks are renamed)."""
    return get_tensor_name_map(model_arch, 1)


_LAYER = re.compile(r"^(.*?\b(?:layers|h|blocks))\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(.+)$")


def expert_index(hf_name: str) -> int | None:
    """The expert a per-expert HF tensor (...experts.{e}.gate_proj.weight) belongs to."""
    m = _EXPERT.match(hf_name)
    return int(m.group(2)) if m else None


def hf_to_gguf_name(arch: HFArch, hf_name: str) -> str | None:
    """GGUF name for an HF tensor name, None for tensors llama.cpp does not use.

    Raises KeyError for a tensor this architecture does not know (so nothing is silently lost)."""
    if hf_name.endswith(HF_IGNORED_SUFFIXES):
        return None
    # multimodal wrappers (Gemma3ForConditionalGeneration) nest the text model
    for prefix in ("model.language_model.", "language_model.model.", "language_model."):
        if hf_name.startswith(prefix):
            rest = hf_name[len(prefix):]
            hf_name = rest if rest.startswith(("model.", "lm_head.")) else "model." + rest
            break
    if hf_name == "lm_head.weight" and arch.skip_lm_head:
        return None
    m = _LAYER.match(hf_name)
    probe = f"{m.group(1)}.0.{m.group(3)}" if m else hf_name
    if (x := _EXPERT.match(probe)) is not None:      # one expert's matrix: part of the stacked tensor
        probe = f"{x.group(1)}.{x.group(3)}"
    name = _name_map(arch.model_arch).get_name(probe, try_suffixes=(".weight", ".bias"))
    if name is None:
        if hf_name.startswith(HF_VISION_PREFIXES):
            return None
        raise KeyError(hf_name)
    if m:
        if not name.startswith("blk.0."):
            raise KeyError(hf_name)
        name = f"blk.{int(m.group(2))}.{name[len('blk.0.'):]}"
    return name


# Emission order inside a block: data-flow order (weight before bias); others after, by name.
_BLOCK_ORDER = ("attn_norm", "attn_qkv", "attn_q", "attn_q_norm", "attn_k", "attn_k_norm", "attn_v", "attn_output",
                "post_attention_norm", "ffn_norm", "ffn_gate_inp", "ffn_gate", "ffn_up", "ffn_down",
                "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "post_ffw_norm")
_BLOCK_RANK = {n: i for i, n in enumerate(_BLOCK_ORDER)}


def canonical_order(names: list[str], arch: HFArch | None = None) -> list[str]:
    """GGUF emission order: rope_freqs, token_embd, blocks in order (data-flow order within a
    block), output_norm, output."""
    head = {"rope_freqs.weight": 0, "rope_factors_long.weight": 1, "rope_factors_short.weight": 2,
            "token_embd.weight": 3}
    tail = {"output_norm.weight": 0, "output_norm.bias": 1, "output.weight": 2, "output.bias": 3}

    def key(n: str):
        if n in head:
            return (0, head[n], 0, 0, "")
        if n.startswith("blk."):
            _, idx, suffix = n.split(".", 2)
            base, _, kind = suffix.rpartition(".")
            return (1, int(idx), _BLOCK_RANK.get(base, len(_BLOCK_RANK)), kind != "weight", base)
        return (2, tail.get(n, len(tail)), 0, 0, n)

    return sorted(names, key=key)


def permute_for_rope(w, n_head: int):
    """Reorder q/k projection rows from HF's half-split rotary layout to llama.cpp's interleaved
    pairs: within each head, rows [r0..r(d/2-1), s0..s(d/2-1)] become [r0, s0, r1, s1, ...].

    For k, n_head is the number of kv heads. Works on weights [rows, cols] and biases [rows]."""
    rows = w.shape[0]
    half = rows // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---------------------------------------------------------------- shapes from config.json

# Architecture-spec field -> config.json keys that carry it, tried in order (LLaMA-style,
# GPT-style, ChatGLM). The first five every shape needs; the others have fallbacks.
HF_CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "n_layer": ("num_hidden_layers", "n_layer", "num_layers"),
    "n_embd": ("hidden_size", "n_embd", "d_model"),
    "n_head": ("num_attention_heads", "n_head"),
    # an MoE's experts (every layer sparse, as Qwen3-MoE and Mixtral) are moe_intermediate_size wide
    "n_ff": ("moe_intermediate_size", "intermediate_size", "ffn_hidden_size", "n_inner"),
    "n_vocab": ("vocab_size", "padded_vocab_size"),
}
HF_CONFIG_OPTIONAL_KEYS: dict[str, tuple[str, ...]] = {
    "n_head_kv": ("num_key_value_heads",),       # ChatGLM: multi_query_group_num (with multi_query_attention)
    "head_dim": ("head_dim", "kv_channels"),
    "n_ctx_train": ("max_position_embeddings", "seq_length", "n_positions"),
    "n_expert": ("num_local_experts", "num_experts"),
    "n_expert_used": ("num_experts_per_tok",),
}

# config.json "architectures" classes -> llama.cpp architecture, for reading shapes: the
# classes quantkit converts (HF_ARCHS) and those whose shapes it only reads.
HF_CLASS_ARCH: dict[str, str] = {
    "GemmaForCausalLM": "gemma",
    "ChatGLMModel": "chatglm", "ChatGLMForConditionalGeneration": "chatglm",
    **{c: a.gguf_arch for a in HF_ARCHS.values() for c in a.hf_classes},
}


@dataclass(frozen=True)
class BlockLayout:
    """Which tensors one block of a llama.cpp architecture holds, beyond what config.json says."""

    norm: str = "rms"                 # rms | layer (LayerNorm: weight and bias)
    ffn: str = "gated"                # gated (gate, up, down) | gated_fused (up holds gate) | plain
    bias: str = "none"                # none | qkv | all
    norms: str = "pre"                # pre | sandwich (norms after attention and MLP too) | post | parallel
    qk_norm: bool | str = False       # per-head q/k norms; "full": one norm over all heads
    fused_qkv: bool = False           # one attn_qkv matrix
    tied_embeddings: bool = False     # when config.json omits tie_word_embeddings
    # sliding-window layout when the file does not say: every n-th layer global, or
    # "odd-global" (layer 0 slides, 1 is global, ...); llama-model.cpp set_swa_pattern
    swa_pattern: int | str | None = None


BLOCK_LAYOUTS: dict[str, BlockLayout] = {
    "llama": BlockLayout(),
    "qwen2": BlockLayout(bias="qkv"),
    "qwen3": BlockLayout(qk_norm=True),
    "qwen3moe": BlockLayout(qk_norm=True),
    "phi2": BlockLayout(norm="layer", ffn="plain", bias="all", norms="parallel"),
    "phi3": BlockLayout(ffn="gated_fused", fused_qkv=True),
    "glm4": BlockLayout(ffn="gated_fused", bias="qkv", norms="sandwich"),
    "olmo2": BlockLayout(norms="post", qk_norm="full"),
    "chatglm": BlockLayout(ffn="gated_fused", bias="qkv", fused_qkv=True),
    "gemma": BlockLayout(tied_embeddings=True),
    "gemma2": BlockLayout(norms="sandwich", tied_embeddings=True, swa_pattern="odd-global"),
    "gemma3": BlockLayout(norms="sandwich", qk_norm=True, tied_embeddings=True, swa_pattern=6),
    "cohere2": BlockLayout(swa_pattern=4),
    "gpt-oss": BlockLayout(swa_pattern=2),
}


def block_layout(gguf_arch: str) -> BlockLayout:
    """The row for a llama.cpp architecture; a plain Llama block for one not listed."""
    return BLOCK_LAYOUTS.get(gguf_arch, BlockLayout())


# ---------------------------------------------------------------- what quantkit can do

# GGUF architectures whose files quantkit rebuilds as transformers models (models.gguf_hf, for
# runtimes.torch), so GPTQ can calibrate from a GGUF input too: every row above (transformers
# has each class)
TORCH_FROM_GGUF = tuple(sorted({a.gguf_arch for a in HF_ARCHS.values()}))


def describe(gguf_arch: str, hf_arch: HFArch | None, config: dict | None, n_expert: int = 0,
             n_expert_used: int = 0) -> dict:
    """What a model is (architecture, experts, vision tower) and what quantkit can do with it:
    for `quantkit inspect`. `hf_arch`/`config`: a Hugging Face directory's row and config.json."""
    cfg = config or {}
    vision = cfg.get("vision_config") if isinstance(cfg.get("vision_config"), dict) else None
    can = ["gguf: re-quantize to F32/F16/BF16, the legacy types and every K-quant mix (llama-quantize's rules)",
           "plan: memory and speed"]
    if hf_arch is not None:
        can = ["gguf: convert at F32/F16/BF16, the legacy types and every K-quant mix (llama-quantize's rules)",
               "gguf+gptq: GPTQ-compensated GGUF (block by block, streaming)",
               "plan: memory and speed from config.json"]
    elif gguf_arch in TORCH_FROM_GGUF:
        can.insert(1, "gguf+gptq: GPTQ-compensated GGUF (the file rebuilt in transformers)")
    if n_expert and (hf_arch is not None or gguf_arch in TORCH_FROM_GGUF):
        # experts: GPTQ on routed calibration (quant.moe), from the HF directory or the GGUF
        can.insert(2, "gpu formats (gptq, compressed-tensors): one linear per expert, the router unquantized")
    return {
        "architecture": (cfg.get("architectures") or [None])[0] if hf_arch else gguf_arch,
        "gguf_architecture": gguf_arch,
        "experts": n_expert, "experts_used": n_expert_used,
        "vision_tower": (vision.get("model_type") or "yes") if vision else None,
        "quantkit_can": can,
    }
