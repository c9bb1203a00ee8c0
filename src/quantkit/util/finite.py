"""The one check and the one message for NaN/Inf weights, on every quantize path.

A NaN or Inf weight is a damaged model: quantizing it would write garbage (or, for int8, quietly
zero it), so every quantizer refuses it with the same line, naming the tensor and the file. A
model whose logits hold NaN or Inf would be scored `nan` (or, as a classifier, its argmax
would be label 0): eval refuses it in one line too (`check_logits`).
"""

from __future__ import annotations

import os

from .errors import QuantkitError

HINT = "the model's weights are damaged; re-download or re-export them (nothing was written)"


def nonfinite_error(name: str, n_bad: int, path: str | os.PathLike | None = None) -> QuantkitError:
    return QuantkitError(f"tensor {name} has {n_bad} NaN/Inf values", path, HINT)


def count_nonfinite(t) -> int:
    """NaN and Inf entries of a torch tensor or numpy array (0 for integer types)."""
    if hasattr(t, "is_floating_point"):                     # torch
        return int((~t.isfinite()).sum()) if t.is_floating_point() else 0
    import numpy as np
    a = np.asarray(t)
    return int((~np.isfinite(a)).sum()) if np.issubdtype(a.dtype, np.floating) else 0


def check_finite(t, name: str, path: str | os.PathLike | None = None) -> None:
    """Raise nonfinite_error if `t` holds a NaN or an Inf."""
    n = count_nonfinite(t)
    if n:
        raise nonfinite_error(name, n, path)


def check_logits(logits, model: str, where: str) -> None:
    """Refuse a model whose logits (a numpy array) hold NaN or Inf; `where` says which batch or
    chunk. One float32 sum finds them; an overflowing sum of finite logits is told apart by the count."""
    import numpy as np
    if np.isfinite(logits.sum()):
        return
    n = count_nonfinite(logits)
    if n:
        raise QuantkitError(f"the model's logits hold {n} NaN/Inf values ({where}); it cannot be scored", model,
                            "its weights are damaged or overflow: re-download or re-export the model")
