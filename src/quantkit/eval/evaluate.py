"""`quantkit eval`: quality, size, speed and memory of a set of models against one reference.

Language models (GGUF files in llama.cpp, Hugging Face directories in transformers) are scored by
llama.cpp's perplexity protocol and the KL divergence to the reference: eval.lm. Encoder
classifiers (BERT-family directories with a classification head) are scored by task accuracy
instead, in the same result shape: eval.classify. Speed and memory come from a fresh process
per model (eval.speed); the rows are typed (eval.results); a ladder of quantized rungs is built
by eval.ladder. The same evaluation as Ray tasks is eval.ray_eval; a grid of models x recipes x
texts, eval.sweep.
"""

from __future__ import annotations

import os
import time

from ..runtimes import normalize_spec, split_spec
from ..util.errors import QuantkitError
from . import cache as eval_cache
from .classify import evaluate_classifiers, is_encoder_dir
from .lm import evaluate_lm
from .options import EvalOptions
from .results import EvalResult


def evaluate(models: list[str | None], options: EvalOptions | None = None) -> EvalResult:
    """Score MODELS against one reference on the same token ids (None: the bundled model)."""
    o = options or EvalOptions()
    t_start = time.perf_counter()
    from ..models.bundled import bundled_path
    paths = [normalize_spec(m) if m is not None else bundled_path() for m in (models or [None])]
    for p in paths:
        if not os.path.exists(split_spec(p)[0]):
            raise QuantkitError("no such file or directory", p, "give a .gguf file or a Hugging Face model directory")
    n_threads = o.n_threads or max(1, os.cpu_count() or 1)
    cache_limit = eval_cache.max_bytes(o.cache_max)   # a bad size fails before the long run

    ref_spec = normalize_spec(o.ref) if o.ref is not None else None
    encoders = [is_encoder_dir(split_spec(p)[0]) for p in paths + ([ref_spec] if ref_spec else [])]
    if any(encoders):
        if not all(encoders):
            odd = next(p for p, e in zip(paths + [ref_spec], encoders) if not e)
            raise QuantkitError("cannot score encoder classifiers and language models in one run", odd,
                                "evaluate classifiers (task accuracy) and language models (perplexity) separately")
        return evaluate_classifiers([split_spec(p)[0] for p in paths], ref_spec and split_spec(ref_spec)[0], o,
                                    n_threads)
    return evaluate_lm(paths, o, n_threads, cache_limit, t_start)


__all__ = ["EvalOptions", "EvalResult", "evaluate"]
