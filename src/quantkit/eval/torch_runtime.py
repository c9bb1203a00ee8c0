"""The torch runtime for `quantkit eval`: a Hugging Face directory through transformers, on CPU.

The plain reference path (DESIGN.md: "the plain torch path is the default and the reference"):
AutoModelForCausalLM in float32, whatever dtype the checkpoint stores, so a BF16 checkpoint is
evaluated at its exact F32 dequantization.
"""

from __future__ import annotations

import os
import time

import numpy as np

from ..util.errors import QuantkitError


class TorchCausalLM:
    kind = "torch"

    def __init__(self, path: str, n_threads: int | None = None):
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
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
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
