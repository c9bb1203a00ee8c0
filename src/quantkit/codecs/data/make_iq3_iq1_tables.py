"""Write iq3_iq1_grids.npz: the lattice tables of llama.cpp's IQ3_XXS, IQ3_S, IQ1_S and IQ1_M,
read out of ggml's C sources (ggml-common.h, ggml-quants.c) as data. Run once, by hand:

    python src/quantkit/codecs/data/make_iq3_iq1_tables.py [LLAMA_CPP_DIR]

LLAMA_CPP_DIR defaults to the llama.cpp that llama-cpp-python 0.3.36 vendors. The tables:

- iq3xxs_grid uint32[256], iq3s_grid uint32[512], iq1s_grid uint64[2048]: the decoders' grids
  (ggml-common.h), one packed vector of 4 uint8 / 8 int8 values per entry;
- kgrid_iq3xxs uint16[256], kgrid_iq3s uint16[512], kgrid_iq1s uint16[2048]: the encoders'
  grids (iq3xs_init_impl's kgrid_256 / kgrid_512, iq2xs_init_impl's kgrid_1bit_2048): entry k
  holds the level l (0..7, 3 bits each, for IQ3; 0..2, 2 bits each, for IQ1) of element i;
- ksigns_iq2xs uint8[128]: 7 sign bits -> 8 with even parity (the IQ3_XXS sign code);
- iq1s_delta, iq1m_delta float32: IQ1S_DELTA, IQ1M_DELTA.
"""

from __future__ import annotations

import os
import re
import sys

import numpy as np

DEFAULT = ("/root/.cache/quantkit/llama-tools/src/llama_cpp_python-0.3.36/vendor/llama.cpp")
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "iq3_iq1_grids.npz")


def _numbers(body: str) -> list[int]:
    body = re.sub(r"//[^\n]*", "", body)
    return [int(tok, 0) for tok in re.findall(r"0x[0-9a-fA-F]+|\d+", body)]


def table(src: str, name: str, size: int) -> list[int]:
    """The initializer of `GGML_TABLE_BEGIN(type, name, size) ... GGML_TABLE_END()`."""
    m = re.search(r"GGML_TABLE_BEGIN\(\w+,\s*%s,\s*\w+\)(.*?)GGML_TABLE_END\(\)" % re.escape(name), src, re.S)
    if m is None:
        raise SystemExit(f"table {name} not found")
    vals = _numbers(m.group(1))
    if len(vals) != size:
        raise SystemExit(f"table {name}: {len(vals)} values, expected {size}")
    return vals


def static_array(src: str, name: str, size: int) -> list[int]:
    """The initializer of `static const uint16_t name[...] = { ... };` in a function body."""
    m = re.search(r"static const uint16_t %s\[[^\]]*\]\s*=\s*\{(.*?)\};" % re.escape(name), src, re.S)
    if m is None:
        raise SystemExit(f"array {name} not found")
    vals = _numbers(m.group(1))
    if len(vals) != size:
        raise SystemExit(f"array {name}: {len(vals)} values, expected {size}")
    return vals


def define(src: str, name: str) -> float:
    m = re.search(r"#define\s+%s\s+([0-9.]+)f" % re.escape(name), src)
    if m is None:
        raise SystemExit(f"#define {name} not found")
    return float(m.group(1))


def check(kgrid: np.ndarray, grid: np.ndarray, bits: int, nval: int, decode) -> None:
    """The encoder's level grid and the decoder's value grid list the same points, in one order."""
    levels = (kgrid[:, None].astype(np.int64) >> (bits * np.arange(nval))) & ((1 << bits) - 1)
    vals = grid.view(np.uint8 if nval == 4 else np.int8).reshape(-1, nval)
    if not np.array_equal(decode(levels), vals.astype(np.int64)):
        raise SystemExit("encoder and decoder grids disagree")


def main(root: str) -> None:
    with open(os.path.join(root, "ggml/src/ggml-common.h")) as f:
        common = f.read()
    with open(os.path.join(root, "ggml/src/ggml-quants.c")) as f:
        quants = f.read()
    t = dict(
        iq3xxs_grid=np.array(table(common, "iq3xxs_grid", 256), dtype=np.uint32),
        iq3s_grid=np.array(table(common, "iq3s_grid", 512), dtype=np.uint32),
        iq1s_grid=np.array(table(common, "iq1s_grid", 2048), dtype=np.uint64),
        ksigns_iq2xs=np.array(table(common, "ksigns_iq2xs", 128), dtype=np.uint8),
        kgrid_iq3xxs=np.array(static_array(quants, "kgrid_256", 256), dtype=np.uint16),
        kgrid_iq3s=np.array(static_array(quants, "kgrid_512", 512), dtype=np.uint16),
        kgrid_iq1s=np.array(static_array(quants, "kgrid_1bit_2048", 2048), dtype=np.uint16),
        iq1s_delta=np.float32(define(common, "IQ1S_DELTA")),
        iq1m_delta=np.float32(define(common, "IQ1M_DELTA")),
    )
    # IQ3_S decodes level l as 2l+1; IQ3_XXS as 4(2l+1), but 62 (not 60) for l = 7; IQ1 as l-1
    check(t["kgrid_iq3s"], t["iq3s_grid"], 3, 4, lambda l: 2 * l + 1)
    check(t["kgrid_iq3xxs"], t["iq3xxs_grid"], 3, 4, lambda l: np.where(l == 7, 62, 4 * (2 * l + 1)))
    check(t["kgrid_iq1s"], t["iq1s_grid"], 2, 8, lambda l: l - 1)
    np.savez_compressed(OUT, **t)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else DEFAULT)
