"""The engines that run a model: llama.cpp (runtimes.llama_cpp) and torch/transformers
(runtimes.torch), each behind the `Runtime` protocol that eval, quant and the demo use.

A model argument ("spec") is a path, or "torch:FILE.gguf" to run a GGUF in transformers
(weights dequantized to float32): a .gguf runs in llama.cpp, a directory in transformers.
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

import numpy as np

from ..util.errors import QuantkitError

TORCH_PREFIX = "torch:"


@runtime_checkable
class Runtime(Protocol):
    """A loaded causal LM: its tokenizer, logits of chosen rows, timed prompt and generation."""
    kind: str            # "llama.cpp" | "torch"
    path: str
    n_vocab: int
    n_threads: int
    load_s: float

    def bos_id(self) -> int | None: ...

    def add_bos(self) -> bool: ...

    def tokenize(self, text: str) -> list[int]:
        """Text -> ids without BOS (the caller places BOS)."""
        ...

    def scored_logits(self, tokens: list[int], first: int) -> np.ndarray:
        """Logits [len(tokens) - 1 - first, n_vocab] float32 at positions first .. len - 2."""
        ...

    def timed_prompt(self, tokens: list[int]) -> float:
        """Seconds of one forward pass over `tokens` from an empty cache."""
        ...

    def timed_generate(self, tokens: list[int], n_gen: int) -> float:
        """Seconds of n_gen greedy single-token steps after `tokens` (the prompt pass excluded)."""
        ...

    def close(self) -> None: ...


def split_spec(spec: str) -> tuple[str, bool]:
    """A model argument -> (path, forced to torch)."""
    return (spec[len(TORCH_PREFIX):], True) if spec.startswith(TORCH_PREFIX) else (spec, False)


def normalize_spec(spec) -> str:
    path, forced = split_spec(os.fspath(spec))
    return (TORCH_PREFIX if forced else "") + os.path.abspath(path)


def runtime_kind(spec: str) -> str:
    """"llama.cpp" for a GGUF file, "torch" for a directory or a "torch:" spec."""
    path, forced = split_spec(spec)
    if os.path.isdir(path) or (forced and os.path.isfile(path)):
        return "torch"
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise QuantkitError(f"cannot read: {e.strerror}", path) from None
    if magic == b"GGUF":
        return "llama.cpp"
    raise QuantkitError("not a model quantkit can evaluate (neither GGUF nor a Hugging Face directory)", path)


def open_runtime(spec: str, n_ctx: int, n_threads: int | None, vocab_only: bool = False) -> Runtime:
    """The runtime for SPEC (see runtime_kind). vocab_only: a GGUF's tokenizer alone, read by
    llama.cpp whichever runtime scores the file."""
    path = split_spec(spec)[0]
    if runtime_kind(spec) == "torch" and not (vocab_only and os.path.isfile(path)):
        from .torch import TorchCausalLM
        return TorchCausalLM(path, n_threads=n_threads, from_gguf=os.path.isfile(path))
    from .llama_cpp import LlamaCppScorer
    return LlamaCppScorer(path, n_ctx=n_ctx, n_threads=n_threads, vocab_only=vocab_only)


def runtime_version(kind: str) -> str:
    if kind == "torch":
        import torch
        import transformers
        return f"torch {torch.__version__}, transformers {transformers.__version__}"
    import llama_cpp
    return f"llama-cpp-python {llama_cpp.__version__}"
