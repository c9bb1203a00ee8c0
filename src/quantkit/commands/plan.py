"""`quantkit plan MODEL`: will it fit, in which format, how fast, and what training needs."""

from __future__ import annotations

import json
import sys

from ..util import validate as v

# Ranges of the numeric flags: positive, and below anything a machine or a model has.
MAX_GB = 100_000             # --vram, --ram (GiB), --bandwidth (GB/s)
MAX_TFLOPS = 1_000_000
MAX_PLAN_CTX = 16 * 1024 * 1024
MAX_BATCH = 65536


def _gib(b: float) -> str:
    return f"{b / (1 << 30):.2f}"


def _check_numbers(args) -> None:
    """Zero, negative or absurd numbers: one line naming the flag. argparse only parses them (a
    bounded numeral), so main() returns the error's exit status like any other plan error."""
    for attr, hi in (("vram", MAX_GB), ("bandwidth", MAX_GB), ("tflops", MAX_TFLOPS), ("ram", MAX_GB)):
        if getattr(args, attr) is not None:
            v.positive_float(getattr(args, attr), f"--{attr}", hi)
    for attr, hi in (("ctx", MAX_PLAN_CTX), ("batch", MAX_BATCH), ("rank", MAX_BATCH)):
        if getattr(args, attr) is not None:
            v.positive_int(getattr(args, attr), f"--{attr}", hi)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    w = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r))  # noqa: E731
    return "\n".join([line(headers), "  ".join("-" * x for x in w)] + [line(r) for r in rows])


def render(p) -> str:
    m = p.model
    out = []
    out.append(f"{m.name}: {m.arch}, {m.n_params / 1e9:.3g}B parameters, {m.n_layer} layers, hidden {m.n_embd}, "
               f"{m.n_head} heads / {m.n_head_kv} KV heads x {m.head_dim}, vocab {m.n_vocab}, "
               f"trained context {m.n_ctx_train}" + (f", {m.n_expert} experts ({m.n_expert_used} active)" if m.n_expert else ""))
    out.append(f"source: {m.source}")
    out.append("")
    mem_rows = []
    for r in p.rows:
        x = r.memory
        mem_rows.append([r.format, _gib(x.weights), _gib(x.kv), _gib(x.compute), _gib(x.output + x.overhead_cpu),
                         _gib(x.total), "-" if r.cpu_resident is None else _gib(r.cpu_resident),
                         f"{r.bytes_per_token / 1e6:.0f}"])
    out.append(f"Memory (GiB) at context {p.n_ctx} x batch {p.options.batch}, runtime {p.options.runtime}"
               + (f" ({p.options.process})" if p.options.runtime == "llama.cpp" else "") + ":")
    out.append(_table(["format", "weights", "KV", "compute", "other", "total", "RSS (CPU)", "MB read/token"], mem_rows))
    out.append("")
    out.append("Fit and decode speed (expected tokens/s; 'N/M layers' = partial GPU offload):")
    fit_rows = [[r.format] + [c.text() for c in r.cells] for r in p.rows]
    out.append(_table(["format"] + [d.name + (f" x{d.count}" if d.count > 1 else "") for d in p.devices], fit_rows))
    out.append("")
    out.append("Devices: " + "; ".join(f"{d.name} = {d.label}, {d.memory_bytes * d.count / (1 << 30):.0f} GiB, "
                                       f"{d.bandwidth / 1e9:g} GB/s" for d in p.devices))
    if p.training:
        t = p.training
        out.append("")
        out.append(f"Training ({t.mode}{', rank %d' % p.options.rank if t.mode != 'full' else ''}), "
                   f"sequence {p.n_ctx} x batch {p.options.batch}, GiB:")
        out.append(_table(["part", "without checkpointing", "with gradient checkpointing"], [
            ["weights", _gib(t.weights), _gib(t.weights)],
            ["gradients", _gib(t.gradients), _gib(t.gradients)],
            ["optimizer (Adam)", _gib(t.optimizer), _gib(t.optimizer)],
            ["activations", _gib(t.activations), _gib(t.activations_checkpointed)],
            ["logits + grad", _gib(t.logits), _gib(t.logits)],
            ["CUDA context", _gib(t.overhead), _gib(t.overhead)],
            ["total", _gib(t.total), _gib(t.total_checkpointed)],
        ]))
        out.append(f"trainable parameters: {t.trainable_params:,}")
    out.append("")
    out.append("Assumptions:")
    out += [f"  - {a}" for a in p.assumptions]
    out.append("Sources:")
    out += [f"  [{k}] {v}" for k, v in p.footnotes.items()]
    return "\n".join(out)


