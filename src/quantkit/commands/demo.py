"""quantkit demo: a ladder of the bundled model (Q8_0, Q5_0, Q4_0 RTN, Q4_0 GPTQ, IQ4_XS, Q3_K_M), each run
in llama.cpp and scored against the F32 reference; a table and an HTML report."""

from __future__ import annotations

import time

from ..util import validate as v
from . import options as opts

MAX_TOKENS = 4096            # generated tokens per rung


def register(sub) -> None:
    from ..api import DEMO_LADDER
    p = sub.add_parser("demo", help="quantize the bundled Gemma-3-270M to a ladder of GGUF types, run and score each",
                       description="Quantize the bundled Gemma-3-270M to a ladder of GGUF types (default Q8_0, Q5_0, "
                                   "Q4_0 with llama.cpp's round-to-nearest and with GPTQ, IQ4_XS with an importance matrix, "
                                   "Q3_K_M), run each in "
                                   "llama.cpp on a short prompt, score each against the F32 reference on a short "
                                   "WikiText-2 excerpt shipped with quantkit, and print a table and an HTML "
                                   "report. The first run takes a few minutes on 2 cores (GPTQ and the importance matrix most "
                                   "of it); "
                                   "files are cached, so a rerun takes about a minute.")
    p.add_argument("--out-dir", type=v.str_arg(), help="where the GGUF files and report.html go, written afresh (default: "
                                     "quantkit's cache, re-used between runs; report in ~/.cache/quantkit/demo)")
    p.add_argument("--types", default=None, metavar="RUNGS", type=v.str_arg(),
                   help="comma-separated rungs, recipes of GGUF file types: TYPE (llama.cpp round-to-nearest) "
                        "or TYPE+gptq (default " + ",".join(DEMO_LADDER) + "; IQ types take an importance matrix "
                        "computed from the calibration, or --imatrix; the old TYPE-gptq is still read)")
    p.add_argument("--prompt", default=None, type=v.str_arg(), help="prompt to continue")
    p.add_argument("--max-tokens", type=v.int_arg(1, MAX_TOKENS), default=24,
                   help=f"tokens each rung generates (default 24, at most {MAX_TOKENS})")
    p.add_argument("--eval-chunks", type=v.int_arg(0, opts.MAX_COUNT), default=4,
                   help="chunks of the shipped WikiText-2 test excerpt to score against the F32 reference (0: none)")
    p.add_argument("--eval-ctx", type=v.int_arg(8, opts.MAX_CTX), default=256, help="tokens per eval chunk (default 256)")
    p.add_argument("--threads", type=opts.threads_arg(), metavar="N", help="llama.cpp threads (default: up to 2)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of the tables")
    opts.add_calibration_args(p.add_argument_group("calibration of the GPTQ rungs and the IQ rungs' importance "
                                                   "matrix"), ladder=True)
    opts.add_config_arg(p, "demo")
    p.set_defaults(func=run)


def _s(x) -> str:
    return "cached" if x is None else f"{x:.1f}s"


def run(args) -> int:
    from .. import api
    from ..util.errors import QuantkitError
    opts.apply_config(args)
    calib, nsamples, seqlen = opts.calibration_options(args)
    types = [t.strip().lower() for t in (args.types or ",".join(api.DEMO_LADDER)).split(",") if t.strip()]
    if not types:
        raise QuantkitError("--types is empty", hint="e.g. --types q8_0,q4_0,q4_0+gptq")
    t0 = time.perf_counter()
    rows = api.demo(args.out_dir, types, prompt=args.prompt or api.DEMO_PROMPT, max_tokens=args.max_tokens,
                    eval_chunks=args.eval_chunks, eval_ctx=args.eval_ctx, calib=calib,
                    nsamples=nsamples, seqlen=seqlen, n_threads=args.threads, imatrix=args.imatrix)
    total = time.perf_counter() - t0
    if args.json:
        opts.print_json({"prompt": args.prompt or api.DEMO_PROMPT, "seconds": total,
                            "rows": [r.to_dict() for r in rows]})
        return 0
    print(f"\nprompt: {args.prompt or api.DEMO_PROMPT!r} (greedy, llama.cpp, {rows[0].threads} threads)\n")
    hdr = (f"{'format':<7} {'method':<6} {'file size':>10} {'bits/weight':>11} {'quantize':>9} {'load':>7} "
           f"{'prompt tok/s':>12} {'gen tok/s':>10}  output")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        out = r.output.replace("\n", " ").strip()
        print(f"{r.format:<7} {r.method:<6} {r.file_bytes / 1e6:>8.1f}MB {r.bits_per_weight:>11.2f} "
              f"{_s(r.quantize_s):>9} {r.load_s:>6.2f}s {r.prompt_tok_s:>12.1f} {r.gen_tok_s:>10.1f}  "
              f"{out[:60]}")
    cal = next((r.calibration for r in rows if r.calibration and r.method == "GPTQ"), None)
    if cal:
        print(f"\nRTN: llama.cpp's round-to-nearest; GPTQ: the same llama.cpp types, weights solved by GPTQ on {cal}")
    imx = next((r.calibration for r in rows if r.calibration and r.method != "GPTQ"), None)
    if imx:
        print(f"IQ rungs: round-to-nearest weighted by an {imx}, as llama-quantize --imatrix")
    if rows[0].report:
        print(f"\nwhat was lost, against the F32 reference (perplexity {rows[0].ref_ppl:.3f}) on "
              f"{rows[0].eval_tokens} tokens of WikiText-2 test (llama.cpp's protocol, second half of each chunk "
              f"scored):\n")
        print(f"{'format':<7} {'method':<6} {'perplexity':>10} {'KL div.':>9} {'top-1 agree':>11}")
        for r in rows:
            print(f"{r.format:<7} {r.method:<6} {r.ppl:>10.3f} {r.kld:>9.4f} {100 * r.top1:>10.1f}%")
        print(f"\nreport: {rows[0].report}")
    print("\nfiles: " + ", ".join(r.file for r in rows))
    print(f"demo took {total:.0f} s")
    return 0
