"""The torch runtime: a transformers causal LM on CPU, from a Hugging Face directory or a GGUF
(model_from_gguf, its weights dequantized); TorchCausalLM is its `Runtime`.

The plain reference path (DESIGN.md: "the plain torch path is the default and the reference"):
AutoModelForCausalLM in float32, whatever dtype the checkpoint stores, so a BF16 checkpoint is
evaluated at its exact F32 dequantization.
"""

from __future__ import annotations

import os
import time

import numpy as np

from ..util.errors import QuantkitError


def _meta(src, key: str, default=None):
    v = src.metadata.get(f"{src.spec.arch}.{key}")
    return v.value if v is not None else default


def gguf_tensor_for_hf(src, arch, hf_name: str):
    """The float32 tensor of HF parameter `hf_name` from a GGUFSource, or None if the GGUF has
    no such tensor: the inverse of quantkit's HF -> GGUF conversion (Gemma's stored 1 + w norms
    shifted back, llama's q/k rows permuted back to the half-split rotary layout)."""
    from ..models.arch import hf_to_gguf_name
    spec = src.spec
    g = hf_to_gguf_name(arch, hf_name)
    if g is None:
        return None
    t = src.load(g)
    if arch.norm_shift and g.endswith("norm.weight"):
        t = t - arch.norm_shift
    if arch.permute_qk and (".attn_q." in g or ".attn_k." in g):
        n = spec.n_head if ".attn_q." in g else spec.n_head_kv
        half = t.shape[0] // n // 2
        t = t.reshape(n, half, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)
    return t


