"""Tiny random models built from configs (nothing downloaded), with tokenizers trained offline on
the shipped WikiText-2: the Hugging Face directories the conversion, GPTQ and eval tests share."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from quantkit.util.data import DATA_DIR

WIKITEXT = Path(DATA_DIR) / "wikitext-2"

LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def wikitext_lines(name: str, n: int) -> list[str]:
    path = WIKITEXT / name
    assert path.is_file(), f"{path} not found: quantkit/data ships it"
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        s = line.strip()
        if s and not s.startswith("="):
            out.append(s)
        if len(out) >= n:
            break
    return out


def train_spm(out: Path, vocab_size: int, gemma: bool) -> Path:
    import sentencepiece as spm

    text = out / "train.txt"
    text.write_text("\n".join(wikitext_lines("valid.txt", 2000)), encoding="utf-8")
    ids = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3) if gemma else dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(out / "sp"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, split_digits=True,
        add_dummy_prefix=not gemma, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", num_threads=1, minloglevel=2,
        **({"pad_piece": "<pad>", "eos_piece": "<eos>", "bos_piece": "<bos>"} if gemma else {}), **ids)
    text.unlink()
    return out / "sp.model"


def spm_merges(sp) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """BPE vocab and merges equivalent to a SentencePiece BPE model (what transformers'
    SentencePieceExtractor derives; rebuilt here because it needs protobuf)."""
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    normal = {p for p, i in vocab.items()
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))}
    merges = []
    for piece in normal:
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                 if piece[:k] in normal and piece[k:] in normal]
        local.sort(key=lambda ab: (vocab[ab[0]], vocab[ab[1]]))
        merges.extend((a, b, sp.get_score(vocab[piece])) for a, b in local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return vocab, [(a, b) for a, b, _ in merges]


def save_spm_tokenizer(model_dir: Path, work: Path, vocab_size: int, gemma: bool) -> None:
    import sentencepiece as spm
    from transformers import GemmaTokenizer, LlamaTokenizer

    sp_path = train_spm(work, vocab_size, gemma)
    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    assert sp.get_piece_size() == vocab_size
    vocab, merges = spm_merges(sp)
    if gemma:
        tok = GemmaTokenizer(vocab=vocab, merges=merges)
    else:
        tok = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False)
    tok.save_pretrained(str(model_dir))
    shutil.copy(sp_path, model_dir / "tokenizer.model")


def save_bpe_tokenizer(model_dir: Path, regex: str, qwen: bool, vocab_size: int) -> int:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] if qwen else ["<|begin_of_text|>", "<|end_of_text|>"]
    tok = Tokenizer(models.BPE(ignore_merges=not qwen))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(wikitext_lines("valid.txt", 2000), trainer)
    tok.add_special_tokens(specials)  # after the learnt vocabulary, as in the real models
    if qwen:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                       pad_token="<|endoftext|>", add_bos_token=False)
        fast.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    else:
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", bos)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                       eos_token="<|end_of_text|>")
    fast.save_pretrained(str(model_dir))
    return tok.get_vocab_size()


def randomise(model: torch.nn.Module, gemma: bool) -> None:
    """Weights with some spread, so that transforms (q/k permutation, 1 + w norms, biases) all
    change the logits if they are wrong."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                base = 0.0 if (gemma or name.endswith("bias")) else 1.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1] ** 0.5))


def build_hf_model(kind: str, root: Path) -> Path:
    import transformers as tf

    d = root / kind
    d.mkdir()
    work = root / f"{kind}-work"
    work.mkdir()
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
    save_kwargs: dict = {}
    dtype = torch.float32
    if kind == "llama":
        save_spm_tokenizer(d, work, 1024, gemma=False)
        cfg = tf.LlamaConfig(vocab_size=1024, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                             rope_theta=10000.0, **common)
        cls = tf.LlamaForCausalLM
    elif kind == "mistral":
        save_spm_tokenizer(d, work, 1024, gemma=False)
        cfg = tf.MistralConfig(vocab_size=1024, bos_token_id=1, eos_token_id=2, sliding_window=None,
                               tie_word_embeddings=False, rope_theta=1e6, **common)
        cls = tf.MistralForCausalLM
        save_kwargs = {"max_shard_size": "100KB"}   # sharded, with model.safetensors.index.json
        dtype = torch.bfloat16
    elif kind == "llama3":
        n = save_bpe_tokenizer(d, LLAMA3_REGEX, qwen=False, vocab_size=1000)
        cfg = tf.LlamaConfig(vocab_size=n, bos_token_id=n - 2, eos_token_id=n - 1, tie_word_embeddings=True,
                             rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 64},
                             **common)
        cls = tf.LlamaForCausalLM
    elif kind == "qwen2":
        n = save_bpe_tokenizer(d, QWEN2_REGEX, qwen=True, vocab_size=1000)
        # the embedding is padded past the tokenizer, as Qwen2's 151936 rows for 151665 tokens
        cfg = tf.Qwen2Config(vocab_size=n + 24, eos_token_id=n - 3, tie_word_embeddings=True,
                             rope_theta=1e6, **common)
        cls = tf.Qwen2ForCausalLM
    elif kind == "gemma3":
        save_spm_tokenizer(d, work, 1024, gemma=True)
        cfg = tf.Gemma3TextConfig(
            vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
            max_position_embeddings=256, rms_norm_eps=1e-6, sliding_window=4,
            layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=30.0,
            pad_token_id=0, eos_token_id=1, bos_token_id=2)
        cls = tf.Gemma3ForCausalLM
    else:
        raise ValueError(kind)
    torch.manual_seed(0)
    cfg._attn_implementation = "eager"
    model = cls(cfg)
    randomise(model, gemma=kind == "gemma3")
    model.to(dtype).save_pretrained(str(d), **save_kwargs)
    shutil.rmtree(work)
    return d


