"""One model representation for every reader and writer.

A `ModelSource` is an architecture spec, tensors under one canonical naming scheme (llama.cpp's
GGUF names: token_embd.weight, blk.{i}.attn_q.weight, output_norm.weight, ...; values already
in llama.cpp's convention, e.g. Gemma norms stored as 1 + w and llama q/k rows permuted for
rotary as convert_hf_to_gguf does), the GGUF key/value metadata that describes the
architecture and tokenizer, and lazy tensor access: `load(name)` materialises one tensor.

Shapes are given in row-major (PyTorch / numpy) order: a linear weight is [out_features,
in_features]; GGUF lists dimensions the other way round, readers and writers convert.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

from gguf import GGUFValueType

if TYPE_CHECKING:  # torch only for annotations: the planner imports this module without torch
    import torch


@dataclass
class ArchSpec:
    arch: str                    # llama.cpp architecture name: "llama", "qwen2", "gemma3", ...
    n_layer: int
    n_embd: int                  # hidden size
    n_head: int
    n_head_kv: int
    head_dim: int                # explicit: Gemma-3's 256 is not n_embd / n_head
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    tied_embeddings: bool        # no output.weight: the head reuses token_embd.weight
    sliding_window: int | None = None
    sliding_window_pattern: list[bool] | None = None   # per layer: True = sliding-window layer
    norm: str = "rms"            # "rms" or "layer"
    rope_theta: float | None = None
    n_expert: int = 0
    n_expert_used: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class TensorInfo:
    name: str                    # canonical (GGUF) name
    shape: tuple[int, ...]       # row-major; last dimension contiguous
    type: str                    # storage type, lower case: "f32", "bf16", "q4_k", ...
    nbytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def layer(self) -> int | None:
        """Block index from the name (GGUF blk.N., HF layers.N. / h.N.), None outside blocks."""
        m = re.match(r"blk\.(\d+)\.", self.name) or re.search(r"\blayers?\.(\d+)\.", self.name) \
            or re.search(r"\.h\.(\d+)\.", self.name)
        return int(m.group(1)) if m else None


@dataclass(frozen=True)
class MetaValue:
    """One GGUF key/value: the value and its GGUF type (sub_type for arrays)."""
    value: Any
    vtype: GGUFValueType
    sub_type: GGUFValueType | None = None


@dataclass
class Tokenizer:
    """What a tokenizer is, in GGUF terms (tokenizer.ggml.*); the tokens live in `metadata`."""
    model: str                   # "llama" (SentencePiece), "gpt2" (byte-level BPE), "gemma4", ...
    pre: str | None = None
    n_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class ModelSource(ABC):
    path: str
    spec: ArchSpec
    metadata: dict[str, MetaValue]   # every GGUF key to carry into a written file (not general.file_type)
    tokenizer: Tokenizer

    @abstractmethod
    def tensors(self) -> list[TensorInfo]:
        """All tensors, in the order a GGUF writer should emit them."""

    @abstractmethod
    def load(self, name: str) -> torch.Tensor:
        """The tensor as float32, materialised now (dequantized if stored quantized)."""

    def raw(self, name: str) -> tuple[Any, str] | None:
        """(bytes as a uint8 numpy array, type name) when the stored bytes can be copied as they
        are into a GGUF (same canonical layout); None when they must be converted."""
        return None

    def release(self, name: str) -> None:  # noqa: B027 - optional hook
        """The caller is done with this tensor: a reader may drop cached or mapped pages."""

    def tensor_info(self, name: str) -> TensorInfo:
        for t in self.tensors():
            if t.name == name:
                return t
        raise KeyError(name)

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors())

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
