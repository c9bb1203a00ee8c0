"""quantkit inspect MODEL: architecture, parameters, tensors, bits per weight, tokenizer."""

from __future__ import annotations

import json

from ..util import validate as v


def register(sub) -> None:
    p = sub.add_parser("inspect", help="show a model's architecture, tensors and bits per weight",
                       description="Show a model's architecture, parameter count, per-tensor table "
                                   "(name, shape, type, bytes), bits per weight and tokenizer.")
    p.add_argument("model", nargs="?", type=v.str_arg(), help="a .gguf file or Hugging Face model directory (default: the bundled Gemma-3-270M)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--tensors", type=v.int_arg(0, 1_000_000_000), default=None, metavar="N",
                   help="show only the first N tensors in the table (default: all)")
    from . import options
    options.add_trust_pickle_arg(p)
    p.set_defaults(func=run)


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.1f} MB"


def run(args) -> int:
    from .. import api
    info = api.inspect(args.model, trust_pickle=args.trust_pickle)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    a = info["architecture"]
    print(f"{info['path']}")
    print(f"  format        {info['format']}   architecture {a['arch']}")
    print(f"  layers {a['n_layer']}  hidden {a['n_embd']}  heads {a['n_head']}  kv heads {a['n_head_kv']}  "
          f"head_dim {a['head_dim']}  ffn {a['n_ff']}  vocab {a['n_vocab']}  context {a['n_ctx_train']}")
    sw = f"{a['sliding_window']} on {sum(a['sliding_window_pattern'] or [])} of {a['n_layer']} layers" \
        if a["sliding_window"] else "none"
    print(f"  tied embeddings {a['tied_embeddings']}  sliding window {sw}  norm {a['norm']}")
    print(f"  parameters    {info['parameters']:,}")
    print(f"  size          {_mb(info['file_bytes'] or info['tensor_bytes'])}   "
          f"bits per weight {info['bits_per_weight']:.2f} (decoder linears {info['bits_per_weight_linear']:.2f})")
    print(f"  types         " + ", ".join(f"{k}: {v}" for k, v in sorted(info["types"].items())))
    t = info["tokenizer"]
    print(f"  tokenizer     {t['model']} (pre {t['pre']}), {t['n_tokens']:,} tokens")
    m = info["model"]
    experts = f"{m['experts']} experts, {m['experts_used']} per token" if m["experts"] else "dense"
    print(f"  model         {m['architecture']} (llama.cpp {m['gguf_architecture']}), {experts}, "
          f"vision tower {m['vision_tower'] or 'none'}")
    for i, c in enumerate(m["quantkit_can"]):
        print(f"  {'quantkit can' if i == 0 else '':<13} {c}")
    vis = info.get("vision")
    if vis:
        what = f"vision tower  {vis['tower']} + {vis['projector'] or '?'} projector ({vis['model_type']}); "
        print("  " + what + (f"{vis['layers']} layers used, hidden {vis['hidden']}, {vis['image_size']}px images in "
                             f"{vis['patch_size']}px patches -> {vis['image_tokens']} tokens; quantize writes it as "
                             "mmproj-<OUT> for llama.cpp" if vis["mmproj"] else vis["reason"]))
    rows = info["tensors"][: args.tensors] if args.tensors is not None else info["tensors"]
    w = max((len(r["name"]) for r in rows), default=4)
    print(f"\n  {'name':<{w}}  {'shape':<18} {'type':<6} {'bytes':>14}")
    for r in rows:
        print(f"  {r['name']:<{w}}  {'x'.join(map(str, r['shape'])):<18} {r['type']:<6} {r['bytes']:>14,}")
    if len(rows) < len(info["tensors"]):
        print(f"  ... {len(info['tensors']) - len(rows)} more (drop --tensors to see all)")
    return 0