def tiny_model(arch: str = "llama", seed: int = 0, vocab: int = 512, structured: bool = False):
    """A 2-layer random causal LM, float32, eval mode. structured: low-rank token embeddings
    and uneven norm weights, so activations are correlated across channels as in trained LMs
    (isotropic random activations leave GPTQ little to exploit)."""
    import transformers as tf
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if arch == "llama":
        cfg = tf.LlamaConfig(**common, tie_word_embeddings=False)
        cls = tf.LlamaForCausalLM
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**common, tie_word_embeddings=True)
        cls = tf.Qwen2ForCausalLM
    elif arch == "mistral":              # a sliding window shorter than the test sequences
        cfg = tf.MistralConfig(**common, sliding_window=8, tie_word_embeddings=False)
        cls = tf.MistralForCausalLM
    elif arch == "gemma3":
        cfg = tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
        cls = tf.Gemma3ForCausalLM
    else:
        raise ValueError(arch)
    cfg.bos_token_id = 1
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    with torch.no_grad():                       # larger weights than the init's 0.02: real-ish outliers
        for n, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in n:
                p.mul_(3.0)
        if structured:
            g = torch.Generator().manual_seed(seed + 5)
            E = model.model.embed_tokens.weight
            E.copy_(torch.randn(E.shape[0], 8, generator=g) @ torch.randn(8, E.shape[1], generator=g) * 0.3
                    + 0.05 * torch.randn(E.shape, generator=g))
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.copy_(torch.rand(p.shape, generator=g) * 2.5 + 0.5)
    return model


HIDDEN, FF = 256, 512          # multiples of 256: every K-quant applies without fallbacks


def build_gptq_llama(root: Path) -> Path:
    """A tiny llama (HF directory, SentencePiece tokenizer trained offline) with low-rank embeddings
    and uneven norm gains, so activations are correlated as in trained LMs and GPTQ clearly helps."""
    import transformers as tf

    d, work = root / "llama", root / "work"
    d.mkdir()
    work.mkdir()
    save_spm_tokenizer(d, work, 1024, gemma=False)
    shutil.rmtree(work)
    cfg = tf.LlamaConfig(vocab_size=1024, hidden_size=HIDDEN, intermediate_size=FF, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).float()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        # low-rank embeddings and uneven norm gains: channels correlated, with outliers
        E = model.model.embed_tokens.weight
        E.copy_(torch.randn(E.shape[0], 16, generator=g) @ torch.randn(16, HIDDEN, generator=g) * 0.3
                + 0.05 * torch.randn(E.shape, generator=g))
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(torch.rand(p.shape, generator=g) * 2.5 + 0.5)
            elif p.dim() == 2 and "embed" not in n:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    model.save_pretrained(str(d))
    return d


