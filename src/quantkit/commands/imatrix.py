"""quantkit imatrix MODEL --calib FILE -o imatrix.gguf."""

from __future__ import annotations

from ..util import validate as v


def register(sub) -> None:
    p = sub.add_parser("imatrix", help="compute an importance matrix (llama-imatrix's statistics) for quantize --imatrix",
                       description="Run the model over calibration text and write, per decoder weight, the sum over "
                                   "tokens of each input column's squared activation and the token count: what "
                                   "llama-imatrix computes, in its GGUF format (or the legacy format for an output "
                                   "name ending in .dat). Use it with quantkit quantize --imatrix or llama-quantize "
                                   "--imatrix; the IQ2/IQ1 types and Q2_K_S need one.")
    p.add_argument("model", nargs="?", type=v.str_arg(),
                   help="a .gguf file or Hugging Face model directory (default: the bundled model)")
    p.add_argument("-o", "--output", required=True, help="the imatrix file to write (.gguf, or .dat for the legacy format)")
    g = p.add_argument_group("calibration")
    from . import options
    options.add_calibration_args(g, ladder=False)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    options.add_trust_pickle_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import api
    from . import options
    calib, nsamples, seqlen = options.calibration_options(args)
    res = api.imatrix(args.model, args.output, calib=calib, nsamples=nsamples, seqlen=seqlen,
                      show_progress=not getattr(args, "quiet", False), trust_pickle=args.trust_pickle)
    if args.json:
        options.print_json({"output": res.output, "seconds": res.seconds, "tokens": res.tokens,
                            "entries": res.entries})
        return 0
    print(f"wrote {res.output}  ({res.entries} weights, {res.tokens:,} tokens, {res.seconds:.1f} s)")
    return 0
