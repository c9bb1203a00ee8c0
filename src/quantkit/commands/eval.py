"""quantkit eval MODEL [MODEL ...] [--ref REF] [--text FILE] [--chunks N] [--ctx 512] [--json] [--report out.html]
[--ladder [RUNGS]] [--calib FILE] [--nsamples N] [--seqlen L] [--config FILE].

Language models (GGUF, HF causal LMs) are scored by perplexity and KL divergence; encoder
classifiers (BERT-family directories with a head) by task accuracy (--task-data, SST-2 dev by
default); one run takes one kind."""

from __future__ import annotations

import os
import shlex

from ..util import validate as v
from . import options as opts

MAX_SPEED_RUNS = 1000


def register(sub) -> None:
    p = sub.add_parser(
        "eval", help="perplexity, KL divergence, size, speed and memory of models, side by side",
        description="Score models on the same token ids against one reference (llama.cpp's perplexity "
                    "protocol: chunks of BOS + n_ctx-1 tokens, the second half of each scored), with the "
                    "reference's log-probabilities cached on disk. GGUF files run in llama.cpp, Hugging Face "
                    "directories in transformers (torch, CPU, float32). Encoder classifiers (BERT-family "
                    "directories with a classification head, fp32 or dynamic-int8) are scored by task accuracy "
                    "instead (SST-2 dev by default).")
    p.add_argument("models", nargs="*", metavar="MODEL", type=v.str_arg(),
                   help="a .gguf file or Hugging Face model directory (default: the bundled model); "
                        "torch:FILE.gguf runs a GGUF (gemma3, llama) in transformers at F32")
    p.add_argument("--ref", metavar="REF", type=v.str_arg(), help="reference model (default: the F32 dequantization of the first MODEL)")
    p.add_argument("--text", metavar="FILE", type=v.str_arg(), help="UTF-8 text to score (default: $QUANTKIT_EVAL_TEXT or wikitext-2 "
                                                  "test.txt of a development checkout)")
    p.add_argument("--chunks", type=v.int_arg(0, opts.MAX_COUNT), default=8, metavar="N", help="number of chunks (default 8; 0 = all)")
    p.add_argument("--ctx", type=v.int_arg(8, opts.MAX_CTX), default=512, metavar="N", help="tokens per chunk, BOS included (default 512)")
    p.add_argument("--threads", type=opts.threads_arg(), metavar="N", help="CPU threads (default: all cores)")
    p.add_argument("--no-speed", action="store_true", help="skip the load / tokens-per-second / peak-RSS probes")
    p.add_argument("--speed-runs", type=v.int_arg(1, MAX_SPEED_RUNS), default=3, metavar="N", help="runs per speed figure, median reported (default 3)")
    p.add_argument("--no-cache", action="store_true", help="do not keep the reference's log-probabilities on disk")
    p.add_argument("--cache-max", metavar="SIZE", type=v.str_arg(v.MAX_NUMBER_TEXT),
                   help="cap of the eval cache (reference log-probabilities, F32 references), least recently used "
                        "deleted first after each run, e.g. 4G, 500M, 0 (default: $QUANTKIT_EVAL_CACHE_MAX or 4G)")
    p.add_argument("--task-data", metavar="FILE", type=v.str_arg(),
                   help="classifiers: label<TAB>text examples (default: $QUANTKIT_EVAL_TASK_DATA or SST-2 dev.tsv "
                        "of a development checkout)")
    p.add_argument("--task-limit", type=v.int_arg(1, opts.MAX_COUNT), metavar="N", help="classifiers: score the first N examples only")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--report", metavar="OUT.html", type=v.str_arg(), help="write a self-contained HTML report (table, size vs KLD chart)")
    p.add_argument("--ladder", nargs="?", const="default", metavar="RUNGS", type=v.str_arg(),
                   help="quantize MODEL to a ladder of GGUF types and evaluate them all (default: F16, Q8_0, "
                        "Q5_0, Q4_1, Q4_0 RTN, Q4_0 GPTQ, the K-quants and IQ4_XS, IQ3_S, IQ2_M (with an importance "
                        "matrix); or a comma list of "
                        "recipes, e.g. q8_0,q4_0,q4_0+gptq: TYPE (or gguf:TYPE) is llama.cpp's round-to-nearest, "
                        "TYPE+gptq GPTQ onto the same type; the old TYPE-gptq is still read)")
    p.add_argument("--ladder-dir", metavar="DIR", type=v.str_arg(),
                   help="where ladder files go, written afresh (default: quantkit's cache, where a rung is re-used, "
                        "keyed by source, type, method and calibration)")
    p.add_argument("--sweep", metavar="FILE", type=v.str_arg(),
                   help="a grid from a YAML/JSON file (models, recipes, texts): each model quantized to each recipe "
                        "and scored on each text, one section per model and text")
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS", type=v.str_arg(),
                   help="run each cell (quantize a rung, score it) as a Ray task: on the cluster at HOST:PORT, or "
                        "without ADDRESS on a local Ray runtime (needs the `ray` extra: pip install 'quantkit[ray]')")
    p.add_argument("--workers", type=v.int_arg(1, opts.MAX_COUNT), metavar="N",
                   help="with --ray and no ADDRESS: CPUs of the local Ray runtime (default: all cores)")
    opts.add_calibration_args(p.add_argument_group("calibration of the ladder's GPTQ rungs and IQ rungs' "
                                                   "importance matrix (never the scored --text)"), ladder=True)
    opts.add_config_arg(p, "eval")
    opts.add_trust_pickle_arg(p)
    p.set_defaults(func=run)