def write_minimal_llama_gguf(path, tensors: dict) -> str:
    """A GGUF with the least metadata the strict reader accepts for a llama (no vocabulary:
    tokenizer model "none") and the given float32 tensors {name: ndarray}."""
    import numpy as np
    from gguf import GGUFValueType
    from quantkit.models.gguf import write_gguf_file
    from quantkit.models.source import MetaValue

    meta = {"general.architecture": MetaValue("llama", GGUFValueType.STRING),
            "llama.block_count": MetaValue(1, GGUFValueType.UINT32),
            "llama.embedding_length": MetaValue(64, GGUFValueType.UINT32),
            "llama.attention.head_count": MetaValue(4, GGUFValueType.UINT32),
            "llama.context_length": MetaValue(256, GGUFValueType.UINT32),
            "llama.attention.layer_norm_rms_epsilon": MetaValue(1e-6, GGUFValueType.FLOAT32),
            "tokenizer.ggml.model": MetaValue("none", GGUFValueType.STRING)}
    arrays = {n: np.ascontiguousarray(t, dtype=np.float32) for n, t in tensors.items()}
    write_gguf_file(str(path), "llama", meta, [(n, t.shape, "f32") for n, t in arrays.items()],
                    lambda n: arrays[n].view(np.uint8))
    return str(path)


GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# Each architecture's tokenizer kind, as its released checkpoints ship it: SentencePiece, or
# byte-level BPE with the family's pre-tokenizer regex (Llama-3's is also OLMo-2's cl100k and
# GLM-4's; Granite's and Phi-2's are GPT-2's).
ARCH_TOKENIZERS = {
    "llama3": ("bpe", LLAMA3_REGEX), "qwen3": ("bpe-qwen", QWEN2_REGEX), "gemma2": ("spm-gemma", None),
    "phi3": ("spm", None), "granite": ("bpe", GPT2_REGEX), "olmo2": ("bpe", LLAMA3_REGEX),
    "smollm3": ("bpe", LLAMA3_REGEX), "glm4": ("bpe", LLAMA3_REGEX), "phi2": ("bpe", GPT2_REGEX),
    "mistral": ("spm", None), "qwen2": ("bpe-qwen", QWEN2_REGEX), "gemma3": ("spm-gemma", None),
    "qwen3moe": ("bpe-qwen", QWEN2_REGEX), "mixtral": ("spm", None),
}


def _arch_config(kind: str, n_vocab: int, special: dict, layers: int = 2):
    """transformers config of a tiny `kind` model: hidden 256 (every K-quant applies), 2 layers."""
    import transformers as tf

    c = dict(vocab_size=n_vocab, hidden_size=HIDDEN, intermediate_size=FF, num_hidden_layers=layers,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **special)
    if kind == "llama3":
        return tf.LlamaConfig(tie_word_embeddings=True, rms_norm_eps=1e-5,
                              rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 64}, **c)
    if kind == "mistral":
        return tf.MistralConfig(sliding_window=None, tie_word_embeddings=False, rope_theta=1e6, **c)
    if kind == "qwen2":
        return tf.Qwen2Config(tie_word_embeddings=True, rope_theta=1e6, **c)
    if kind == "qwen3":
        return tf.Qwen3Config(tie_word_embeddings=True, head_dim=64, rope_theta=1e6, **c)
    if kind == "gemma2":
        return tf.Gemma2Config(head_dim=64, query_pre_attn_scalar=64, sliding_window=4, tie_word_embeddings=True,
                               attn_logit_softcapping=50.0, final_logit_softcapping=30.0, **c)
    if kind == "gemma3":
        return tf.Gemma3TextConfig(head_dim=64, query_pre_attn_scalar=64, sliding_window=4,
                                   layer_types=["sliding_attention", "full_attention"] * (layers // 2),
                                   final_logit_softcapping=30.0, **c)
    if kind == "phi3":            # Phi-3.5's LongRoPE: short factors up to 256 tokens (the tests' context)
        c["max_position_embeddings"] = 1024
        return tf.Phi3Config(tie_word_embeddings=False, sliding_window=None, original_max_position_embeddings=256,
                             rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                              "short_factor": [1.0 + 0.05 * i for i in range(32)],
                                              "long_factor": [1.0 + 0.3 * i for i in range(32)]}, **c)
    if kind == "phi2":
        c.pop("num_key_value_heads")
        return tf.PhiConfig(partial_rotary_factor=0.5, tie_word_embeddings=False, **c)
    if kind == "glm4":
        return tf.Glm4Config(head_dim=64, partial_rotary_factor=0.5, attention_bias=True, tie_word_embeddings=False,
                             **c)
    if kind == "olmo2":
        return tf.Olmo2Config(tie_word_embeddings=False, **c)
    if kind == "granite":
        return tf.GraniteConfig(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.015625,
                                logits_scaling=8.0, tie_word_embeddings=True, **c)
    if kind == "smollm3":
        return tf.SmolLM3Config(tie_word_embeddings=True, **c)
    if kind == "qwen3moe":
        return tf.Qwen3MoeConfig(head_dim=64, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256,
                                 norm_topk_prob=True, tie_word_embeddings=False, **c)
    if kind == "mixtral":
        return tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False,
                                sliding_window=None, **c)
    raise ValueError(kind)


