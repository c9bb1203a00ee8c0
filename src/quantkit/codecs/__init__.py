"""Pure tensor numerics, no other quantkit import: every GGUF type registered once (registry.py)
with its codec family (floats, legacy, kquants), the GPTQ grid protocol (grid.py), shared bit
helpers (bits.py) and GPTQ-style int32 packing (intpack.py)."""
