"""Architecture facts as data: canonical (GGUF) tensor names and the Hugging Face names they come from.

Canonical names are llama.cpp's GGUF names (gguf-py `constants.TENSOR_NAMES`): token_embd.weight,
blk.{i}.attn_q.weight, output_norm.weight, output.weight. Each supported Hugging Face architecture
is one `HFArch` row: which GGUF architecture it becomes, how its per-layer tensors are named, and
which value transforms llama.cpp's convert_hf_to_gguf.py applies on the way (q/k row permutation
for llama-style rotary, Gemma's `1 + w` norms). Readers and writers look these up; nothing here
touches a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Top-level tensors shared by every Llama-family checkpoint (HF name -> GGUF name).
HF_GLOBAL_TENSORS: dict[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}

# Per-layer tensors of the plain Llama block (llama, mistral, qwen2): HF suffix after
# "model.layers.{i}." -> GGUF suffix after "blk.{i}.". The order is the emission order.
_LLAMA_BLOCK: dict[str, str] = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}

# Gemma-3: four norms per block (post_attention_layernorm is the *post-attention* norm here, the
# pre-MLP norm is pre_feedforward_layernorm) plus per-head q/k RMS norms.
_GEMMA3_BLOCK: dict[str, str] = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}

# HF tensors that carry no weights llama.cpp needs.
HF_IGNORED_SUFFIXES: tuple[str, ...] = (
    "rotary_emb.inv_freq",
    ".attention.masked_bias",
    ".attention.bias",
)


@dataclass(frozen=True)
class HFArch:
    """How one Hugging Face architecture becomes a GGUF architecture."""

    key: str                          # our name: "llama", "mistral", "qwen2", "gemma3"
    gguf_arch: str                    # general.architecture llama.cpp expects
    hf_classes: tuple[str, ...]       # config.json "architectures" entries
    model_types: tuple[str, ...]      # config.json "model_type" values
    block: dict[str, str]             # per-layer HF suffix -> GGUF suffix, emission order
    # Rotate q/k rows from HF's "rotate_half" layout to llama.cpp's interleaved (GPT-J style)
    # rotary layout, as convert_hf_to_gguf's LlamaModel.permute does.
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
    norm: str = "rms"
    # What llama.cpp assumes when a config omits a key (convert_hf_to_gguf's defaults).
    defaults: dict[str, object] = field(default_factory=dict)


HF_ARCHS: dict[str, HFArch] = {
    "llama": HFArch(
        key="llama", gguf_arch="llama",
        hf_classes=("LlamaForCausalLM", "LLaMAForCausalLM"), model_types=("llama",),
        block=_LLAMA_BLOCK, permute_qk=True,
    ),
    # Mistral v0.x is a Llama block; convert_hf_to_gguf writes it as the llama architecture.
    "mistral": HFArch(
        key="mistral", gguf_arch="llama",
        hf_classes=("MistralForCausalLM",), model_types=("mistral",),
        block=_LLAMA_BLOCK, permute_qk=True,
    ),
    "qwen2": HFArch(
        key="qwen2", gguf_arch="qwen2",
        hf_classes=("Qwen2ForCausalLM",), model_types=("qwen2",),
        block=_LLAMA_BLOCK,
    ),
    "gemma3": HFArch(
        key="gemma3", gguf_arch="gemma3",
        hf_classes=("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"),
        model_types=("gemma3_text", "gemma3"),
        block=_GEMMA3_BLOCK, norm_shift=1.0, skip_lm_head=True, trim_embedding_to_vocab=True,
        spm_add_space_prefix=False,
        defaults={"max_position_embeddings": 131072, "num_attention_heads": 8, "num_key_value_heads": 4,
                  "head_dim": 256, "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0,
                  "rope_local_base_freq": 10_000.0},
    ),
}


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
    if hf_name in HF_GLOBAL_TENSORS:
        if hf_name == "lm_head.weight" and arch.skip_lm_head:
            return None
        return HF_GLOBAL_TENSORS[hf_name]
    if hf_name.startswith("model.layers."):
        rest = hf_name[len("model.layers."):]
        idx, _, suffix = rest.partition(".")
        if idx.isdecimal() and suffix in arch.block:
            return f"blk.{int(idx)}.{arch.block[suffix]}"
    if hf_name.startswith(("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                           "model.multi_modal_projector.")):
        return None
    raise KeyError(hf_name)


def canonical_order(names: list[str], arch: HFArch) -> list[str]:
    """GGUF emission order: rope_freqs, token_embd, blocks in order (per-block order of the map),
    output_norm, output."""
    block_rank = {v: i for i, v in enumerate(arch.block.values())}
    head = {"rope_freqs.weight": 0, "token_embd.weight": 1}
    tail = {"output_norm.weight": 0, "output.weight": 1}

    def key(n: str):
        if n in head:
            return (0, head[n], 0)
        if n.startswith("blk."):
            _, idx, suffix = n.split(".", 2)
            return (1, int(idx), block_rank.get(suffix, len(block_rank)))
        return (2, tail.get(n, len(tail)), 0)

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
    "n_ff": ("intermediate_size", "ffn_hidden_size", "n_inner"),
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
    **{c: a.gguf_arch for a in HF_ARCHS.values() for c in a.hf_classes},
    "MixtralForCausalLM": "llama", "Gemma2ForCausalLM": "gemma2", "GemmaForCausalLM": "gemma",
    "PhiForCausalLM": "phi2", "Phi3ForCausalLM": "phi3", "Qwen3ForCausalLM": "qwen3",
    "ChatGLMModel": "chatglm", "ChatGLMForConditionalGeneration": "chatglm",
}


@dataclass(frozen=True)
class BlockLayout:
    """Which tensors one block of a llama.cpp architecture holds, beyond what config.json says."""

    norm: str = "rms"                 # rms | layer (LayerNorm: weight and bias)
    ffn: str = "gated"                # gated (gate, up, down) | gated_fused (up holds gate) | plain
    bias: str = "none"                # none | qkv | all
    norms: str = "pre"                # pre | sandwich (norms after attention and MLP too) | parallel
    qk_norm: bool = False             # per-head q/k norms
    fused_qkv: bool = False           # one attn_qkv matrix
    tied_embeddings: bool = False     # when config.json omits tie_word_embeddings
    # sliding-window layout when the file does not say: every n-th layer global, or
    # "odd-global" (layer 0 slides, 1 is global, ...); llama-model.cpp set_swa_pattern
    swa_pattern: int | str | None = None


BLOCK_LAYOUTS: dict[str, BlockLayout] = {
    "llama": BlockLayout(),
    "qwen2": BlockLayout(bias="qkv"),
    "qwen3": BlockLayout(qk_norm=True),
    "phi2": BlockLayout(norm="layer", ffn="plain", bias="all", norms="parallel"),
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
