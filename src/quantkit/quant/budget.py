"""A GGUF under a byte budget: per-tensor types chosen by quant.allocate on quant.sensitivity's
estimates, written by round to nearest or by GPTQ onto each tensor's own grid.

Budgets (`Budget`):
    bpw B        bits per weight over the whole file as llama.cpp counts it (tensor bytes x 8 /
                 parameters): tensor bytes <= B x parameters / 8
    size S       the file's bytes (header, metadata and tensors) <= S
    fit DEVICE   what quantkit's planner (plan.planner) leaves for weights on DEVICE after the KV
                 cache at the context, the compute buffer and the runtime's overhead (resolved
                 by the caller, which passes the bytes: quant sits below plan)

In a recipe: gguf:bpw4.5[+gptq], gguf:size=300MB[+gptq] (see `parse_budget_spec`).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

from ..codecs.registry import qtype
from ..util.errors import QuantkitError
from .allocate import Allocation, Infeasible, Option, allocate, largest_total, smallest_total
from .sensitivity import Sensitivity

ALIGN = 32
HEADER_SLACK = 4096              # keys the writer adds (architecture, file type, versions, alignment)
SIZE_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
              "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*")
MAX_BPW = 32.0
FIT_RUNTIMES = ("llama-cpp-python", "llama-server")      # the first is the default


def parse_size(text, flag: str = "--target-size") -> int:
    """"2.5GB" -> 2_500_000_000, "300MiB" -> 314572800, "123456" -> bytes."""
    m = _SIZE.fullmatch(str(text).lower())
    if not m or m.group(2) not in SIZE_UNITS:
        raise QuantkitError(f"{flag} '{text}' is not a size", hint="write bytes with a unit, e.g. 2.5GB, 300MB, 800MiB")
    n = int(float(m.group(1)) * SIZE_UNITS[m.group(2)])
    if n <= 0:
        raise QuantkitError(f"{flag} '{text}' is not a positive size", hint="e.g. 2.5GB")
    return n


def format_size(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


@dataclass(frozen=True)
class Budget:
    kind: str                      # "bpw" | "size" | "fit"
    value: float = 0.0             # bpw: bits per weight; size: bytes
    device: str | None = None      # fit
    n_ctx: int | None = None       # fit: None is the model's trained context
    kv_type: str = "f16"           # fit
    runtime: str = "llama-cpp-python"   # fit: the llama.cpp front end (llama-cpp-python or llama-server)

    def __post_init__(self):
        if self.kind not in ("bpw", "size", "fit"):
            raise QuantkitError(f"unknown budget kind '{self.kind}'", hint="bpw, size or fit")
        if self.kind == "bpw" and not (0 < float(self.value) <= MAX_BPW):
            raise QuantkitError(f"--target-bpw {self.value} is out of range", hint=f"bits per weight, 0 to {MAX_BPW:g}")
        if self.kind == "fit" and not self.device:
            raise QuantkitError("--fit needs a device", hint="e.g. --fit rtx-3060 (quantkit plan --list-devices)")
        if self.runtime not in FIT_RUNTIMES:
            raise QuantkitError(f"--runtime {self.runtime} is not a llama.cpp front end the planner sizes",
                                hint=" or ".join(FIT_RUNTIMES))

    def spelling(self) -> str:
        """As a recipe rung writes it: bpw4.5, size=300MB, fit=rtx-3060."""
        if self.kind == "bpw":
            return f"bpw{self.value:g}"
        if self.kind == "size":
            return f"size={int(self.value)}"
        return f"fit={self.device}" + (f"@{self.n_ctx}" if self.n_ctx else "")

    def flags(self) -> list[str]:
        if self.kind == "bpw":
            return ["--target-bpw", f"{self.value:g}"]
        if self.kind == "size":
            return ["--target-size", str(int(self.value))]
        return ["--fit", self.device] + (["--ctx", str(self.n_ctx)] if self.n_ctx else []) + \
            (["--kv-type", self.kv_type] if self.kv_type != "f16" else []) + \
            (["--runtime", self.runtime] if self.runtime != FIT_RUNTIMES[0] else [])


def parse_budget_spec(spec: str) -> Budget | None:
    """The SPEC of a budget rung: "bpw4.5", "size=300MB", "fit=rtx-3060[@8192]"; None when the
    spec is not a budget (a llama.cpp file type)."""
    s = spec.strip().lower()
    m = re.fullmatch(r"bpw=?([0-9]*\.?[0-9]+)", s)
    if m:
        return Budget("bpw", float(m.group(1)))
    if s.startswith("size="):
        return Budget("size", parse_size(s[5:], "recipe size="))
    if s.startswith("fit="):
        dev, _, ctx = s[4:].partition("@")
        return Budget("fit", device=dev, n_ctx=int(ctx) if ctx.isdigit() else None)
    return None


def budget_from_flags(target_bpw=None, target_size=None, fit=None, ctx=None, kv_type=None,
                      runtime=None) -> Budget | None:
    """The budget the flags name (None: no budget); two budgets at once is an error. `runtime`
    (with fit): the llama.cpp front end whose memory the planner leaves room for."""
    given = [f for f, v in (("--target-bpw", target_bpw), ("--target-size", target_size), ("--fit", fit)) if v is not None]
    if len(given) > 1:
        raise QuantkitError(f"{' and '.join(given)} are two budgets", hint="give one of --target-bpw, --target-size, --fit")
    if not given:
        if ctx is not None or kv_type is not None:
            raise QuantkitError("--ctx and --kv-type size the KV cache of --fit DEVICE", hint="add --fit DEVICE")
        if runtime is not None:
            raise QuantkitError("--runtime names the front end --fit DEVICE leaves room for", hint="add --fit DEVICE")
        return None
    if runtime is not None and fit is None:
        raise QuantkitError("--runtime names the front end --fit DEVICE leaves room for", hint="drop --runtime, or use --fit")
    if target_bpw is not None:
        try:
            return Budget("bpw", float(target_bpw))
        except (TypeError, ValueError):
            raise QuantkitError(f"--target-bpw '{target_bpw}' is not a number", hint="e.g. --target-bpw 4.5") from None
    if target_size is not None:
        return Budget("size", parse_size(target_size))
    return Budget("fit", device=str(fit), n_ctx=int(ctx) if ctx is not None else None, kv_type=kv_type or "f16",
                  runtime=runtime or FIT_RUNTIMES[0])


def _string_bytes(s) -> int:
    return 8 + len(str(s).encode("utf-8"))


def _value_bytes(v, vtype, sub_type) -> int:
    from gguf import GGUFValueType as T
    scalar = {T.UINT8: 1, T.INT8: 1, T.UINT16: 2, T.INT16: 2, T.UINT32: 4, T.INT32: 4, T.FLOAT32: 4, T.BOOL: 1,
              T.UINT64: 8, T.INT64: 8, T.FLOAT64: 8}
    if vtype == T.STRING:
        return _string_bytes(v)
    if vtype == T.ARRAY:
        if sub_type == T.STRING:
            return 12 + sum(_string_bytes(x) for x in v)
        return 12 + scalar.get(sub_type, 8) * len(v)
    return scalar.get(vtype, 8)


def header_bytes(metadata: dict, tensors: list[tuple[str, tuple[int, ...]]]) -> int:
    """A GGUF's bytes before its tensor data: header, key/values, tensor infos, padding (plus
    HEADER_SLACK for the keys the writer adds)."""
    n = 24
    for key, mv in metadata.items():
        n += _string_bytes(key) + 4 + _value_bytes(mv.value, mv.vtype, mv.sub_type)
    for name, shape in tensors:
        n += _string_bytes(name) + 4 + 8 * len(shape) + 4 + 8
    return -(-n // ALIGN) * ALIGN + HEADER_SLACK


def tensor_bytes(type_name: str, shape) -> int:
    return -(-qtype(type_name).nbytes(tuple(shape)) // ALIGN) * ALIGN


@dataclass
class MixPlan:
    plan: list[tuple[str, tuple[int, ...], str]]      # (name, shape, type) in file order
    file_bytes: int                                   # expected size of the file (header estimate)
    tensor_bytes: int                                 # tensor data (llama.cpp's "model size")
    budget_bytes: int                                 # the file-size budget it was solved for
    est_kl: float                                     # the summed estimate
    notes: list[str] = field(default_factory=list)
    allocation: Allocation | None = None
    checks: list[dict] = field(default_factory=list)  # the measured check's candidates (quant.budget_check)

    @property
    def types(self) -> dict[str, str]:
        return {n: t for n, _, t in self.plan}

    def bpw(self, n_params: int) -> float:
        return self.tensor_bytes * 8 / max(1, n_params)


def file_budget(budget: Budget, sens: Sensitivity, header: int, fit_bytes: int | None = None) -> int:
    """The budget in file bytes: bpw budgets count tensor bytes (header added), size budgets the
    file, fit budgets what the planner left (`fit_bytes`, weights only)."""
    if budget.kind == "bpw":
        return int(budget.value * sens.n_params() / 8) + header
    if budget.kind == "size":
        return int(budget.value)
    if fit_bytes is None:
        raise QuantkitError("--fit needs the planner's budget", hint="call through quantkit.api.quantize")
    return int(fit_bytes) + header


def smallest_weights(sens: Sensitivity) -> int:
    """Tensor bytes of the smallest file: every tensor at its smallest candidate."""
    return sum(tensor_bytes(t, s) for s, t in sens.fixed.values()) + \
        sum(min(tensor_bytes(t, c.shape) for t in c.costs) for c in sens.tensors.values())


def plan_mix(sens: Sensitivity, budget: Budget, metadata: dict, fit_bytes: int | None = None,
             restrict: dict[str, set[str]] | None = None) -> MixPlan:
    """The least-estimated-KL choice of types whose file fits the budget. Raises a
    QuantkitError naming the smallest possible file when none fits; above the all-F16 file, the
    F16 file with a note. `fit_bytes`: a fit budget's bytes for weights (plan.fit). `restrict`:
    tensor name -> the only types it may take (the runner-ups of quant.budget_check)."""
    header = header_bytes(metadata, [(n, s) for n, (s, _) in sens.fixed.items()]
                          + [(n, c.shape) for n, c in sens.tensors.items()])
    budget_file_bytes = file_budget(budget, sens, header, fit_bytes)
    what = {"bpw": f"--target-bpw {budget.value:g}", "size": f"--target-size {format_size(int(budget.value))}",
            "fit": f"--fit {budget.device}"}[budget.kind]
    fixed = sum(tensor_bytes(t, s) for s, t in sens.fixed.values())
    items = {n: [Option(t, tensor_bytes(t, c.shape), cost) for t, cost in c.costs.items()
                 if restrict is None or n not in restrict or t in restrict[n]]
             for n, c in sens.tensors.items()}
    room = budget_file_bytes - header - fixed
    notes = []
    try:
        alloc = allocate(items, room)
    except Infeasible as e:
        smallest = e.smallest + header + fixed
        n_params = sens.n_params()
        bpw = (e.smallest + fixed) * 8 / n_params
        raise QuantkitError(f"{what} ({format_size(budget_file_bytes)} file) is below the smallest file this model "
                            f"can be: {format_size(smallest)} ({bpw:.2f} bits per weight, every tensor at its "
                            "smallest type)", hint=f"give --target-size {math.ceil(smallest / 1e6)}MB or "
                                                   f"--target-bpw {math.ceil(bpw * 100) / 100:.2f} or more") from None
    if room >= largest_total(items):
        notes.append(f"the budget holds every tensor at F16 ({format_size(largest_total(items) + header + fixed)}): "
                     "this is the F16 file")
    assert alloc.nbytes <= room and smallest_total(items) <= room
    plan = []
    for n in sens.order:
        if n in sens.fixed:
            plan.append((n, sens.fixed[n][0], sens.fixed[n][1]))
        elif n in sens.tensors:
            plan.append((n, sens.tensors[n].shape, alloc.choice[n]))
    return MixPlan(plan, header + fixed + alloc.nbytes, fixed + alloc.nbytes, budget_file_bytes, alloc.cost,
                   notes, alloc)


def mix_file_type(plan: list[tuple[str, tuple[int, ...], str]]) -> str:
    """The llama.cpp file type written in the header (general.file_type): the one named after
    the type that holds the most bytes."""
    from .gguf_policy import FILE_TYPES
    by: dict[str, int] = {}
    for _, shape, t in plan:
        by[t] = by.get(t, 0) + qtype(t).nbytes(shape)
    for t, _ in sorted(by.items(), key=lambda kv: -kv[1]):
        for ft in (t, f"{t}_m"):
            if ft in FILE_TYPES:
                return ft
    return "f16"


def check_written(path: str, mix: MixPlan) -> None:
    """The budget is never exceeded: a file over it is removed and reported."""
    size = os.path.getsize(path)
    if size > mix.budget_bytes:
        os.unlink(path)
        raise QuantkitError(f"the written file is {size - mix.budget_bytes} bytes over the budget "
                            f"({size} > {mix.budget_bytes}); removed", path,
                            "report this: the header estimate is short; give a slightly smaller budget")


_RUNG = re.compile(r"(?:gguf:)?((?:bpw=?[0-9.]+)|(?:size=[^+]+)|(?:fit=[^+]+))(?:\+(rtn|gptq))?")


def split_budget_rung(text: str) -> tuple[Budget, str] | None:
    """A budget in the recipe grammar, FORMAT:SPEC[+METHOD] with a budget for SPEC:
    "gguf:bpw4.5+gptq", "gguf:size=300MB", "fit=rtx-3060@8192+gptq" (gguf: may be left out) ->
    (Budget, method); None for any other recipe."""
    m = _RUNG.fullmatch(str(text).strip().lower())
    if not m:
        return None
    return parse_budget_spec(m.group(1)), m.group(2) or "rtn"


def rung_spelling(budget: Budget, method: str) -> str:
    return f"gguf:{budget.spelling()}" + ("" if method == "rtn" else f"+{method}")


def resolve_budget(budget, format, method):  # noqa: A002
    """(Budget, method or None) from quantkit.api.quantize_budget's budget (a Budget or a rung string such as
    "gguf:size=300MB+gptq") and format (None, or a budget rung) arguments."""
    found = []
    for what in (budget, format):
        if isinstance(what, Budget):
            found.append((what, None))
        elif what is not None:
            rung = split_budget_rung(what)
            if rung is None:
                if what is format:
                    raise QuantkitError(f"--format {format} names one llama.cpp mix; a budget chooses a type per "
                                        "tensor", hint="leave --format out (add --method gptq for GPTQ), or drop "
                                                       "the budget")
                raise QuantkitError(f"budget '{what}' does not parse",
                                    hint="gguf:bpw4.5, gguf:size=300MB or gguf:fit=DEVICE, +gptq for GPTQ")
            found.append((rung[0], rung[1] if "+" in str(what) else None))
    if not found:
        raise QuantkitError("no budget given", hint="--target-bpw B, --target-size SIZE or --fit DEVICE")
    if len(found) == 2 and found[0][0] != found[1][0]:
        raise QuantkitError(f"--format {format} and the budget flags name two budgets", hint="give one")
    said = [m for _, m in found if m is not None]
    if method is not None and said and said[0] != method:
        raise QuantkitError(f"--method {method} contradicts +{said[0]}", hint="say the method once")
    return found[0][0], method or (said[0] if said else None)