def run(args) -> int:
    from ..plan import hardware
    from ..plan.model import known_names
    from ..plan.planner import PlanOptions, plan

    _check_numbers(args)
    if args.list_devices:
        devs = dict(hardware.devices())
        cal = hardware.calibrated_cpu()
        if cal is not None:
            devs[cal.name] = cal
        if args.json:
            print(json.dumps([{"name": name, "kind": d.kind, "memory_bytes": d.memory_bytes,
                               "bandwidth": d.bandwidth, "label": d.label} for name, d in devs.items()], indent=2))
            return 0
        for name, d in devs.items():
            print(f"{name:<18} {d.kind:<5} {d.memory_bytes / (1 << 30):6.0f} GiB {d.bandwidth / 1e9:7.1f} GB/s  {d.label}")
        return 0
    if args.list_models:
        print(json.dumps(known_names(), indent=2) if args.json else "\n".join(known_names()))
        return 0
    if not args.model:
        from ..util.errors import QuantkitError
        raise QuantkitError("no MODEL given", hint="an HF directory, a .gguf, a .safetensors, or a name such as llama-2-13b")
    from ..recipe import deprecation_note, warn_deprecated
    fmts = [f.strip() for x in (args.format or []) for f in x.split(",") if f.strip()]
    for f in fmts:
        warn_deprecated(deprecation_note(f))
    o = PlanOptions(devices=args.device or [], vram_gb=args.vram, bandwidth_gbs=args.bandwidth, tflops=args.tflops,
                    n_ctx=args.ctx, batch=args.batch, kv_type=args.kv_type, runtime=args.runtime,
                    formats=fmts or None,
                    swa_full=args.swa_full, flash_attn=args.flash_attn, ram_gb=args.ram, train=args.train,
                    rank=args.rank, lora_targets=args.lora_targets, images=args.images)
    p = plan(args.model, o)
    budgets = []
    if args.device and args.runtime != "torch" and args.batch == 1:
        from ..plan.fit import largest_budgets, render_budgets
        budgets = largest_budgets(p.model, args.model, args.device, p.n_ctx, args.kv_type, args.ram,
                                  runtime=p.options.process)
    if args.json:
        json.dump(p.to_dict() | ({"budgets": budgets} if budgets else {}), sys.stdout, indent=2)
        print()
    else:
        print(render(p))
        if budgets:
            print("\n" + "\n".join(render_budgets(budgets)))
    return 0


def register(sub) -> None:
    p = sub.add_parser("plan", help="will a model fit a device, in which format, how fast; training memory",
                       description="Plan memory and speed from file headers or a built-in config; nothing is downloaded.")
    p.add_argument("model", nargs="?", type=v.str_arg(), help="HF directory, .gguf, .safetensors (header only) or a built-in name")
    p.add_argument("--device", action="append", metavar="NAME", type=v.str_arg(200),
                   help="device from the hardware table (repeat for columns; '2x rtx-3090' = two cards)")
    p.add_argument("--vram", type=v.float_arg(), metavar="GB", help="custom device memory (GiB)")
    p.add_argument("--bandwidth", type=v.float_arg(), metavar="GB/s", help="custom device bandwidth")
    p.add_argument("--tflops", type=v.float_arg(), help="custom device FP16 TFLOP/s (prompt speed)")
    p.add_argument("--ram", type=v.float_arg(), metavar="GB", help="host RAM for CPU rows and offloaded layers (GiB)")
    p.add_argument("--ctx", type=v.int_arg(), metavar="N", help="context length per sequence (default min(4096, trained))")
    p.add_argument("--batch", type=v.int_arg(), default=1, metavar="N", help="parallel sequences")
    p.add_argument("--images", type=v.int_arg(), default=1, metavar="N",
                   help="vision-language model: images in the context, each adding its tokens (default 1)")
    p.add_argument("--kv-type", default="f16", choices=["f16", "q8_0", "q4_0"], help="KV cache type (llama.cpp)")
    p.add_argument("--runtime", default="llama.cpp", choices=["llama.cpp", "llama-cpp-python", "llama-server", "torch"],
                   help="llama.cpp (the RSS column as llama-cpp-python holds it), a llama.cpp front end "
                        "(llama-cpp-python, llama-server: its process, defaults and buffers in the RSS column "
                        "and in --device's largest budget) or torch")
    p.add_argument("--format", action="append", metavar="F[,F...]", type=v.str_arg(1000),
                   help="formats to plan (default: common GGUF types, or GPU formats with --runtime torch): "
                        "recipes as `quantize --format` takes them (q4_k_m or gguf:q4_k_m, gptq:w4g128) or "
                        "awq:w4g128, fp16, bf16, int8 (LLM.int8), int4, nf4, nf4-nodq, IQ types")
    p.add_argument("--swa-full", action="store_true", help="llama.cpp: full-size cache for sliding-window layers")
    p.add_argument("--flash-attn", action="store_true", help="llama.cpp: flash attention (smaller compute buffer)")
    p.add_argument("--train", choices=["full", "lora", "qlora"], help="also plan fine-tuning memory")
    p.add_argument("--rank", type=v.int_arg(), default=16, help="LoRA rank")
    p.add_argument("--lora-targets", default="q,k,v,o,gate,up,down", type=v.str_arg(200), help="LoRA target matrices")
    p.add_argument("--list-devices", action="store_true", help="print the hardware table and exit")
    p.add_argument("--list-models", action="store_true", help="print the built-in model names and exit")
    p.add_argument("--json", action="store_true", help="print JSON (also with --list-devices, --list-models)")
    p.set_defaults(func=run)