def _mb(b) -> str:
    return f"{b / 1e6:,.1f}" if b is not None else "-"


def _f(x, fmt: str) -> str:
    return format(x, fmt) if x is not None else "-"


def format_table(res) -> str:
    if res.meta.get("kind") == "classifier":
        return format_classifier_table(res)
    rows = []
    ladder = res.meta.get("ladder")
    head = ["model", *(["rung"] if ladder else []), "size MB", "bpw", "bpw lin", "PPL", "KLD mean", "KLD med",
            "KLD p99", "top-1 %", "load s", "pp tok/s", "tg tok/s", "peak RSS MB"]
    for r in res.rows:
        sp = r.speed or {}
        rows.append([r.name + (" (ref)" if r.is_reference else ""),
                     *([r.rung or "-"] if ladder else []), _mb(r.file_bytes),
                     _f(r.bits_per_weight, ".2f"), _f(r.bits_per_weight_linear, ".2f"),
                     f"{r.ppl:.4f} ± {r.ppl_stderr:.4f}", f"{r.kld_mean:.5f}", f"{r.kld_median:.5f}",
                     f"{r.kld_p99:.4f}", f"{100 * r.top1_agreement:.2f}",
                     _f(sp.get("load_s"), ".2f"), _f(sp.get("pp_tok_s"), ".1f"), _f(sp.get("tg_tok_s"), ".1f"),
                     _mb(sp.get("peak_rss_bytes"))])
    m = res.meta
    out = _align(head, rows)
    out += ["", m["protocol"],
            f"reference: {m['reference']} ({m['reference_how']}; {m['reference_runtime']})",
            f"text: {m['text']}; tokenizer: {m['tokenizer']}"]
    if ladder:
        out.append(f"ladder: RTN = {ladder['rtn']}" + (f"; GPTQ = {ladder['gptq']}" if ladder.get("gptq") else "")
                   + (f"; re-used from the cache: {', '.join(ladder['reused'])}" if ladder.get("reused") else ""))
    if m.get("speed"):
        out.append(f"speed: {m['speed']}")
    return "\n".join(out)


def _align(head, rows) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]


def format_classifier_table(res) -> str:
    m = res.meta
    head = ["model", "size MB", "bpw", "bpw lin", f"{m['task']} acc %", "agree %", "KLD mean", "KLD p99",
            "load s", "ms/sent (b1)", "sent/s (b32)", "peak RSS MB"]
    rows = []
    for r in res.rows:
        sp = r.speed or {}
        rows.append([r.name + (" (ref)" if r.is_reference else ""), _mb(r.file_bytes),
                     _f(r.bits_per_weight, ".2f"), _f(r.bits_per_weight_linear, ".2f"),
                     f"{100 * r.accuracy:.2f} ± {100 * r.accuracy_stderr:.2f}",
                     f"{100 * r.top1_agreement:.2f}", f"{r.kld_mean:.5f}", f"{r.kld_p99:.4f}",
                     _f(sp.get("load_s"), ".2f"), _f(sp.get("latency_ms"), ".1f"), _f(sp.get("sent_s"), ".1f"),
                     _mb(sp.get("peak_rss_bytes"))])
    out = _align(head, rows)
    out += ["", m["protocol"], f"reference: {m['reference']} ({m['reference_how']}; {m['reference_runtime']})"]
    if m.get("speed"):
        out.append(f"speed: {m['speed']}")
    return "\n".join(out)


