"""`quantkit explain NAME`: what a model name says (method, bits, group size, format, runtime, size)."""

from __future__ import annotations

import json

from ..util import validate as v

MAX_NAME = 300               # longer than any repository id or file name


def _gb(b: int | None) -> str:
    return "-" if b is None else f"{b / 1e9:.2f} GB ({b / (1 << 30):.2f} GiB)"


def run(args) -> int:
    from ..plan.names import explain

    info = explain(args.name)
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
        return 0
    a = set(info.assumed)

    def mark(field: str, v) -> str:
        return f"{v} (assumed)" if field in a else str(v)

    group = None if info.group_size is None else ("none (-1: one scale per row)" if info.group_size == -1 else info.group_size)
    rows = [
        ("name", info.name),
        ("base model", f"{info.base_model} (built-in config)" if info.base_model else "-"),
        ("parameters", f"{info.params / 1e9:.3g}B (from the {info.params_from})" if info.params else "-"),
        ("chat/instruct", "yes" if info.chat else "no"),
        ("method", mark("method", info.method or "-")),
        ("bits", mark("bits", info.bits if info.bits is not None else "-")),
        ("group size", mark("group_size", group if group is not None else "-")),
        ("act-order", mark("act_order", {None: "-", True: "yes", False: "no"}[info.act_order])),
        ("tensor type", mark("qtype", info.qtype or "-")),
        ("file format", info.file_format or "-"),
        ("runtime", info.runtime or "-"),
        ("file size", _gb(info.est_file_bytes)),
        (f"memory ({info.memory_ctx}-token context)" if info.memory_ctx else "memory", _gb(info.est_memory_bytes)),
    ]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    if info.sizes:
        print("\nfile size by GGUF type (weights, exact for the base config):")
        for t, b in info.sizes.items():
            print(f"  {t:<7} {_gb(b)}")
    if info.tokens:
        print("\nwhat the parts mean:")
        for t, meaning in info.tokens:
            print(f"  {t:<10} {meaning}")
    for n in info.notes:
        print(f"note: {n}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("explain", help="decode a model name: method, bits, group size, format, runtime, size",
                       description="Decode a model name or tag, e.g. 'Llama-2-13B-chat-GPTQ', "
                                   "'pygmalion-13b-4bit-128g', 'Chinese-Llama-2-7b-ggml-q4'.")
    p.add_argument("name", type=v.str_arg(MAX_NAME, empty=True), help="model name, repo id or file name")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)
