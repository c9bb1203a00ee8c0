"""Writes iq2_grids.npz: the constant tables of llama.cpp's 2-bit lattice types (IQ2_XXS, IQ2_XS,
IQ2_S), read from ggml's C sources as data.

    python make_iq2_tables.py [LLAMA_CPP_DIR]

LLAMA_CPP_DIR defaults to the llama.cpp that llama-cpp-python 0.3.36 vendors. Arrays written:

    kmask_iq2xs   uint8[8]       ggml-common.h
    ksigns_iq2xs  uint8[128]     ggml-common.h: 7 sign bits plus the parity bit
    iq2xxs_grid   uint64[256]    ggml-common.h: 8 magnitudes per entry, one byte each
    iq2xs_grid    uint64[512]    ggml-common.h
    iq2s_grid     uint64[1024]   ggml-common.h
    kgrid_2bit_256/512/1024  uint16[...]  ggml-quants.c (iq2xs_init_impl): the same entries as
                                 2-bit level indices, what the quantizers search

Run once; the output is committed next to this script. The tables are checked against each
other (each decode grid byte is the magnitude of its kgrid level) before anything is written.
"""

from __future__ import annotations

import os
import re
import sys

import numpy as np

DEFAULT = os.path.expanduser("~/.cache/quantkit/llama-tools/src/llama_cpp_python-0.3.36/vendor/llama.cpp")
MAGNITUDES = (0x08, 0x19, 0x2B)      # decode-grid byte of 2-bit level 0, 1, 2 (level 3 never occurs)


def _numbers(body: str) -> list[int]:
    body = re.sub(r"//[^\n]*", "", body)
    return [int(t, 0) for t in re.findall(r"0x[0-9a-fA-F]+|\d+", body)]


def table_macro(src: str, name: str) -> list[int]:
    m = re.search(r"GGML_TABLE_BEGIN\(\s*\w+\s*,\s*" + name + r"\s*,\s*(\w+)\s*\)(.*?)GGML_TABLE_END\(\)", src, re.S)
    if not m:
        raise SystemExit(f"{name} not found")
    return _numbers(m.group(2))


def table_static(src: str, name: str, size: int) -> list[int]:
    m = re.search(r"static const uint16_t " + name + r"\[" + str(size) + r"\]\s*=\s*\{(.*?)\};", src, re.S)
    if not m:
        raise SystemExit(f"{name} not found")
    return _numbers(m.group(1))


def main(root: str) -> None:
    with open(os.path.join(root, "ggml/src/ggml-common.h")) as f:
        common = f.read()
    with open(os.path.join(root, "ggml/src/ggml-quants.c")) as f:
        quants = f.read()
    out = {
        "kmask_iq2xs": np.array(table_macro(common, "kmask_iq2xs"), dtype=np.uint8),
        "ksigns_iq2xs": np.array(table_macro(common, "ksigns_iq2xs"), dtype=np.uint8),
    }
    for grid, size in (("iq2xxs_grid", 256), ("iq2xs_grid", 512), ("iq2s_grid", 1024)):
        out[grid] = np.array(table_macro(common, grid), dtype=np.uint64)
        out[f"kgrid_2bit_{size}"] = np.array(table_static(quants, f"kgrid_2bit_{size}", size), dtype=np.uint16)
        assert out[grid].shape == (size,) and out[f"kgrid_2bit_{size}"].shape == (size,), grid
        levels = (out[f"kgrid_2bit_{size}"][:, None].astype(np.int64) >> (2 * np.arange(8))) & 3
        mags = out[grid].view(np.uint8).reshape(size, 8)        # little-endian: byte j is element j
        assert levels.max() <= 2 and (mags == np.array(MAGNITUDES, dtype=np.uint8)[levels]).all(), grid
    assert out["kmask_iq2xs"].tolist() == [1 << i for i in range(8)]
    s = np.arange(128)
    parity = np.array([bin(v).count("1") & 1 for v in s])
    assert (out["ksigns_iq2xs"] == s | (parity << 7)).all()
    dest = os.path.join(os.path.dirname(os.path.abspath(__file__)), "iq2_grids.npz")
    np.savez_compressed(dest, **out)
    print(dest, {k: v.shape for k, v in out.items()})


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else DEFAULT)
