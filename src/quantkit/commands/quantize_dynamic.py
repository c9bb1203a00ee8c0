"""`quantkit quantize MODEL --format int8 (or --method dynamic-int8) [--quantize-embeddings] -o OUT`.

The `quantize` command dispatches here for the recipe int8: `run(args)` takes its
argparse namespace (model: str | None, None = the bundled all-MiniLM-L6-v2; output: str;
quantize_embeddings: bool; kernel: str, optional, "auto" | "onednn" | "fbgemm" | "reference")
and writes an int8 encoder directory (safetensors + quantkit.json).
"""

from __future__ import annotations

import argparse
import sys

from ..util.errors import QuantkitError


def run(args: argparse.Namespace) -> int:
    from ..api import quantize_dynamic

    model = getattr(args, "model", None)
    output = getattr(args, "output", None)
    if not output:
        raise QuantkitError("no output given", None, "pass -o OUT_DIR")
    summary = quantize_dynamic(model, output, quantize_embeddings=bool(getattr(args, "quantize_embeddings", False)),
                               kernel=getattr(args, "kernel", None) or "auto")
    if getattr(args, "json", False):
        from .options import print_json
        print_json({**summary, "recipe": "int8"})
        return 0
    print(f"wrote {summary['output']}: {summary['modules']} modules int8 "
          f"({summary['linear']} linear, {summary['embedding']} embedding), "
          f"{summary['bytes_before'] / 1e6:.1f} MB -> {summary['bytes_after'] / 1e6:.1f} MB "
          f"(linear weights {summary['linear_bytes_before'] / 1e6:.1f} MB -> {summary['linear_bytes_after'] / 1e6:.1f} MB), "
          f"kernel {summary['kernel']}", file=sys.stdout)
    return 0
