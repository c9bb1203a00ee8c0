"""`quantkit quantize MODEL --format gptq:w4g128+gptq | compressed-tensors:... [--act-order]
[--calib FILE --nsamples N --seqlen L] -o OUT_DIR`, and `quantkit quantize MODEL --format
gguf:<type>+gptq [--calib ...] -o OUT.gguf` (GPTQ-compensated GGUF).

The `quantize` command calls `register_args(parser)` to add these flags and dispatches here
(`run(args)`) when the recipe is a GPU format or its method is gptq.
"""

from __future__ import annotations

import argparse

from .. import recipe as rc
from ..util import validate as v
from ..util.errors import QuantkitError
from . import options


def register_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("integer grids and GPTQ (--format gptq | compressed-tensors, --method rtn | gptq)")
    g.add_argument("--bits", type=v.int_arg(), default=None, choices=[2, 3, 4, 5, 6, 8],
                   help=f"bits per weight (gptq format: 2, 3, 4, 8; default {rc.DEFAULT_BITS}); the SPEC's wBITS")
    g.add_argument("--group-size", type=v.int_arg(), default=None, choices=list(rc.GROUP_SIZES),
                   help=f"input columns per scale; -1: one scale per output channel (default {rc.DEFAULT_GROUP_SIZE}); "
                        "the SPEC's gGROUP")
    sym = g.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_const", const=True, default=None,
                     help="symmetric grid (default)")
    sym.add_argument("--asym", dest="sym", action="store_const", const=False,
                     help="asymmetric grid with a zero point per group (the SPEC's -asym)")
    options.add_calibration_args(g, ladder=False)
    options.add_gptq_args(g)
    g.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="GPTQ: split the calibration over Ray workers, on the cluster at ADDRESS (HOST:PORT of its "
                        "head) or, with no address, on a local Ray runtime (needs quantkit[ray])")
    g.add_argument("--workers", type=v.int_arg(1, options.MAX_COUNT), default=None, metavar="N",
                   help="with --ray: how many workers share the calibration (default 2)")
    g.add_argument("--save-imatrix", metavar="FILE", type=v.str_arg(), default=None,
                   help="gguf:TYPE with --method gptq: also write the importance matrix of the inputs GPTQ "
                        "calibrated on (llama.cpp's GGUF imatrix, legacy format for a .dat name), for "
                        "llama-quantize --imatrix or quantize --imatrix. Block 0's q/k/v inputs (all of block 0's "
                        "with --no-true-sequential) equal `quantkit imatrix` on the same tokens; every later "
                        "input follows the already-quantized linears before it, as GPTQ sees it, so it is not "
                        "llama-imatrix's float-model matrix")
    g.add_argument("--threads", type=options.threads_arg(), default=None,
                   help="CPU threads for GPTQ's passes and products (default: all cores; on a machine busy with "
                        "other work, 1 thread wastes less time waiting than 2)")


def ray_args(args: argparse.Namespace) -> dict:
    """api keywords for --ray [ADDRESS] and --workers. `--ray MODEL` (the model right after a
    bare --ray) is read as the model."""
    ray = getattr(args, "ray", None)
    if ray and args.model is None and ":" not in ray:
        import os
        if os.path.exists(ray):
            args.model, ray = ray, ""
    return {"ray": None if ray is None else (ray or True), "workers": getattr(args, "workers", None)}


def run(args: argparse.Namespace, recipe: rc.Recipe | None = None) -> int:
    from .. import api
    r = recipe or options.recipe_from_args(args)
    ray = ray_args(args)
    if getattr(args, "threads", None) is not None:
        import torch
        torch.set_num_threads(args.threads)
    cal = r.calibration
    if r.format == "gguf" and r.method == "gptq":
        res = api.quantize(args.model, args.output, recipe=r, pure=args.pure,
                           token_embedding_type=args.token_embedding_type, output_tensor_type=args.output_tensor_type,
                           trust_pickle=getattr(args, "trust_pickle", False), mmproj=getattr(args, "mmproj", None),
                           mmproj_type=getattr(args, "mmproj_type", "f16"), text_only=getattr(args, "text_only", False),
                           save_imatrix=getattr(args, "save_imatrix", None), **ray)
        summary = {"output": res.output, "recipe": r.spelling(), "method": r.method, "seconds": res.seconds,
                   "file_bytes": res.file_bytes, "calibration": {"file": cal.file, "nsamples": cal.nsamples,
                                                                  "seqlen": cal.seqlen},
                   **({"mmproj": res.mmproj} if res.mmproj else {})}
        text = (f"wrote {res.output}  ({res.file_bytes / 1e6:,.1f} MB, {res.seconds:.1f} s; GPTQ onto llama.cpp's "
                f"{r.type} grids, calibrated on {cal.nsamples} x {cal.seqlen} tokens)")
        if getattr(args, "save_imatrix", None):
            summary["imatrix"] = args.save_imatrix
            text += f"\nwrote {args.save_imatrix}  (importance matrix of the inputs GPTQ calibrated on)"
        if res.mmproj:
            text += f"\nwrote {res.mmproj}  (vision tower + projector for llama.cpp's multimodal runtime)"
        if res.report and res.report.get("experts"):          # a mixture of experts: one line per layer
            from ..quant.moe import summary_lines
            summary["experts"] = res.report["experts"]
            text += "".join("\n" + line for line in summary_lines(res.report["experts"]))
    elif r.format in rc.GPU_FORMATS:
        res = api.quantize_gpu(args.model, args.output, recipe=r, trust_pickle=getattr(args, "trust_pickle", False),
                               **ray)
        summary = {"output": res.output, "recipe": r.spelling(), "method": r.method, "seconds": res.seconds,
                   "file_bytes": res.file_bytes, "n_linear": res.n_linear}
        text = (f"wrote {res.output}  ({res.file_bytes / 1e6:,.1f} MB, {res.seconds:.1f} s; {res.n_linear} linear "
                f"layers {r.method} {r.bits}-bit g{r.group_size} {'sym' if r.sym else 'asym'}"
                f"{' act-order' if r.gptq.act_order else ''}, format {r.format})")
        if res.report.experts:                                # a mixture of experts: one line per layer
            from ..quant.moe import summary_lines
            summary["experts"] = res.report.experts
            text += "".join("\n" + line for line in summary_lines(res.report.experts))
    else:
        raise QuantkitError(f"--method {r.method} with --format {r.spelling()} is not available here",
                            hint="GPTQ writes --format gguf:<type>+gptq, gptq:SPEC or compressed-tensors:SPEC")
    if getattr(args, "json", False):
        options.print_json(summary)
    else:
        print(text)
    return 0
