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


def model_from_gguf(path: str, load: bool = True):
    """A transformers model (float32) holding a GGUF's weights, dequantized, for every
    architecture models.gguf_hf rebuilds (its config and tensors: the GGUF -> Hugging Face
    export's). load=False: (model, arch) with parameters allocated but not filled, for callers
    that load parts of it themselves (quant.streaming, block by block, through
    models.gguf_hf.hf_tensor_reader)."""
    import torch

    from ..models.gguf import GGUFSource
    from ..models.gguf_hf import empty_model, gguf_model_config, hf_tensor_reader

    with GGUFSource(path) as src:
        arch, cfg = gguf_model_config(src)
        model = empty_model(cfg)
        if not load:
            return model, arch
        read = hf_tensor_reader(src, arch, copy=False, fused=True)
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        missing = []
        with torch.no_grad():
            for name, p in model.state_dict().items():
                t = read(name)
                if t is None:
                    if not (tied and name == "lm_head.weight"):
                        missing.append(name)
                    continue
                p.copy_(t)              # one tensor at a time: a view of the file's map is read once
                del t
        if missing:
            raise QuantkitError(f"GGUF -> torch: no tensor for {missing[0]}"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""), path)
        if tied:
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
