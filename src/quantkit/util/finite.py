"""The one check and the one message for NaN/Inf weights, on every quantize path.

A NaN or Inf weight is a damaged model: quantizing it would write garbage (or, for int8, quietly
zero it), so every quantizer refuses it with the same line, naming the tensor and the file.
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
