"""Every tensor type as data.

The block geometry comes from gguf-py's GGML_QUANT_SIZES (the format's own table), so sizes and
bits per weight are derived, never re-typed. `QTYPES` maps a lower-case name ("q4_0") to its
`QType`; `implemented` says whether quantkit has its own encoder for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


@dataclass(frozen=True)
class QType:
    name: str                      # "q4_0", as users and llama.cpp write it (lower case)
    ggml: GGMLQuantizationType
    block_size: int                # weights per block
    type_size: int                 # bytes per block

    @property
    def bits_per_weight(self) -> float:
        return self.type_size * 8 / self.block_size

    def row_bytes(self, n: int) -> int:
        if n % self.block_size:
            raise ValueError(f"{self.name}: row of {n} values is not a multiple of the block size {self.block_size}")
        return n // self.block_size * self.type_size

    def nbytes(self, shape) -> int:
        """Bytes of a tensor of this type; shape in row-major order, last dim contiguous."""
        n_rows = 1
        for s in shape[:-1]:
            n_rows *= int(s)
        return n_rows * self.row_bytes(int(shape[-1]))


QTYPES: dict[str, QType] = {
    t.name.lower(): QType(t.name.lower(), t, *GGML_QUANT_SIZES[t]) for t in GGMLQuantizationType
    if t in GGML_QUANT_SIZES
}
_BY_GGML = {q.ggml: q for q in QTYPES.values()}


def qtype(name_or_ggml) -> QType:
    """Look up a type by name ("Q4_0", "q4_0") or GGMLQuantizationType / int."""
    if isinstance(name_or_ggml, QType):
        return name_or_ggml
    if isinstance(name_or_ggml, str):
        key = name_or_ggml.strip().lower()
        if key not in QTYPES:
            raise KeyError(name_or_ggml)
        return QTYPES[key]
    return _BY_GGML[GGMLQuantizationType(int(name_or_ggml))]
