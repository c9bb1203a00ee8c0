"""Every GGUF tensor type's block geometry, from gguf-py's GGML_QUANT_SIZES (the format's own
table), torch-free: what the header readers and the planner need (sizes, bits per weight)
without loading a codec. codecs.registry builds each type's codec on top of this."""

from __future__ import annotations

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


class Geometry:
    """A GGUF tensor type's blocks: `block_size` values stored in `type_size` bytes."""

    def __init__(self, ggml: GGMLQuantizationType):
        self.ggml = GGMLQuantizationType(ggml)
        self.name = self.ggml.name.lower()   # "q4_0", as users and llama.cpp write it
        self.block_size, self.type_size = GGML_QUANT_SIZES[self.ggml]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}: {self.block_size} values in {self.type_size} bytes)"

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


GEOMETRIES: dict[str, Geometry] = {t.name.lower(): Geometry(t) for t in GGMLQuantizationType
                                   if t in GGML_QUANT_SIZES}


def type_geometry(name_or_ggml) -> Geometry:
    """Look up a type by name ("Q4_0", "q4_0") or GGMLQuantizationType / int; KeyError if unknown."""
    if isinstance(name_or_ggml, Geometry):
        return name_or_ggml
    if isinstance(name_or_ggml, str):
        key = name_or_ggml.strip().lower()
        if key not in GEOMETRIES:
            raise KeyError(name_or_ggml)
        return GEOMETRIES[key]
    return GEOMETRIES[GGMLQuantizationType(int(name_or_ggml)).name.lower()]
