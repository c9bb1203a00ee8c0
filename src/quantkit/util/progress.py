"""Progress bars on stderr (tqdm), silenced with QUANTKIT_QUIET=1 or when the caller asks."""

from __future__ import annotations

import os
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def quiet() -> bool:
    return os.environ.get("QUANTKIT_QUIET", "") not in ("", "0")


def progress(it: Iterable[T] | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", unit_scale: bool = False, leave: bool = False, disable: bool = False) -> tqdm:
    return tqdm(it, total=total, desc=desc, unit=unit, unit_scale=unit_scale, leave=leave,
                disable=disable or quiet(), dynamic_ncols=True)
