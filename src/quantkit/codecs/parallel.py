"""Run a block codec over many blocks: fixed-size chunks on a few worker threads.

The codecs are chains of small elementwise ops. Split per op over OpenMP threads, each op costs
more in synchronisation than it gains (measured 10-15x slower on 2 busy cores); whole chunks
per thread, with torch's intra-op parallelism off, scale instead (torch releases the GIL inside
ops) and keep every intermediate in cache.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch


class NonFiniteError(ValueError):
    """The input holds NaN or Inf."""


def finite_checked(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """fn, refusing chunks with NaN/Inf (amax/amin propagate NaN and show Inf; no temporaries)."""
    def checked(b: torch.Tensor) -> torch.Tensor:
        if b.numel() and not (torch.isfinite(b.amax()) and torch.isfinite(b.amin())):
            raise NonFiniteError("NaN or Inf in the input")
        return fn(b)
    return checked


def map_blocks(fn: Callable[[torch.Tensor], torch.Tensor], blocks: torch.Tensor, width: int,
               dtype: torch.dtype, chunk: int, threads: int | None = None) -> torch.Tensor:
    """out[i] = fn(blocks[i]) row-block-wise: blocks [n, k] -> [n, width] of `dtype`."""
    n = blocks.shape[0]
    saved = torch.get_num_threads()
    if n <= chunk:                      # one chunk: this thread, also without intra-op threads
        torch.set_num_threads(1)
        try:
            return fn(blocks)
        finally:
            torch.set_num_threads(saved)
    out = torch.empty((n, width), dtype=dtype)

    def work(i: int) -> None:
        out[i:i + chunk] = fn(blocks[i:i + chunk])

    starts = range(0, n, chunk)
    threads = max(1, min(threads or saved, len(starts)))
    try:
        with ThreadPoolExecutor(max_workers=threads, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            for _ in pool.map(work, starts):
                pass
    finally:
        torch.set_num_threads(saved)
    return out
