"""`quantkit quantize MODEL --method rtn|gptq --format gptq|compressed-tensors --bits 4
--group-size 128 [--act-order] [--sym|--asym] [--calib FILE --nsamples N --seqlen L] -o OUT_DIR`,
and `quantkit quantize MODEL --method gptq --format gguf:<type> [--calib ...] -o OUT.gguf`
(GPTQ-compensated GGUF).

The lead's `quantize` command calls `register_args(parser)` to add these flags and dispatches
here (`run(args)`) when the format is a GPU format or the method is gptq.
"""

from __future__ import annotations

import argparse

from ..util.errors import QuantkitError

GPU_FORMATS = ("gptq", "compressed-tensors")


def register_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("integer quantization (--format gptq | compressed-tensors, --method rtn | gptq)")
    g.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 5, 6, 8],
                   help="bits per weight (gptq format: 2, 3, 4, 8; default 4)")
    g.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128, 1024, -1],
                   help="input columns per scale; -1: one scale per output channel (default 128)")
    g.add_argument("--act-order", action="store_true",
                   help="GPTQ: visit columns by decreasing activation energy (static groups: no g_idx reordering)")
    sym = g.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True, help="symmetric grid (default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid with a zero point per group")
    g.add_argument("--calib", metavar="FILE", help="GPTQ calibration text, any UTF-8 file (default: wikitext-2 valid)")
    g.add_argument("--nsamples", type=int, default=128, help="GPTQ calibration samples (default 128)")
    g.add_argument("--seqlen", type=int, default=512, help="tokens per calibration sample (default 512)")
    g.add_argument("--damp", type=float, default=0.01,
                   help="GPTQ dampening, fraction of the mean Hessian diagonal (default 0.01; raised automatically if needed)")
    g.add_argument("--shrink", type=float, default=None,
                   help="GPTQ: shrink the Hessian toward its diagonal by this fraction (0: plain GPTQ; 1: "
                        "importance-weighted rounding without cross-column compensation; default 0.1 for "
                        "gguf:* formats, where it measured lower error in and out of domain, 0 for gptq / "
                        "compressed-tensors, where it did not help at 3 bits)")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for GPTQ's passes and products (default: all cores; on a machine busy with "
                        "other work, 1 thread wastes less time waiting than 2)")
    g.add_argument("--no-scale-search", dest="scale_search", action="store_false",
                   help="GPTQ: keep the max-based scales (llama.cpp's rule for gguf:* blocks, the group's "
                        "min/max for gptq / compressed-tensors) instead of searching for the scale that "
                        "minimises the importance-weighted block or group error")
    g.add_argument("--no-true-sequential", dest="true_sequential", action="store_false",
                   help="GPTQ: calibrate every linear of a block on the block's float inputs (one pass, faster) "
                        "instead of attention, o, MLP up/gate, down in turn on already-quantized outputs")


def run(args: argparse.Namespace) -> int:
    from .. import api
    fmt = (args.format or "").lower()
    method = getattr(args, "method", "rtn")
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            raise QuantkitError(f"--threads must be at least 1, got {args.threads}")
        import torch
        torch.set_num_threads(args.threads)
    if fmt.startswith("gguf:") and method == "gptq":
        res = api.quantize(args.model, args.output, format=fmt, method="gptq", pure=args.pure,
                           token_embedding_type=args.token_embedding_type, output_tensor_type=args.output_tensor_type,
                           calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, damp=args.damp,
                           act_order=args.act_order, scale_search=args.scale_search,
                           true_sequential=args.true_sequential, shrink=args.shrink)
        print(f"wrote {res.output}  ({res.file_bytes / 1e6:,.1f} MB, {res.seconds:.1f} s; GPTQ onto llama.cpp's "
              f"{fmt[5:]} grids, calibrated on {args.nsamples} x {args.seqlen} tokens)")
        return 0
    if fmt not in GPU_FORMATS:
        raise QuantkitError(f"--method {method} with --format {args.format} is not available",
                            hint="GPTQ writes --format gguf:<type>, gptq or compressed-tensors")
    res = api.quantize_gpu(args.model, args.output, format=fmt, method=method, bits=args.bits,
                           group_size=args.group_size, sym=args.sym, act_order=args.act_order, calib=args.calib,
                           nsamples=args.nsamples, seqlen=args.seqlen, damp=args.damp,
                           shrink=0.0 if args.shrink is None else args.shrink, scale_search=args.scale_search,
                           true_sequential=args.true_sequential)
    print(f"wrote {res.output}  ({res.file_bytes / 1e6:,.1f} MB, {res.seconds:.1f} s; {res.n_linear} linear layers "
          f"{method} {args.bits}-bit g{args.group_size} {'sym' if args.sym else 'asym'}"
          f"{' act-order' if args.act_order else ''}, format {fmt})")
    return 0
