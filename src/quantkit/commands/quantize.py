"""quantkit quantize MODEL --format gguf:q4_0 -o OUT."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model: GGUF (llama.cpp), GPU checkpoints (GPTQ, "
                                        "compressed-tensors) or an int8 encoder",
                       description="Quantize a model. --format gguf:<type> writes a llama.cpp file: with --method "
                                   "rtn it matches llama-quantize byte for byte (same tensor types, same bytes); "
                                   "with --method gptq the same layout, solved by GPTQ onto the type's own grid. "
                                   "--format gptq | compressed-tensors writes a GPU checkpoint directory "
                                   "(--bits, --group-size, --sym/--asym; RTN or GPTQ). --method dynamic-int8 "
                                   "writes a BERT-family encoder with int8 linear layers.")
    p.add_argument("model", nargs="?", help="a .gguf file or Hugging Face model directory (default: the bundled model)")
    p.add_argument("-o", "--output", help="output file (GGUF) or directory (required, here or in --config)")
    p.add_argument("--config", metavar="FILE",
                   help="YAML or JSON file of these options (keys: model, output, method, format, bits, group_size, "
                        "calib, nsamples, ...; on/off flags as true/false under their option name: act_order, "
                        "sym, scale_search, true_sequential); flags given on the command line win")
    p.add_argument("--format", default="gguf:q4_0",
                   help="gguf:<type> with type f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0, q6_k, q5_k_m, q5_k_s, "
                        "q4_k_m, q4_k_s, q3_k_l, q3_k_m, q3_k_s, q2_k (default gguf:q4_0); or gptq / "
                        "compressed-tensors (GPU checkpoints, with --bits/--group-size)")
    p.add_argument("--method", default="rtn", choices=["rtn", "gptq", "dynamic-int8"],
                   help="rtn: round to nearest (GGUF: exactly as llama.cpp); gptq: GPTQ with calibration "
                        "(GGUF: onto the llama.cpp type's own grid; GPU formats); dynamic-int8: BERT-family encoders")
    p.add_argument("--pure", action="store_true",
                   help="one type for every 2-D weight (llama-quantize --pure); default follows llama.cpp's mix")
    p.add_argument("--token-embedding-type", metavar="TYPE", help="type for token_embd.weight")
    p.add_argument("--output-tensor-type", metavar="TYPE", help="type for output.weight")
    p.add_argument("--quantize-embeddings", action="store_true", help="dynamic-int8: also int8 embeddings")
    p.add_argument("--kernel", choices=("auto", "onednn", "fbgemm", "reference"), default="auto",
                   help="dynamic-int8: int8 GEMM kernel (default auto: fbgemm)")
    from . import quantize_gptq
    quantize_gptq.register_args(p)
    p.set_defaults(func=run, _actions={a.dest: a for a in p._actions if a.dest not in ("help", "config")})


def apply_config(args) -> None:
    """Fill options from --config FILE (a mapping of option names to values), each checked as its
    flag would be; options given on the command line keep their value."""
    import yaml

    from ..util.errors import QuantkitError
    path = args.config
    try:
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
    except FileNotFoundError:
        raise QuantkitError("no such config file", path) from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise QuantkitError(f"config file is not valid YAML/JSON ({type(e).__name__})", path) from None
    if not isinstance(cfg, dict):
        raise QuantkitError("config file must hold a mapping of option: value", path)
    actions = args._actions
    for key, value in cfg.items():
        dest = str(key).replace("-", "_")
        act = actions.get(dest)
        if act is None or dest.startswith("_"):
            raise QuantkitError(f"unknown option '{key}' in config file", path,
                                "keys are the long flags of `quantkit quantize`, e.g. method, format, nsamples")
        if getattr(args, dest) != act.default:
            continue                                  # given on the command line
        if act.nargs == 0:                            # a flag: the option's value, true/false
            if not isinstance(value, bool):         # (act_order: true, sym: false, scale_search: false)
                raise QuantkitError(f"option '{key}' takes true or false, got {value!r}", path)
        else:
            try:
                value = act.type(value) if act.type and value is not None else value
            except (TypeError, ValueError):
                raise QuantkitError(f"option '{key}': {value!r} is not a valid value", path) from None
            if act.choices is not None and value not in act.choices:
                raise QuantkitError(f"option '{key}': {value!r} is not one of "
                                    + ", ".join(map(str, act.choices)), path)
        setattr(args, dest, value)


def run(args) -> int:
    from ..util.errors import QuantkitError
    if args.config:
        apply_config(args)
    if not args.output:
        raise QuantkitError("no output path", hint="give -o OUT (or output: in --config)")
    fmt = args.format.lower()
    if fmt.startswith("gguf:") and (args.bits != 4 or args.group_size != 128 or not args.sym):
        given = [f for f, on in (("--bits", args.bits != 4), ("--group-size", args.group_size != 128),
                                 ("--asym", not args.sym)) if on]
        raise QuantkitError(f"{'/'.join(given)} do not apply to --format {args.format}: a llama.cpp type fixes "
                            "its own bits, blocks and zero points",
                            hint="pick the type instead, e.g. gguf:q4_1 for 4 bits with a minimum; or write "
                                 "--format gptq or compressed-tensors")
    if args.method == "gptq" or fmt in ("gptq", "compressed-tensors"):
        from . import quantize_gptq
        return quantize_gptq.run(args)
    if args.method == "dynamic-int8":
        from . import quantize_dynamic
        return quantize_dynamic.run(args)
    from .. import api
    res = api.quantize(args.model, args.output, format=args.format, method=args.method, pure=args.pure,
                       token_embedding_type=args.token_embedding_type, output_tensor_type=args.output_tensor_type)
    counts: dict[str, int] = {}
    for t in res.types.values():
        counts[t] = counts.get(t, 0) + 1
    print(f"wrote {res.output}  ({res.file_bytes / 1e6:,.1f} MB, {res.seconds:.1f} s; tensors: "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ")")
    return 0
