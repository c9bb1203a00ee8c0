"""quantkit demo: the bundled model to Q8_0 and Q4_0, each run in llama.cpp, one table."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("demo", help="quantize the bundled Gemma-3-270M and run it in llama.cpp",
                       description="Quantize the bundled Gemma-3-270M to Q8_0 and Q4_0 GGUF, run each "
                                   "in llama.cpp on a short prompt and print a table.")
    p.add_argument("--out-dir", help="where the GGUF files go (default: ~/.cache/quantkit/demo)")
    p.add_argument("--types", default="q8_0,q4_0", help="comma-separated GGUF file types (default q8_0,q4_0)")
    p.add_argument("--prompt", default=None, help="prompt to continue")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--eval-chunks", type=int, default=2,
                   help="chunks of the shipped WikiText-2 excerpt to score against the F32 reference (0: none)")
    p.add_argument("--eval-ctx", type=int, default=256, help="tokens per eval chunk (default 256)")
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import api
    from ..util.errors import QuantkitError
    if args.max_tokens < 1:
        raise QuantkitError("--max-tokens must be at least 1")
    types = [t.strip().lower() for t in args.types.split(",") if t.strip()]
    if args.eval_chunks < 0:
        raise QuantkitError("--eval-chunks must be 0 or more")
    rows = api.demo(args.out_dir, types, prompt=args.prompt or api.DEMO_PROMPT, max_tokens=args.max_tokens,
                    eval_chunks=args.eval_chunks, eval_ctx=args.eval_ctx)
    print(f"\nprompt: {args.prompt or api.DEMO_PROMPT!r} (greedy, llama.cpp, {rows[0]['threads']} threads)\n")
    hdr = f"{'format':<7} {'file size':>10} {'bits/weight':>11} {'quantize':>9} {'load':>7} {'prompt tok/s':>12} {'gen tok/s':>10}  output"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        out = r["output"].replace("\n", " ").strip()
        print(f"{r['format']:<7} {r['file_bytes'] / 1e6:>8.1f}MB {r['bits_per_weight']:>11.2f} {r['quantize_s']:>8.1f}s "
              f"{r['load_s']:>6.2f}s {r['prompt_tok_s']:>12.1f} {r['gen_tok_s']:>10.1f}  {out[:60]}")
    if rows[0].get("report"):
        print(f"\nwhat was lost, against the F32 reference (perplexity {rows[0]['ref_ppl']:.3f}) on "
              f"{rows[0]['eval_tokens']} tokens of WikiText-2 (llama.cpp's protocol, second half of each chunk scored):\n")
        print(f"{'format':<7} {'perplexity':>10} {'KL div.':>9} {'top-1 agree':>11}")
        for r in rows:
            print(f"{r['format']:<7} {r['ppl']:>10.3f} {r['kld']:>9.4f} {100 * r['top1']:>10.1f}%")
        print(f"\nreport: {rows[0]['report']}")
    print("\nfiles: " + ", ".join(r["file"] for r in rows))
    return 0