def command_line(args) -> str:
    """The command as run, rebuilt from the parsed options (every default spelled out)."""
    parts = ["quantkit", "eval", *args.models]
    for flag, value in (("--ref", args.ref), ("--text", args.text), ("--chunks", args.chunks), ("--ctx", args.ctx),
                        ("--threads", args.threads), ("--speed-runs", None if args.no_speed else args.speed_runs),
                        ("--cache-max", args.cache_max), ("--task-data", args.task_data),
                        ("--task-limit", args.task_limit),
                        ("--ladder", None if not args.ladder or args.ladder == "default" else args.ladder),
                        ("--ladder-dir", args.ladder_dir), ("--calib", args.calib), ("--imatrix", args.imatrix),
                        ("--nsamples", args.nsamples), ("--seqlen", args.seqlen),
                        ("--report", args.report), ("--sweep", args.sweep),
                        ("--ray", None if args.ray in (None, "local") else args.ray), ("--workers", args.workers)):
        if value is not None:
            parts += [flag, str(value)]
    if args.ladder == "default":
        parts.append("--ladder")
    if args.ray == "local":
        parts.append("--ray")
    parts += [f for f, on in (("--no-speed", args.no_speed), ("--no-cache", args.no_cache), ("--json", args.json)) if on]
    return " ".join(shlex.quote(p) for p in parts)


def run(args) -> int:
    from .. import api
    from ..util.atomic import check_output
    from ..util.errors import QuantkitError

    opts.apply_config(args)
    args.calib, args.nsamples, args.seqlen = opts.calibration_options(args)
    if args.report:  # fail before the long run, not after it
        if os.path.isdir(args.report):
            raise QuantkitError("report path is an existing directory", args.report, "give a file name, e.g. report.html")
        inputs = [*(m.removeprefix("torch:") for m in args.models), args.ref, args.text, args.task_data, args.calib,
                  args.ladder if args.ladder and os.path.exists(args.ladder) else None]
        check_output(args.report, inputs, flag="--report")
    options = dict(ref=args.ref, text=args.text, n_chunks=args.chunks, n_ctx=args.ctx, n_threads=args.threads,
                   speed=not args.no_speed, speed_runs=args.speed_runs, cache=not args.no_cache,
                   cache_max=args.cache_max, task_data=args.task_data, task_limit=args.task_limit)
    if args.workers is not None and (args.workers < 1 or not args.ray):
        raise QuantkitError(f"--workers {args.workers}: give a positive number, with --ray",
                            hint="e.g. --ray --workers 2")
    ray = dict(ray=args.ray, workers=args.workers) if args.ray else {}
    if args.sweep:
        if args.models or args.ladder:
            raise QuantkitError("--sweep lists its own models and recipes", args.sweep,
                                "give either --sweep FILE or MODEL/--ladder")
        return _run_sweep(args, options, ray)
    if args.ladder and args.ladder != "default" and os.path.exists(args.ladder):
        args.models.insert(0, args.ladder)   # `eval --ladder model.gguf`: the path is the model
        args.ladder = "default"
    if args.ladder:
        if len(args.models) > 1:
            raise QuantkitError("--ladder takes one MODEL", hint="give one model (or none for the bundled one)")
        from ..eval.classify import is_encoder_dir
        if args.models and is_encoder_dir(args.models[0]):
            raise QuantkitError("--ladder quantizes language models to GGUF types, not encoders", args.models[0],
                                "make an encoder's int8 with `quantkit quantize-dynamic`, then eval both")
        types = None if args.ladder == "default" else [t.strip() for t in args.ladder.split(",") if t.strip()]
        res = api.eval_ladder(args.models[0] if args.models else None, types=types, out_dir=args.ladder_dir,
                              calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, imatrix=args.imatrix,
                              trust_pickle=args.trust_pickle, **ray, **options)
    else:
        if args.calib or args.nsamples or args.seqlen or args.imatrix:
            raise QuantkitError("--calib, --nsamples, --seqlen and --imatrix calibrate a ladder's GPTQ and IQ rungs",
                                hint="use them with --ladder, e.g. --ladder q4_0,q4_0+gptq")
        res = api.evaluate(args.models or [None], trust_pickle=args.trust_pickle, **ray, **options)
    res.meta["command"] = command_line(args)
    if args.report:
        from ..eval.report import write_report
        write_report(res, args.report)
    if args.json:
        print(res.to_json())
    else:
        print(format_table(res))
        if args.report:
            print(f"report: {os.path.abspath(args.report)}")
    return 0


def _run_sweep(args, options: dict, ray: dict) -> int:
    from .. import api
    from ..eval.sweep import load_sweep, write_sweep_report
    sweep = load_sweep(args.sweep)      # a bad file fails before any work
    res = api.eval_sweep(sweep, calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, imatrix=args.imatrix,
                         **ray, **options)
    res.meta["command"] = command_line(args)
    if args.report:
        write_sweep_report(res, args.report)
    if args.json:
        print(res.to_json())
    else:
        for s in res.sections:
            print(f"== {s.rows[0].path} on {s.meta['text']}")
            print(format_table(s))
            print()
        if args.report:
            print(f"report: {os.path.abspath(args.report)}")
    return 0