def build_arch_model(kind: str, root: Path, vocab_size: int = 768, layers: int = 2) -> Path:
    """A tiny random Hugging Face model of architecture `kind` (see ARCH_TOKENIZERS) with the
    family's tokenizer kind trained offline, float32, in root/kind."""
    import transformers as tf

    d = root / kind
    d.mkdir()
    work = root / f"{kind}-work"
    work.mkdir()
    tok_kind, regex = ARCH_TOKENIZERS[kind]
    if tok_kind.startswith("spm"):
        gemma = tok_kind == "spm-gemma"
        save_spm_tokenizer(d, work, vocab_size, gemma=gemma)
        n = vocab_size
        special = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2) if gemma else \
            dict(bos_token_id=1, eos_token_id=2, pad_token_id=None)
        if kind == "phi3":
            # Phi-3's added chat tokens past the SentencePiece pieces, the embedding padded beyond
            # them (llama.cpp looks <|endoftext|> up in a vocabulary named phi3)
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(str(d))
            tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|end|>", "<|user|>"]})
            tok.save_pretrained(str(d))
            n = vocab_size + 8
    else:
        qwen = tok_kind == "bpe-qwen"
        n = save_bpe_tokenizer(d, regex, qwen=qwen, vocab_size=vocab_size)
        special = dict(eos_token_id=n - 3, bos_token_id=None, pad_token_id=None) if qwen else \
            dict(bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=None)
    cfg = _arch_config(kind, n, special, layers)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    randomise(model, gemma=kind.startswith("gemma"))
    model.float().save_pretrained(str(d))
    shutil.rmtree(work)
    return d


def starve_expert(src: Path, out: Path, expert: int = 3, axis: int = 7) -> Path:
    """A copy of the tiny mixture of experts `src` (build_arch_model's qwen3moe / mixtral) in
    which no token is ever routed to `expert`: every token embedding gets a large constant on
    coordinate `axis`, so after each RMSNorm that coordinate dominates and is positive, and the
    router rows read it with +1 for every expert but `expert`, -1 for it."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, out)
    sd = load_file(str(out / "model.safetensors"))
    sd["model.embed_tokens.weight"][:, axis] = 50.0
    for name, w in sd.items():
        if name.endswith((".mlp.gate.weight", ".block_sparse_moe.gate.weight")):
            w[:, axis] = 1.0
            w[expert, axis] = -1.0
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def fuse_experts(src: Path, out: Path, prefix: str = "mlp") -> Path:
    """A copy of the tiny mixture of experts `src` (build_arch_model's qwen3moe / mixtral) with
    its experts stored fused, as transformers 5 holds them and as its
    save_pretrained(save_original_format=False) writes them: per layer
    `{prefix}.experts.gate_up_proj` [E, 2 * ff, hidden] (each expert's gate rows, then its up
    rows) and `{prefix}.experts.down_proj` [E, hidden, ff], the router as `{prefix}.gate.weight`.
    prefix "block_sparse_moe": Mixtral's own spelling, which transformers also loads."""
    import re
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, out)
    sd = load_file(str(out / "model.safetensors"))
    expert = re.compile(r"^(.*\.layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
    router = re.compile(r"^(.*\.layers\.\d+)\.(?:mlp|block_sparse_moe)\.gate\.weight$")
    part = {"gate_proj": 0, "w1": 0, "up_proj": 1, "w3": 1, "down_proj": 2, "w2": 2}
    layers: dict[str, dict[tuple[int, int], torch.Tensor]] = {}
    fused: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if (m := expert.match(name)) is not None:
            layers.setdefault(m.group(1), {})[(part[m.group(3)], int(m.group(2)))] = t
        elif (m := router.match(name)) is not None:
            fused[f"{m.group(1)}.{prefix}.gate.weight"] = t
        else:
            fused[name] = t
    for layer, mats in layers.items():
        n = 1 + max(e for _, e in mats)
        fused[f"{layer}.{prefix}.experts.gate_up_proj"] = torch.stack(
            [torch.cat([mats[(0, e)], mats[(1, e)]]) for e in range(n)])
        fused[f"{layer}.{prefix}.experts.down_proj"] = torch.stack([mats[(2, e)] for e in range(n)])
    save_file(fused, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def bf16_copy(src: Path, out: Path) -> Path:
    """A copy of the tiny model `src` with every weight rounded to bfloat16 (stored as float32):
    a bf16 checkpoint's values, whose experts the streaming driver keeps compact (bf16)."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, out)
    sd = {k: v.to(torch.bfloat16).float() for k, v in load_file(str(out / "model.safetensors")).items()}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
