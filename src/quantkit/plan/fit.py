"""The bytes a device leaves for a model's weights (quantize --fit DEVICE), and the largest budget
that fits (plan --device).

    budget = memory the device offers (the planner's cell: VRAM, or RAM for a CPU)
             - KV cache at the context (kv_type, sliding-window layers as llama.cpp sizes them)
             - compute buffer - output buffer - runtime overhead (+ the CUDA context per GPU)

All of it from plan.memory / plan.planner (the llama.cpp runtime), the same numbers `quantkit
plan` prints. On a GPU every weight is counted on the device (the planner keeps the token
embedding in RAM, so this is on the safe side). On a CPU the budget is the device's memory less
what the planner's peak resident memory of the named front end (llama-cpp-python, the default, or
llama-server) holds besides the weights at a full context: its process, the KV cache, the touched
compute pages and work buffer, output buffer, sampler and vocabulary (memory.cpu_resident_parts).
ggml-cpu's repacked copies of q4_0 / q4_k / iq4_nl tensors are the mix's own and not in `other`:
on a CPU they count twice against the budget (cpu_weight_bytes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..util.errors import QuantkitError
from . import hardware, memory
from .model import ModelShape, load


@dataclass
class FitBudget:
    device: str
    n_ctx: int
    kv_type: str
    available: int            # bytes the device offers
    kv: int
    compute: int
    other: int                # output buffer, runtime overhead, CUDA context (CPU: the rest of the RSS)
    weights: int              # what is left for the weights (may be negative)
    runtime: str = "llama-cpp-python"

    def to_dict(self) -> dict:
        return asdict(self)


def _shape(model) -> ModelShape:
    return model if isinstance(model, ModelShape) else load(str(model))


def fit_budget(model, device: str, n_ctx: int | None = None, kv_type: str = "f16",
               ram_gb: float | None = None, runtime: str = "llama-cpp-python") -> FitBudget:
    """What DEVICE leaves for MODEL's weights at context n_ctx (None: the trained context), with
    the llama.cpp front end `runtime` (its resident memory on a CPU device)."""
    from .planner import PlanOptions, plan
    m = _shape(model)
    ctx = n_ctx or m.n_ctx_train or 4096
    d = hardware.device(device)             # an unknown device: one line naming the nearest names
    proc = memory.llama_process(runtime)
    p = plan(m, PlanOptions(devices=[device], n_ctx=ctx, kv_type=kv_type, formats=["f16"], ram_gb=ram_gb,
                            runtime=proc.name))
    inf, cell = p.rows[0].memory, p.rows[0].cells[0]
    if d.kind == "cpu":
        parts = memory.cpu_resident_parts(m, inf, ctx, proc.name)
        kv, compute = parts.pop("kv"), parts.pop("compute_touched") + parts.pop("work")
        parts.pop("weights"), parts.pop("repack")
        other = sum(parts.values())
    else:
        kv, compute = inf.kv, inf.compute
        other = inf.output + inf.overhead_cpu + (d.count * memory.CUDA_CONTEXT if d.is_gpu else 0)
    weights = cell.memory_available - kv - compute - other
    return FitBudget(d.name, ctx, kv_type, cell.memory_available, kv, compute, other, weights, proc.name)


def cpu_weight_bytes(tensors) -> int:
    """What a mix's tensors hold resident on a CPU: their bytes, plus ggml-cpu's repacked copy of
    each q4_0 / q4_k / iq4_nl matrix (memory.cpu_repack_bytes)."""
    return sum(t.nbytes for t in tensors) + memory.cpu_repack_bytes(list(tensors))


def largest_context(model, device: str, need_weights: int, kv_type: str = "f16",
                    ram_gb: float | None = None, runtime: str = "llama-cpp-python") -> int | None:
    """The largest context (a power of two up to the trained one, or the trained one) at which
    DEVICE still leaves `need_weights` bytes for weights; None when not even 256 does."""
    m = _shape(model)
    top = m.n_ctx_train or 4096
    best = None
    c = 256
    while c <= top:
        if fit_budget(m, device, c, kv_type, ram_gb, runtime).weights >= need_weights:
            best = c
        c *= 2
    if best is not None and best < top and fit_budget(m, device, top, kv_type, ram_gb, runtime).weights >= need_weights:
        best = top
    return best


def check_fit(model, device: str, n_ctx: int | None, kv_type: str, smallest_weights: int,
              ram_gb: float | None = None, runtime: str = "llama-cpp-python") -> FitBudget:
    """fit_budget, or one line when not even the smallest file fits: without --ctx, which
    context would."""
    fb = fit_budget(model, device, n_ctx, kv_type, ram_gb, runtime)
    if fb.weights >= smallest_weights:
        return fb
    gib = lambda b: f"{b / memory.GIB:.2f} GiB"  # noqa: E731
    ok = largest_context(model, device, smallest_weights, kv_type, ram_gb, runtime)
    where = f"at context {fb.n_ctx}" + ("" if n_ctx else " (the model's trained context)")
    if ok is not None:
        raise QuantkitError(f"--fit {device}: {where} the KV cache ({gib(fb.kv)}) and buffers leave {gib(fb.weights)} "
                            f"for weights, below the smallest file ({gib(smallest_weights)})",
                            hint=f"give --ctx {ok} (the largest context at which it fits)")
    raise QuantkitError(f"--fit {device}: the device leaves {gib(fb.weights)} for weights {where}, below the smallest "
                        f"file ({gib(smallest_weights)}), at any context", hint="pick a larger device")


def largest_budgets(model, model_arg: str, devices: list[str], n_ctx: int, kv_type: str = "f16",
                    ram_gb: float | None = None, runtime: str = "llama-cpp-python") -> list[dict]:
    """Per device (llama.cpp): the largest weight budget at n_ctx, as bytes and bits per weight,
    and the `quantkit quantize` command that makes the file (plan --device)."""
    import shlex
    m = _shape(model)
    out = []
    for d in devices:
        fb = fit_budget(m, d, n_ctx, kv_type, ram_gb, runtime)
        bpw = fb.weights * 8 / max(1, m.n_params)
        stem = shlex.quote(str(model_arg).rstrip("/").rsplit("/", 1)[-1].removesuffix(".gguf") + f"-{fb.device}.gguf")
        cmd = (f"quantkit quantize {shlex.quote(str(model_arg))} --fit {shlex.quote(d)} --ctx {n_ctx}"
               + (f" --kv-type {kv_type}" if kv_type != "f16" else "") + f" --method gptq -o {stem}")
        out.append({"device": fb.device, "n_ctx": n_ctx, "weights_bytes": fb.weights, "bpw": bpw,
                    "fits": fb.weights > 0, "command": cmd, "runtime": fb.runtime})
    return out


def render_budgets(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        if not r["fits"]:
            lines.append(f"Largest budget on {r['device']} at context {r['n_ctx']}: none (the KV cache and buffers "
                         "alone do not fit; try a smaller --ctx)")
            continue
        lines.append(f"Largest budget on {r['device']} at context {r['n_ctx']}: {r['weights_bytes'] / memory.GIB:.2f} "
                     f"GiB of weights ({r['bpw']:.2f} bits per weight" + (", F16 fits" if r["bpw"] >= 16 else "")
                     + f"); make it with: {r['command']}")
    return lines
