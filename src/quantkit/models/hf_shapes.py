"""The tensor shapes a config.json implies, from transformers' own model classes.

The model is built on PyTorch's meta device (no memory, no weights), so every parameter's shape
is the one transformers would load into; a checkpoint whose tensors disagree with its config
is refused naming the tensor, the shape the config implies and the shape found.
"""

from __future__ import annotations

import os
import warnings

from ..util.errors import QuantkitError


def expected_shapes(path: str) -> dict[str, tuple[int, ...]] | None:
    """HF parameter name -> shape for the model config.json in `path` describes; None where
    transformers cannot build it (the loaders' own checks then apply)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = AutoConfig.from_pretrained(path)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
    except Exception:     # a config transformers does not know or cannot build: not checked here
        return None
    finally:
        hf_logging.set_verbosity(verbosity)
    return {n: tuple(p.shape) for n, p in model.state_dict().items()}


def check_shapes(path: str, found: dict[str, tuple[int, ...]], to_gguf) -> None:
    """`found`: HF name -> shape in the checkpoint; `to_gguf(hf_name)`: its GGUF name (None:
    unused, KeyError: unknown). Tensors are matched by GGUF name, so a checkpoint written with
    another nesting (a multimodal wrapper's language_model prefix) is compared all the same."""
    want = expected_shapes(path)
    if want is None:
        return
    by_gguf: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, shape in want.items():
        try:
            g = to_gguf(name)
        except KeyError:
            continue
        if g is not None:
            by_gguf[g] = (name, shape)
    for name, shape in found.items():
        try:
            g = to_gguf(name)
        except KeyError:
            continue
        if g is None or g not in by_gguf:
            continue
        exp = by_gguf[g][1]
        if tuple(shape) != exp:
            raise QuantkitError(
                f"tensor {name} has shape {list(shape)} but config.json implies {list(exp)}",
                os.path.join(path, "config.json"), "the config does not match the weights")
