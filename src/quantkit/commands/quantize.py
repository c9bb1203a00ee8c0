"""quantkit quantize MODEL --format gguf:q4_0 -o OUT."""

from __future__ import annotations

from .. import recipe as rc
from ..util import validate as v


def register(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model: GGUF (llama.cpp), GPU checkpoints (GPTQ, "
                                        "compressed-tensors) or an int8 encoder",
                       description="Quantize a model to a recipe: FORMAT[:SPEC][+METHOD]. gguf:<type> writes a "
                                   "llama.cpp file that matches llama-quantize byte for byte (same tensor types, "
                                   "same bytes); gguf:<type>+gptq the same layout, solved by GPTQ onto the type's "
                                   "own grid. gptq:w4g128 | compressed-tensors:w4g128[-asym][+gptq] writes a GPU "
                                   "checkpoint directory (or --format gptq with --bits, --group-size, --sym/--asym, "
                                   "--method). int8 (--method dynamic-int8) writes a BERT-family encoder with int8 "
                                   "linear layers.")
    p.add_argument("model", nargs="?", type=v.str_arg(), help="a .gguf file or Hugging Face model directory (default: the bundled model)")
    p.add_argument("-o", "--output", help="output file (GGUF) or directory (required, here or in --config)")
    p.add_argument("--format", default=None, metavar="RECIPE", type=v.str_arg(rc.MAX_RECIPE_TEXT),
                   help=f"what to make (default {rc.DEFAULT_FORMAT}): gguf:TYPE[+gptq] with TYPE one of "
                        + ", ".join(rc.GGUF_FILE_TYPES) + "; gptq:SPEC or compressed-tensors:SPEC[+gptq] with SPEC "
                        + rc.SPEC_HELP + " (bare gptq / compressed-tensors: w4g128 or --bits/--group-size); int8")
    p.add_argument("--method", default=None, choices=["rtn", "gptq", "dynamic-int8"],
                   help="rtn (default): round to nearest (GGUF: exactly as llama.cpp); gptq: GPTQ with calibration "
                        "(the same as +gptq in --format); dynamic-int8: BERT-family encoders (--format int8)")
    p.add_argument("--pure", action="store_true",
                   help="one type for every 2-D weight (llama-quantize --pure); default follows llama.cpp's mix")
    p.add_argument("--token-embedding-type", metavar="TYPE", type=v.str_arg(rc.MAX_RECIPE_TEXT), help="type for token_embd.weight")
    p.add_argument("--output-tensor-type", metavar="TYPE", type=v.str_arg(rc.MAX_RECIPE_TEXT), help="type for output.weight")
    p.add_argument("--imatrix", metavar="FILE", type=v.str_arg(),
                   help="importance matrix (GGUF or legacy .dat, from `quantkit imatrix` or llama-imatrix) for "
                        "round-to-nearest GGUF: the same bytes as llama-quantize --imatrix; required by iq2_*, "
                        "iq1_*, iq3_xxs tensors and q2_k_s")
    p.add_argument("--quantize-embeddings", action="store_true", help="dynamic-int8: also int8 embeddings")
    p.add_argument("--kernel", choices=("auto", "onednn", "fbgemm", "reference"), default="auto",
                   help="dynamic-int8: int8 GEMM kernel (default auto: fbgemm)")
    p.add_argument("--exact", action="store_true",
                   help="MODEL a quantized checkpoint (GPTQ, AWQ, compressed-tensors): refuse, naming the tensors, "
                        "unless every quantized linear's codes and scales go into the GGUF type as they are")
    p.add_argument("--qat", action="store_true",
                   help="gguf:q4_0 of a float model trained for Q4_0: blocks already on a Q4_0 grid keep the scale "
                        "that reproduces them (the share is reported)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--mmproj", metavar="PATH", type=v.str_arg(),
                   help="vision-language model: where the vision tower + projector file for llama.cpp's "
                        "multimodal runtime goes (default: mmproj-<OUT's name> beside OUT)")
    p.add_argument("--mmproj-type", default="f16", type=str.lower, choices=("f16", "q8_0", "f32"),
                   help="vision-language model: type of the projector file (default f16)")
    p.add_argument("--text-only", action="store_true",
                   help="vision-language model: write the language model alone, no projector file")
    b = p.add_argument_group("a budget: one type per tensor, chosen for the least KL divergence that fits "
                             "(GGUF; RTN, or GPTQ with --method gptq)")
    b.add_argument("--target-bpw", type=v.str_arg(32), metavar="B", help="bits per weight over the whole file, as "
                   "llama.cpp counts them (e.g. 4.5)")
    b.add_argument("--target-size", type=v.str_arg(32), metavar="SIZE", help="the file's size at most, e.g. 2.5GB, 300MB")
    b.add_argument("--fit", type=v.str_arg(64), metavar="DEVICE", help="what the planner leaves for weights on DEVICE "
                   "after the KV cache at --ctx, the compute buffer and the runtime (quantkit plan --list-devices)")
    b.add_argument("--ctx", type=v.int_arg(1, 1 << 24), metavar="N", help="with --fit: the context to leave room for "
                   "(default: the model's trained context)")
    b.add_argument("--kv-type", choices=("f16", "q8_0", "q4_0"), default=None, help="with --fit: the KV cache type")
    b.add_argument("--runtime", choices=("llama-cpp-python", "llama-server"), default=None,
                   help="with --fit: the llama.cpp front end whose memory the planner leaves room for (default "
                        "llama-cpp-python), as `quantkit plan --runtime`")
    b.add_argument("--types", type=v.str_arg(400), metavar="LIST", default=None,
                   help="with a budget: the types the allocation may choose from, comma-separated (default: every "
                        "type quantkit encodes without an importance matrix), e.g. f16,q8_0,q6_k,q5_k,q4_k,q4_0")
    b.add_argument("--eval", action="store_true", help="with a budget: measure the file's KL divergence and "
                   "perplexity (wikitext-2 test) for its model card")
    from . import options, quantize_gptq
    quantize_gptq.register_args(p)
    options.add_config_arg(p, "quantize")
    options.add_trust_pickle_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..util.errors import QuantkitError
    from . import options
    options.apply_config(args)
    if not args.output:
        raise QuantkitError("no output path", hint="give -o OUT (or output: in --config)")
    from .quantize_budget import budget_of, run_budget
    budget = budget_of(args)
    if getattr(args, "save_imatrix", None) and budget is not None:
        raise QuantkitError("--save-imatrix comes from a GPTQ run onto one file type, not a budget", args.save_imatrix,
                            "leave out the budget, or make the imatrix with `quantkit imatrix`")
    if budget is not None:
        if getattr(args, "imatrix", None) or getattr(args, "mmproj", None):
            raise QuantkitError("a budget chooses its own types from its calibration; --imatrix and --mmproj "
                                "are not combined with it", hint="leave out --imatrix / --mmproj, or the budget")
        return run_budget(args, budget)
    r = options.recipe_from_args(args)
    if getattr(args, "imatrix", None) and (r.format != "gguf" or r.method != "rtn"):
        raise QuantkitError("--imatrix weights round-to-nearest GGUF export only", args.imatrix,
                            f"use --format gguf:TYPE without +gptq (got {r.spelling()})")
    if getattr(args, "save_imatrix", None) and (r.format != "gguf" or r.method != "gptq"):
        raise QuantkitError("--save-imatrix collects the inputs of a GGUF GPTQ run", args.save_imatrix,
                            f"use --format gguf:TYPE --method gptq, or `quantkit imatrix` (got {r.spelling()})")
    if r.format == "int8":
        from . import quantize_dynamic
        return quantize_dynamic.run(args)
    from ..models.quantized_source import is_quantized_dir
    if r.format == "hf" or (r.format == "gguf" and args.model and is_quantized_dir(args.model)):
        return _run_convert(args, r)
    if args.exact or (args.qat and r.method != "rtn"):
        raise QuantkitError("--exact converts a quantized checkpoint (GPTQ, AWQ, compressed-tensors)" if args.exact
                            else "--qat keeps Q4_0 blocks by their own scales: it takes no +gptq",
                            args.model, "leave the flag out")
    if r.method == "gptq" or r.format != "gguf":
        from . import quantize_gptq
        return quantize_gptq.run(args, r)
    from .. import api
    from .quantize_gptq import ray_args
    res = api.quantize(args.model, args.output, recipe=r, pure=args.pure,
                       token_embedding_type=args.token_embedding_type, output_tensor_type=args.output_tensor_type,
                       trust_pickle=args.trust_pickle, mmproj=args.mmproj, mmproj_type=args.mmproj_type,
                       text_only=args.text_only, imatrix=args.imatrix, qat=args.qat, exact=args.exact,
                       **ray_args(args))
    if res.report is not None:
        return _print_convert(args, r, res)
    counts: dict[str, int] = {}
    for t in res.types.values():
        counts[t] = counts.get(t, 0) + 1
    if getattr(args, "json", False):
        options.print_json({"output": res.output, "recipe": r.spelling(), "method": r.method,
                            "seconds": res.seconds, "file_bytes": res.file_bytes, "tensor_types": counts,
                            **({"mmproj": res.mmproj} if res.mmproj else {})})
        return 0
    print(f"wrote {res.output}  ({res.file_bytes / 1e6:,.1f} MB, {res.seconds:.1f} s; tensors: "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ")")
    if res.mmproj:
        print(f"wrote {res.mmproj}  (vision tower + projector for llama.cpp's multimodal runtime)")
    return 0


def _run_convert(args, r) -> int:
    """A quantized checkpoint -> GGUF, or a GGUF -> Hugging Face directory."""
    from .. import api
    res = api.quantize(args.model, args.output, recipe=r, pure=args.pure, exact=args.exact, qat=args.qat,
                       token_embedding_type=args.token_embedding_type, output_tensor_type=args.output_tensor_type)
    return _print_convert(args, r, res)


def _print_convert(args, r, res) -> int:
    """The summary: how many tensors took each path, then one row per tensor not written as float."""
    from . import options
    rep = res.report
    if getattr(args, "json", False):
        options.print_json({"recipe": r.spelling(), **rep})
        return 0
    paths = ", ".join(f"{k} {v}" for k, v in sorted(rep.get("paths", {}).items()))
    print(f"wrote {res.output}  ({res.file_bytes / 1e6:,.1f} MB, {res.seconds:.1f} s; {paths})")
    rows = [(n, t) for n, t in rep.get("tensors", {}).items() if t["path"] not in ("float", "copy")]
    if rows:
        w = max(len(n) for n, _ in rows)
        print(f"{'tensor':<{w}}  {'path':<6} {'type':<6} note")
        for n, t in rows:
            print(f"{n:<{w}}  {t['path']:<6} {t['type']:<6} {t.get('note', '')}")
    for k in ("blocks_exact_share", "max_min_error"):
        if rep.get(k):
            print(f"{k.replace('_', ' ')}: {rep[k]:.6g}")
    return 0
