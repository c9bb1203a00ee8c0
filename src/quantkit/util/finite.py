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


# elements counted at a time: torch sums a bool tensor through an int64 copy, so counting a
# whole tensor at once costs 9 bytes per element (3.5 GB for one 3-D expert tensor of a 30B MoE)
_CHUNK = 1 << 22


def count_nonfinite(t) -> int:
    """NaN and Inf entries of a torch tensor or numpy array (0 for integer types), counted a
    chunk at a time (temporaries of a few MB, whatever the tensor's size)."""
    if hasattr(t, "is_floating_point"):                     # torch
        if not t.is_floating_point():
            return 0
        return sum(int((~c.isfinite()).sum()) for c in t.reshape(-1).split(_CHUNK))
    import numpy as np
    a = np.asarray(t)
    if not np.issubdtype(a.dtype, np.floating):
        return 0
    flat = a.reshape(-1)
    return sum(int((~np.isfinite(flat[k:k + _CHUNK])).sum()) for k in range(0, flat.size, _CHUNK))


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
