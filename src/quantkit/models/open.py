"""Open any model quantkit reads: a GGUF file, a Hugging Face directory, or the bundled default."""

from __future__ import annotations

import os

from ..util.errors import QuantkitError
from .source import ModelSource


def open_model(path: str | os.PathLike | None = None) -> ModelSource:
    """None -> the bundled Gemma-3-270M; a .gguf file; a Hugging Face model directory."""
    if path is None:
        from .bundled import bundled_path
        path = bundled_path()
    p = os.fspath(path)
    if not os.path.exists(p):
        raise QuantkitError("no such file or directory", p, "give a .gguf file or a Hugging Face model directory")
    if os.path.isdir(p):
        if not os.path.exists(os.path.join(p, "config.json")):
            raise QuantkitError("directory has no config.json", p,
                                "expected a Hugging Face model directory (config.json + *.safetensors)")
        from .hf import HFSource
        return HFSource(p)
    if not os.path.isfile(p):              # a FIFO or a device would block the read or never end
        raise QuantkitError("not a regular file", p, "give a .gguf file or a Hugging Face model directory")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        from .gguf import GGUFSource
        return GGUFSource(p)
    if p.endswith(".safetensors"):
        raise QuantkitError("a lone .safetensors file has no config", p,
                            "point to the model directory that holds config.json")
    raise QuantkitError("not a model quantkit can read (neither GGUF nor a Hugging Face directory)", p)
