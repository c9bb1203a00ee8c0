"""`quantkit quantize MODEL --target-bpw B | --target-size SIZE | --fit DEVICE [--ctx N] [--kv-type T]
[--method gptq] [--eval] -o OUT.gguf` (or --format gguf:bpw4.5+gptq, gguf:size=300MB): a GGUF
whose tensor types are chosen under the budget (quantkit.api.quantize_budget), with a model card
beside it."""

from __future__ import annotations

import argparse
import shlex
import sys


def budget_of(args: argparse.Namespace):
    """(Budget, method or None) when the flags or --format name a budget, else None."""
    from ..quant.budget import budget_from_flags, resolve_budget, split_budget_rung
    b = budget_from_flags(args.target_bpw, args.target_size, args.fit, args.ctx, args.kv_type,
                          getattr(args, "runtime", None))
    fmt = args.format if args.format is not None and split_budget_rung(args.format) is not None else None
    if b is None and fmt is None:
        if args.eval or getattr(args, "types", None):
            from ..util.errors import QuantkitError
            raise QuantkitError(f"{'--eval' if args.eval else '--types'} goes with a budget",
                                hint="add --target-size, --target-bpw or --fit")
        return None
    if fmt is not None and getattr(args, "runtime", None) is not None and (b is None or b.kind != "fit"):
        from ..util.errors import QuantkitError
        raise QuantkitError("--runtime names the front end --fit DEVICE leaves room for", hint="use --fit DEVICE")
    if b is not None and args.format is not None and fmt is None:
        return resolve_budget(b, args.format, args.method)      # one line: a mix and a budget
    return resolve_budget(b, fmt, args.method)


def run_budget(args: argparse.Namespace, budget_method) -> int:
    from .. import api
    from . import options
    from .quantize_gptq import ray_args
    budget, method = budget_method
    args.format, args.method = None, method
    r = options.recipe_from_args(args)
    if getattr(args, "threads", None) is not None:
        import torch
        torch.set_num_threads(args.threads)
    # the command line as typed, when this process is the quantkit CLI; else the card spells it
    command = " ".join(shlex.quote(a) for a in ["quantkit", *sys.argv[1:]]) if "quantize" in sys.argv[1:] else None
    types = [t.strip().lower() for t in args.types.split(",") if t.strip()] if getattr(args, "types", None) else None
    res = api.quantize_budget(args.model, args.output, budget, recipe=r, evaluate=args.eval, command=command, types=types,
                              trust_pickle=getattr(args, "trust_pickle", False), **ray_args(args))
    counts: dict[str, int] = {}
    for t in res.types.values():
        counts[t] = counts.get(t, 0) + 1
    if getattr(args, "json", False):
        options.print_json({"output": res.output, "budget": res.format, "method": res.method, "seconds": res.seconds,
                            "file_bytes": res.file_bytes, "tensor_types": counts})
        return 0
    print(f"wrote {res.output}  ({res.file_bytes / 1e6:,.1f} MB, {res.seconds:.1f} s; {res.method.upper()}, types per "
          "tensor under " + res.format.removeprefix("gguf:") + ": " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
          + "; model card beside it)")
    return 0
