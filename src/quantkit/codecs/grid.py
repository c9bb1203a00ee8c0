"""What GPTQ needs from a quantization grid, whatever the format.

GPTQ (quant.gptq) visits a weight's columns one at a time. When it reaches the first column of
a group (a legacy block of 32, a K-quant super-block of 256, an integer group), it asks the
grid for that group's parameters from the partially updated weights (`params`, a frozen
dataclass per grid), rounds every column of the group onto them (`round`), and finally asks the
grid for the stored form of all groups and codes (`stored`, then `join` across row chunks).
Each GGUF type registers its grid in codecs.registry; the integer grid of GPTQ checkpoints is
quant.rtn.IntGrid.

Lattice grids (IQ2_*, IQ3_*: a codebook entry per group of 4 or 8 weights) are `GroupGrid`s:
they have `group_width` and round that many consecutive columns at once (`round_group`), from
the columns' values updated by every column solved before the group; GPTQ then spreads their
errors one column at a time, as for any other grid. Such a grid needs natural column order.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

import torch

P = TypeVar("P")


class StoredWeight(Protocol):
    """A quantized weight in its stored form."""

    def dequantize(self) -> torch.Tensor: ...

    def split_rows(self, rows: list[int]) -> list[Any]: ...


class Grid(Protocol[P]):
    width: int                          # columns per group (block)
    codes_dtype: torch.dtype | None     # dtype of the [out, in] code matrix `join` receives (None: none kept)

    def params(self, w: torch.Tensor, imp: torch.Tensor | None = None) -> P:
        """The group's parameters from w [rows, width]; imp [width]: each column's importance
        (used by a scale search, where the grid has one)."""

    def round(self, w: torch.Tensor, p: P, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Column j (within its group) of rows w [rows] -> (codes, values), both float32 [rows]."""

    def stored(self, params: list[P], codes: torch.Tensor) -> StoredWeight:
        """The stored form of a chunk of rows: one P per group, codes int32 [rows, in]."""

    def join(self, pieces: list[StoredWeight], codes: torch.Tensor | None,
             shape: tuple[int, int]) -> StoredWeight:
        """Row chunks' stored forms as one; codes: the whole code matrix (of codes_dtype)."""


class GroupGrid(Grid[P], Protocol[P]):
    group_width: int                    # consecutive columns that take one choice together

    def round_group(self, w: torch.Tensor, p: P, j0: int, hinv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Columns j0..j0+group_width-1 (within their group of `width`) of rows w [rows, group_width]
        -> (codes, values), float32 [rows, group_width]; hinv: those columns' [k, k] block of the
        inverse Hessian's upper Cholesky factor (the weighting of their joint error)."""
