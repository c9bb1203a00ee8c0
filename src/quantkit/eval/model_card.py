"""A model card (README.md, in the Hugging Face style) beside a budgeted GGUF, and the
"provided files" table a ladder of budgets fills.

Inputs are plain dicts (what quantkit.api collects: the file's tensor types and sizes, the
calibration, the evaluation, the planner's numbers), so the card renders without reading the
model again. Every number on the card is taken from the file (sizes, types) or from the run
that made it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

MARK = "<!-- written by quantkit: model card -->"


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def mix_by_class(types: dict[str, str], nbytes: dict[str, int]) -> list[tuple[str, str, int]]:
    """(tensor class, "type x count, ...", bytes) per class, classes in file order."""
    from ..quant.sensitivity import tensor_class
    agg: dict[str, dict[str, int]] = {}
    size: dict[str, int] = {}
    for n, t in types.items():
        c = tensor_class(n)
        if c == "other" and t in ("f32",):
            c = "norms and other"
        agg.setdefault(c, {})
        agg[c][t] = agg[c].get(t, 0) + 1
        size[c] = size.get(c, 0) + nbytes.get(n, 0)
    return [(c, ", ".join(f"{t.upper()} x{k}" for t, k in sorted(v.items(), key=lambda kv: -kv[1])), size[c])
            for c, v in agg.items()]


@dataclass
class CardInfo:
    model: str                       # the source's name
    file: str                        # the GGUF's file name
    method: str                      # "rtn" | "gptq"
    budget: str                      # "--target-size 300MB", ...
    file_bytes: int
    bpw: float
    n_params: int
    types: dict[str, str]            # tensor -> type
    nbytes: dict[str, int]           # tensor -> bytes
    est_kl: float
    calibration: dict                # file, nsamples, seqlen, sensitivity samples
    command: str
    notes: list[str] = field(default_factory=list)
    evaluation: list[dict] = field(default_factory=list)   # per text: text, kld, ppl, top1
    planner: dict | None = None      # device, n_ctx, kv_type, memory needed, available, tokens/s
    seconds: dict = field(default_factory=dict)            # sensitivity, allocation, write
    checks: list[dict] = field(default_factory=list)       # the measured check: label, file_bytes, est_kl, measured_kl


def _check_row(k: dict) -> str:
    size = _mb(k["file_bytes"]) if k.get("file_bytes") else "n/a"
    est = f"{k['est_kl']:.4g}" if k.get("est_kl") is not None else "n/a"
    meas = f"{k['measured_kl']:.4g}" if k.get("measured_kl") is not None else f"not measured: {k.get('skipped')}"
    return f"| {k['label']} | {size} | {est} | {meas} |"


def render_card(c: CardInfo) -> str:
    # A card is a list of sections; one function keeps their order readable.
    out = ["---", f"base_model: {c.model}", "library_name: gguf", "tags:", "  - gguf", "  - quantkit",
           f"  - {c.method}", "  - mixed-precision", "---", MARK, "",
           f"# {c.model}: {c.file}", "",
           f"A GGUF of **{c.model}** whose tensor types were chosen by quantkit under a budget ({c.budget}): "
           "each tensor gets the type that costs the model's output least for its bytes, estimated from "
           "a calibration pass (Hessian-weighted error, scaled by measured single-tensor KL probes) and "
           "allocated by an exact knapsack over the bytes" +
           (", then solved by GPTQ onto each tensor's own llama.cpp grid." if c.method == "gptq" else
            ", then written by llama.cpp's round to nearest."), "",
           "| file | size | bits per weight | parameters | method | estimated KL |",
           "|---|---:|---:|---:|---|---:|",
           f"| {c.file} | {_mb(c.file_bytes)} ({c.file_bytes:,} bytes) | {c.bpw:.3f} | {c.n_params:,} | "
           f"{c.method.upper()} | {c.est_kl:.4g} |", ""]
    out += ["## Mix by tensor class", "", "| class | types | bytes |", "|---|---|---:|"]
    out += [f"| {cls} | {ts} | {_mb(b)} |" for cls, ts, b in mix_by_class(c.types, c.nbytes)]
    out += ["", "## Calibration", "",
            f"- text: {c.calibration.get('file') or 'wikitext-2 valid (shipped with quantkit)'}",
            f"- GPTQ: {c.calibration.get('nsamples')} x {c.calibration.get('seqlen')} tokens"
            if c.method == "gptq" else "- weights: round to nearest (no calibration)",
            f"- sensitivity: {c.calibration.get('sens_nsamples')} x {c.calibration.get('seqlen')} tokens "
            "(Hessians), probes on the first calibration samples"]
    if c.checks:
        out += ["", "## Measured check of the mix", "",
                "The allocation's mix and its runner-ups under the same budget, each measured as a whole (KL on "
                "the calibration's probe tokens, round to nearest); the least measured is this file:", "",
                "| candidate | size | estimated KL | measured KL |", "|---|---:|---:|---:|"]
        out += [_check_row(k) for k in c.checks]
    if c.evaluation:
        out += ["", "## Measured quality", "", "Against the unquantized model (quantkit eval, llama.cpp runtime):", "",
                "| text | KL divergence | perplexity | top-1 agreement |", "|---|---:|---:|---:|"]
        out += [f"| {e.get('text')} | {e.get('kld', float('nan')):.5f} | {e.get('ppl', float('nan')):.3f} | "
                f"{e.get('top1', float('nan')):.4f} |" for e in c.evaluation]
    if c.planner:
        p = c.planner
        out += ["", f"## On {p.get('device')}", "",
                f"quantkit's planner, llama.cpp ({p.get('runtime') or 'llama-cpp-python'}) at context {p.get('n_ctx')} (KV cache {p.get('kv_type', 'f16')}):", "",
                "| memory needed | device memory | KV cache | decode (expected) |", "|---:|---:|---:|---:|",
                f"| {_gib(p.get('needed', 0))} | {_gib(p.get('available', 0))} | {_gib(p.get('kv', 0))} | "
                f"{p.get('decode') or 'n/a'} |"]
    out += ["", "## How it was made", "", "```", c.command, "```"]
    if c.notes:
        out += ["", "Notes:", ""] + [f"- {n}" for n in c.notes]
    return "\n".join(out) + "\n"


def card_path(gguf_path: str) -> str:
    """README.md beside the file, unless a README.md quantkit did not write is there: then
    FILE.README.md."""
    d = os.path.dirname(os.path.abspath(gguf_path))
    p = os.path.join(d, "README.md")
    if os.path.exists(p):
        try:
            with open(p, encoding="utf-8") as f:
                if MARK not in f.read(4096):
                    return os.path.splitext(os.path.abspath(gguf_path))[0] + ".README.md"
        except (OSError, UnicodeDecodeError):
            return os.path.splitext(os.path.abspath(gguf_path))[0] + ".README.md"
    return p


def write_text(path: str, text: str) -> str:
    from ..util.atomic import atomic_output
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def provided_files(rows: list[dict]) -> str:
    """The table GGUF repositories publish: file, method, bits, size, max RAM needed, use case.
    rows: file, method, bpw, bytes, max_ram (bytes), kld (optional)."""
    out = ["| file | method | bits | size | max RAM needed | use case |", "|---|---|---:|---:|---:|---|"]
    ranked = sorted(rows, key=lambda r: r["bytes"])
    for i, r in enumerate(ranked):
        use = ("smallest; quality loss noticeable" if i == 0 and len(ranked) > 1 else
               "largest; closest to the original" if i == len(ranked) - 1 and len(ranked) > 1 else "balanced")
        if r.get("kld") is not None:
            use += f" (KL {r['kld']:.4f})"
        out.append(f"| {r['file']} | {r['method']} | {r['bpw']:.2f} | {_mb(r['bytes'])} | "
                   f"{_gib(r['max_ram']) if r.get('max_ram') else 'n/a'} | {use} |")
    return "\n".join(out) + "\n"


def budget_card(model_path: str, output: str, budget, recipe, sens, mix, planner: dict | None,
                scores: list[dict] | None, command: str | None, seconds: dict) -> str:
    """Write the card of a budgeted file (quant.budget's MixPlan `mix`, quant.sensitivity's
    `sens`, the recipe's calibration) beside it; returns the card's path."""
    from ..quant.budget import tensor_bytes
    cal = recipe.calibration
    if command is None:
        flags = budget.flags() + (["--method", "gptq", "--nsamples", str(cal.nsamples), "--seqlen", str(cal.seqlen)]
                                  if recipe.method == "gptq" else [])
        flags += ["--calib", cal.file] if cal.file else []
        command = " ".join(["quantkit", "quantize", model_path, "-o", output] + flags)
    info = CardInfo(os.path.basename(model_path), os.path.basename(output), recipe.method, " ".join(budget.flags()),
                    os.path.getsize(output), mix.bpw(sens.n_params()), sens.n_params(), dict(mix.types),
                    {n: tensor_bytes(t, s) for n, s, t in mix.plan}, mix.est_kl,
                    {"file": cal.file, "nsamples": cal.nsamples, "seqlen": cal.seqlen,
                     "sens_nsamples": sens.meta.get("nsamples")},
                    command, list(mix.notes), scores or [], planner, seconds, list(getattr(mix, "checks", [])))
    return write_text(card_path(output), render_card(info))