def model_from_gguf(path: str, load: bool = True):
    """A transformers model (float32) holding a GGUF's weights, dequantized (gguf_tensor_for_hf).
    Gemma-3 and llama GGUFs. load=False: (model, arch) with parameters allocated but not
    filled, for callers that load parts of it themselves (quant.gguf_gptq, block by block)."""
    import torch
    import transformers as tf

    from ..models.arch import HF_ARCHS
    from ..models.gguf import GGUFSource

    with GGUFSource(path) as src:
        spec = src.spec
        common = dict(vocab_size=spec.n_vocab, hidden_size=spec.n_embd, intermediate_size=spec.n_ff,
                      num_hidden_layers=spec.n_layer, num_attention_heads=spec.n_head,
                      num_key_value_heads=spec.n_head_kv, max_position_embeddings=spec.n_ctx_train or 4096,
                      rms_norm_eps=float(_meta(src, "attention.layer_norm_rms_epsilon", 1e-6)),
                      tie_word_embeddings=spec.tied_embeddings)
        if spec.arch == "gemma3":
            arch = HF_ARCHS["gemma3"]
            pattern = spec.sliding_window_pattern or [False] * spec.n_layer
            # llama.cpp: rope base 10000 on sliding-window layers, attention scale 1/sqrt(head_dim)
            cfg = tf.Gemma3TextConfig(
                head_dim=spec.head_dim, query_pre_attn_scalar=spec.head_dim,
                sliding_window=spec.sliding_window or spec.n_ctx_train,
                layer_types=["sliding_attention" if p else "full_attention" for p in pattern],
                rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": spec.rope_theta or 1e6},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                **common)
            cls = tf.Gemma3ForCausalLM
        elif spec.arch == "llama" and not src.metadata.get("llama.rope.scaling.type"):
            arch = HF_ARCHS["llama"]
            cfg = tf.LlamaConfig(head_dim=spec.head_dim, rope_theta=spec.rope_theta or 10000.0, **common)
            cls = tf.LlamaForCausalLM
        else:
            raise QuantkitError(f"the torch runtime reads GGUF files of gemma3 and llama models, not {spec.arch}",
                                path, "run it in llama.cpp instead")
        cfg._attn_implementation = "eager"
        try:
            from transformers.initialization import no_init_weights
        except ImportError:  # older transformers
            from transformers.modeling_utils import no_init_weights
        with no_init_weights():  # every weight is overwritten below; random init only costs time
            model = cls(cfg).float().eval()
        if not load:
            return model, arch
        state = {}
        for name in model.state_dict():
            t = gguf_tensor_for_hf(src, arch, name)
            if t is not None:
                state[name] = t
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [m for m in missing if not (spec.tied_embeddings and m == "lm_head.weight")]
        if missing or unexpected:
            raise QuantkitError(f"GGUF -> torch: missing {missing[:3]}, unexpected {unexpected[:3]}", path)
        if spec.tied_embeddings:
            model.tie_weights()
    return model


class TorchCausalLM:
    """A Hugging Face directory through transformers, or (from_gguf) a GGUF's weights dequantized
    into the matching transformers model."""
    kind = "torch"

    def __init__(self, path: str, n_threads: int | None = None, from_gguf: bool = False):
        import torch
        try:
            from transformers import AutoModelForCausalLM
        except ImportError:
            raise QuantkitError("transformers is not installed", hint="pip install transformers") from None
        self.path = path
        self.n_threads = n_threads or max(1, os.cpu_count() or 1)
        torch.set_num_threads(self.n_threads)
        t0 = time.perf_counter()
        try:
            if from_gguf:
                self.model = model_from_gguf(path)
            else:
                self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        except QuantkitError:
            raise
        except Exception as e:  # noqa: BLE001 - any loader failure is the user's file
            raise QuantkitError(f"transformers could not load the model ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})", path) from None
        self.model.eval()
        self.load_s = time.perf_counter() - t0
        self.n_vocab = int(self.model.get_output_embeddings().weight.shape[0])
        self._tok = None

    # ---- tokenizer (used only when this model is the reference) --------------------------
    def _tokenizer(self):
        if self._tok is None:
            from transformers import AutoTokenizer
            try:
                self._tok = AutoTokenizer.from_pretrained(self.path)
            except Exception as e:  # noqa: BLE001
                raise QuantkitError(f"transformers could not load the tokenizer ({type(e).__name__})", self.path) from None
        return self._tok

    def bos_id(self) -> int | None:
        return self._tokenizer().bos_token_id

    def add_bos(self) -> bool:
        tok = self._tokenizer()
        ids = tok("a", add_special_tokens=True)["input_ids"]
        return tok.bos_token_id is not None and bool(ids) and ids[0] == tok.bos_token_id

    def tokenize(self, text: str) -> list[int]:
        """Text -> ids without BOS (the caller places BOS per the perplexity protocol)."""
        return list(self._tokenizer()(text, add_special_tokens=False)["input_ids"])

    # ---- scoring ------------------------------------------------------------------------
    def scored_logits(self, tokens: list[int], first: int) -> np.ndarray:
        """Logits [len(tokens) - 1 - first, n_vocab] float32 at positions first .. len - 2 (each
        predicts the next token). Only those rows go through the output head (logits_to_keep)."""
        import torch
        ids = torch.tensor([tokens], dtype=torch.long)
        with torch.inference_mode():
            out = self.model(input_ids=ids, logits_to_keep=len(tokens) - first, use_cache=False)
        return out.logits[0, :-1].float().numpy()

    # ---- speed ---------------------------------------------------------------------------
    def timed_prompt(self, tokens: list[int]) -> float:
        import torch
        ids = torch.tensor([tokens], dtype=torch.long)
        t0 = time.perf_counter()
        with torch.inference_mode():
            self.model(input_ids=ids, logits_to_keep=1, use_cache=False)
        return time.perf_counter() - t0

    def timed_generate(self, tokens: list[int], n_gen: int) -> float:
        """Greedy decoding of n_gen tokens after `tokens`, with the KV cache; seconds for the
        n_gen single-token steps (the prompt pass excluded)."""
        import torch
        ids = torch.tensor([tokens], dtype=torch.long)
        with torch.inference_mode():
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            t0 = time.perf_counter()
            for _ in range(n_gen):
                out = self.model(input_ids=nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        return time.perf_counter() - t0

    def close(self) -> None:
        self.model = None
