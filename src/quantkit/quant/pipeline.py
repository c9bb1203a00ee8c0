"""Block-sequential quantization of a Hugging Face decoder (the dense architectures of models.arch).

1. Capture: every decoder layer is swapped for a recorder that stores the keyword arguments the
   model passes to it (attention mask, rotary position embeddings, per-layer-type masks for
   sliding-window models) and hands its input through unchanged; one forward of the base model
   per calibration sample then yields block 0's inputs and every block's arguments, with the
   model's own code building masks and rotary tables. No exception stops the forward: the
   identity layers cost nothing.
2. Per block: Hessian hooks on the block's linears, true-sequential (q/k/v; o; gate/up; down:
   each group calibrated on inputs produced by the already-quantized groups before it); each
   calibration pass ends where its last input is recorded, the rest of the block replaced by
   stand-ins that return zeros (no exception either); GPTQ (or RTN); weights replaced by their
   dequantized values; the block re-run to produce the next block's inputs; `on_block` called
   so the caller (quant.driver's sinks) can write the block's tensors and free it.

Linears that share an input (q/k/v, gate/up) share one Hessian.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..util.errors import QuantkitError
from ..util.memory import trim
from ..util.progress import progress
from .gptq import GPTQConfig, accumulate_hessian, new_hessian, quantize_weight, symmetrize_hessian
from .rtn import QuantSpec, quantize_rtn

# Inside a decoder block: groups of linears sharing an input, in data-flow order.
# Fused projections (Phi-3's qkv_proj and gate_up_proj, GLM-4's gate_up_proj) and Phi-2's names
# (dense, fc1, fc2) take the place of the split ones.
SEQUENTIAL_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.qkv_proj",),
    ("self_attn.o_proj",),
    ("self_attn.dense",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.gate_up_proj",),
    ("mlp.fc1",),
    ("mlp.down_proj",),
    ("mlp.fc2",),
)
METHODS = ("gptq", "rtn", "none")


@dataclass(frozen=True)
class PipelineConfig:
    method: str = "gptq"                       # "gptq" | "rtn" | "none" (no quantization)
    # integer grid, a llama.cpp type ("q4_0", "q4_k"), or a function of the linear's full name
    # returning one of those (None: leave that linear unquantized)
    grid: QuantSpec | str | Callable[[str], QuantSpec | str | None] = QuantSpec()
    gptq: GPTQConfig = GPTQConfig()
    true_sequential: bool = True               # False: every linear calibrated on the block's float inputs
    # true-sequential GPTQ: take the attention's and the MLP's outputs from the inputs the o_proj and
    # down_proj stages saw (one block forward in all) instead of re-running them (same values)
    reuse_outputs: bool = True
    # a block's sparse MLP (mixture of experts), after its other linears: (layer, prefix, hidden,
    # kwargs, config, report, done) -> True when it quantized the experts and wrote the block's
    # outputs over `hidden` (quant.moe.quantize_experts); False for a dense block
    sparse_mlp: Callable | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")


@dataclass
class BlockInputs:
    hidden: list[torch.Tensor]                 # per calibration sample: [1, seqlen, hidden]
    layer_kwargs: list[dict]                   # per decoder layer: the keyword arguments it receives


@dataclass
class PipelineReport:
    seconds: float = 0.0
    damp: dict[str, float] = field(default_factory=dict)      # per linear, GPTQ only
    loss: dict[str, float] = field(default_factory=dict)      # per solved matrix ("a, b, c" when stacked)
    final_hidden: list[torch.Tensor] | None = None            # the last block's outputs (before the final norm)
    phases: dict[str, float] = field(default_factory=dict)    # seconds: capture, load, hessians, solve, propagate, write
    workers: list[dict] = field(default_factory=list)         # per Ray worker (quant.distributed): peak RSS, seconds
    experts: dict[str, dict] = field(default_factory=dict)    # per MoE layer: tokens per expert, safeguarded (quant.moe)

    def _add(self, phase: str, t0: float) -> float:
        t = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + t - t0
        return t


def decoder_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList, str]:
    """(base model, its decoder layer list, the layers' name prefix) of a causal LM."""
    for prefix in ("model.layers", "model.language_model.layers", "layers"):
        obj = model
        parent = None
        for part in prefix.split("."):
            parent, obj = obj, getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return parent, obj, prefix
    raise QuantkitError(f"no decoder layers found in {type(model).__name__}",
                        hint="quantkit quantizes decoder-only models whose blocks are model.layers")


class _Recorder(nn.Module):
    """Stands in for a decoder layer during capture: records its inputs, returns them unchanged."""

    def __init__(self, index: int, attention_type: str | None, sink: "_Capture"):
        super().__init__()
        self.index = index
        if attention_type is not None:
            self.attention_type = attention_type
        self.sink = sink

    def forward(self, hidden_states, *args, **kwargs):
        if self.index == 0:
            self.sink.hidden.append(hidden_states.detach())
        if len(self.sink.kwargs) <= self.index:
            kw = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
            self.sink.kwargs.append(kw)
        return hidden_states


@dataclass
class _Capture:
    hidden: list = field(default_factory=list)
    kwargs: list = field(default_factory=list)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, input_ids: torch.Tensor) -> BlockInputs:
    """Block 0's input for each row of input_ids [n, seqlen], and every block's kwargs."""
    base, layers, _ = decoder_layers(model)
    sink = _Capture()
    original = list(layers)
    recorders = [_Recorder(i, getattr(layer, "attention_type", None), sink) for i, layer in enumerate(original)]
    for i, r in enumerate(recorders):
        layers[i] = r
    try:
        for row in input_ids:
            base(input_ids=row[None], use_cache=False)
    finally:
        for i, layer in enumerate(original):
            layers[i] = layer
    return BlockInputs(sink.hidden, sink.kwargs)


def _out(o):
    return o[0] if isinstance(o, tuple) else o


@torch.no_grad()
def run_block(layer: nn.Module, hidden: list[torch.Tensor], kwargs: dict) -> list[torch.Tensor]:
    return [_out(layer(h, **kwargs)) for h in hidden]


def _linears(layer: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}


def _groups(layer: nn.Module) -> list[tuple[str, ...]]:
    lin = _linears(layer)
    groups = [tuple(n for n in g if n in lin) for g in SEQUENTIAL_GROUPS]
    groups = [g for g in groups if g]
    covered = {n for g in groups for n in g}
    missing = sorted(set(lin) - covered)
    if missing:
        raise QuantkitError(f"decoder block has linear layers quantkit does not know the order of: {', '.join(missing)}",
                            hint="the block's linears are not those of a supported architecture")
    return groups


def _grid_of(cfg: PipelineConfig, name: str):
    return cfg.grid(name) if callable(cfg.grid) else cfg.grid


def solve(name: str, W: torch.Tensor, H: torch.Tensor | None, grid, cfg: PipelineConfig):
    """(stored form, dequantized weight, damp or None, loss or None) of one matrix: GPTQ on H,
    or RTN. `name` labels the error."""
    try:
        if cfg.method == "rtn":
            if not isinstance(grid, QuantSpec):
                raise ValueError("RTN onto llama.cpp grids is the GGUF exporter's job (quant.gguf_export)")
            qw = quantize_rtn(W, grid)
            return qw, qw.dequantize(), None, None
        res = quantize_weight(W, H, grid, cfg.gptq)
    except ValueError as e:
        raise QuantkitError(f"cannot quantize {name}: {e}") from None
    return res.weight, res.dequantized, res.damp, res.loss


def group_solves(lp: str, names: tuple[str, ...], cfg: PipelineConfig) -> list[tuple[object, list[str]]]:
    """The matrices a group of linears sharing an input is solved as: (grid, member names), one
    per grid (linears without a grid are left out). Those on the same grid are solved as one
    matrix, their rows stacked: every grid here is per row and GPTQ's updates act on each row
    alone, so the result is the same as one call per linear, with one Hessian factorisation
    and larger, faster products."""
    by_grid: dict[object, list[str]] = {}
    for name in names:
        grid = _grid_of(cfg, f"{lp}.{name}")
        if grid is not None:
            by_grid.setdefault(grid, []).append(name)
    return list(by_grid.items())


def stacked_weight(lin: dict[str, nn.Linear], members: list[str]) -> torch.Tensor:
    Ws = [lin[n].weight.data for n in members]
    return torch.cat(Ws) if len(Ws) > 1 else Ws[0]


def apply_solution(lp: str, members: list[str], lin: dict[str, nn.Linear], solution, report: PipelineReport,
                   done: dict) -> dict[str, torch.Tensor]:
    """Put a solved matrix (`solve`'s result for `members`, stacked) into the linears: weights
    replaced by their dequantized values, stored forms into `done`, damp and loss into the
    report. Returns the dequantized weight per member name."""
    qw, deq, damp, loss = solution
    label = ", ".join(f"{lp}.{n}" for n in members)
    if damp is not None:
        report.damp[label] = damp
        report.loss[label] = loss
    rows = [lin[n].weight.shape[0] for n in members]
    parts = qw.split_rows(rows) if len(members) > 1 else [qw]
    out = {}
    for n, part, d in zip(members, parts, deq.split(rows)):
        lin[n].weight.data = out[n] = d.to(lin[n].weight.dtype).contiguous()
        done[f"{lp}.{n}"] = part
        report.damp[f"{lp}.{n}"] = report.damp.get(label, 0.0)
    if len(members) > 1:                 # damp per linear; the loss stays per solved matrix
        report.damp.pop(label, None)
    return out


def _quantize_group(lp: str, names: tuple[str, ...], lin: dict[str, nn.Linear], H, cfg: PipelineConfig,
                    report: PipelineReport, done: dict) -> None:
    """Quantize the linears of a group that share an input (and so one Hessian)."""
    for grid, members in group_solves(lp, names, cfg):
        label = ", ".join(f"{lp}.{n}" for n in members)
        apply_solution(lp, members, lin, solve(label, stacked_weight(lin, members), H, grid, cfg), report, done)


@torch.no_grad()
def quantize_model(model: nn.Module, input_ids: torch.Tensor | None, cfg: PipelineConfig,
                   on_block: Callable[[int, str, nn.Module, dict], None] | None = None,
                   show_progress: bool = True,
                   load_block: Callable[[int, str, nn.Module], None] | None = None) -> PipelineReport:
    """Quantize every linear of every decoder block of `model` in place (weights replaced by
    their dequantized values) and call on_block(index, prefix, layer, {linear name: quantized
    weight}) after each block. input_ids [n, seqlen]: calibration (GPTQ, and method "none" to
    propagate); RTN needs none.

    Streaming: with `load_block(index, prefix, layer)`, the decoder blocks' weights are not in
    memory to begin with (only what runs before block 0, the embeddings); each block is loaded
    just before it is quantized and its storage released (moved to the meta device) once
    on_block has written it, so peak memory is one block plus the calibration activations."""
    t0 = time.perf_counter()
    report = PipelineReport()
    _, layers, prefix = decoder_layers(model)
    if cfg.method == "gptq" and input_ids is None:
        raise QuantkitError("GPTQ needs calibration data", hint="pass --calib FILE or use --method rtn")
    need_data = cfg.method == "gptq" or (cfg.method == "none" and input_ids is not None)
    inputs = capture_block_inputs(model, input_ids) if need_data else None
    # every block's inputs, then outputs, in one buffer [n, 1, seqlen, hidden], overwritten block by block
    hidden = list(torch.stack(inputs.hidden).unbind(0)) if inputs else None
    if inputs:
        inputs.hidden = None
    if load_block is not None:               # streaming: the embeddings' work is done (callers
        for mod in model.modules():           # write them from the source, not from the model)
            if isinstance(mod, nn.Embedding):
                mod.to("meta")
    t = report._add("capture", t0)
    what = "forward" if cfg.method == "none" else cfg.method        # "none": a statistics pass (imatrix)
    bar = progress(total=len(layers), desc=f"{what} blocks", unit="block", leave=False) if show_progress else None
    try:
        for i, layer in enumerate(layers):
            lp = f"{prefix}.{i}"
            if load_block is not None:
                load_block(i, lp, layer)
                t = report._add("load", t)
            done: dict[str, object] = {}
            t = _quantize_block(layer, lp, hidden, inputs.layer_kwargs[i] if inputs else {}, cfg, report, done,
                                load_block is not None, t)
            if on_block is not None:
                on_block(i, lp, layer, done)
                t = report._add("write", t)
            if load_block is not None:
                layer.to("meta")                      # frees the block's storage
                done.clear()
                trim()                                # and hands it back to the system
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    report.seconds = time.perf_counter() - t0
    report.final_hidden = hidden
    return report


def _quantize_block(layer: nn.Module, lp: str, hidden: list[torch.Tensor] | None, kwargs: dict,
                    cfg: PipelineConfig, report: PipelineReport, done: dict, streaming: bool, t: float) -> float:
    """One decoder block: calibrate and quantize its linears (their stored forms into `done`),
    then run it to turn `hidden`, its inputs, into its outputs (in place). Returns the time
    the last phase ended."""
    work = BlockWork(layer, lp, hidden, kwargs, cfg, streaming)
    for k, stage in enumerate(work.stages):
        hs = work.hessians(k, done)
        t = report._add("hessians", t)
        for g in stage:
            _quantize_group(lp, g, work.lin, hs.get(g), cfg, report, done)
            hs.pop(g, None)
            work.quantized(g, done)
        t = report._add("solve", t)
        trim()
    if cfg.sparse_mlp is not None and cfg.method != "none" and \
            cfg.sparse_mlp(layer, lp, hidden, kwargs, cfg, report, done):
        t = report._add("experts", t)
    elif hidden is not None:
        work.propagate()
        t = report._add("propagate", t)
    return t


class BlockWork:
    """One decoder block's calibration over some calibration samples, in the steps a caller
    runs between: per stage (true-sequential: q/k/v; o; gate/up; down) the Hessians of the
    stage's groups (`hessians`), then, once the caller has solved a group and put its weights
    in the linears, `quantized`; at the end `propagate` turns the inputs into the block's
    outputs, in place. quantize_model runs the steps in one process; quant.distributed runs
    them on each worker's share of the samples, summing the Hessians and solving in between."""

    def __init__(self, layer: nn.Module, lp: str, hidden: list[torch.Tensor] | None, kwargs: dict,
                 cfg: PipelineConfig, streaming: bool):
        self.layer, self.lp, self.hidden, self.kwargs, self.cfg, self.streaming = layer, lp, hidden, kwargs, cfg, streaming
        self.lin = _linears(layer)
        self.cache = None
        self.stages: list[list[tuple[str, ...]]] = []
        if cfg.method != "none":
            groups = _groups(layer)
            if cfg.method == "gptq" and cfg.true_sequential and cfg.reuse_outputs:
                self.cache = _OutputCache.for_layer(layer, groups, self.lin, len(hidden))
            # true-sequential: calibrate each group on the outputs of the groups quantized
            # before it; otherwise all groups from one pass over the block's float weights
            self.stages = [[g] for g in groups] if cfg.true_sequential else [groups]

    def hessians(self, k: int, done: dict) -> dict[tuple[str, ...], torch.Tensor]:
        """Stage k's Hessians over this block's samples, per group (none for RTN). `done`: the
        linears already quantized (by full name), whose weights streaming may now drop."""
        hs = _calibrate(self.layer, self.stages[k], self.lin, self.hidden, self.kwargs, self.cache) \
            if self.cfg.method == "gptq" else {}
        self._release(done)
        return hs

    def quantized(self, g: tuple[str, ...], done: dict) -> None:
        """Group g's weights are in its linears (dequantized)."""
        if self.cache is not None:
            self.cache.quantized(g, self.layer, self.hidden, self.kwargs)
        self._release(done)

    def _release(self, done: dict) -> None:
        if self.cache is not None and self.streaming:
            self.cache.release_spent(self.lin, done, self.lp)

    def propagate(self) -> None:
        """The block's outputs, written over its inputs."""
        if self.cache is not None:
            self.cache.propagate(self.layer, self.hidden, self.kwargs)      # in place: sample k's input is done with
        else:
            for k, h in enumerate(run_block(self.layer, self.hidden, self.kwargs)):
                self.hidden[k].copy_(h)


def _zeros(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return torch.zeros_like(x)


def _run_with(layer: nn.Module, h: torch.Tensor, kwargs: dict, standins: dict[nn.Module, Callable]):
    """The layer on h with some of its modules' forward replaced by stand-ins (instance
    attributes, removed afterwards)."""
    for mod, forward in standins.items():
        mod.forward = forward
    try:
        return layer(h, **kwargs)
    finally:
        for mod in standins:
            mod.__dict__.pop("forward", None)


# Where a calibration pass can end once a group's input is recorded, by the group's first linear:
# the sublayer holding it, and whether the group reads that sublayer's input ("input": q/k/v,
# gate/up, so the sublayer need not run at all) or is its last operation ("output": o_proj,
# down_proj, which need not run). Sublayers in block order.
_STOPS = {"self_attn.q_proj": ("self_attn", "input"), "self_attn.o_proj": ("self_attn", "output"),
          "mlp.gate_proj": ("mlp", "input"), "mlp.down_proj": ("mlp", "output"),
          "self_attn.qkv_proj": ("self_attn", "input"), "self_attn.dense": ("self_attn", "output"),
          "mlp.gate_up_proj": ("mlp", "input"), "mlp.fc1": ("mlp", "input"), "mlp.fc2": ("mlp", "output")}
_SUBLAYERS = ("self_attn", "mlp")


def _stop_at(layer: nn.Module, g: tuple[str, ...], lin: dict[str, nn.Linear],
             record: Callable[[torch.Tensor], None]) -> dict[nn.Module, Callable]:
    """Stand-ins that end a pass through the block at group g's input, handing it to `record`:
    the group's sublayer (or its last linear) records its input and returns zeros, and every
    later sublayer returns zeros; the block's output is then discarded. Empty where the block
    has no known stopping point for g (the pass then runs the whole block). Applies to blocks
    whose attention and MLP hand their input to q/k/v and gate/up and end in o_proj and
    down_proj (llama, mistral, qwen2/3, gemma2/3, phi3, glm4, olmo2, granite, smollm3)."""
    if g[0] not in _STOPS:
        return {}
    sub, where = _STOPS[g[0]]
    sublayer, first = getattr(layer, sub, None), lin[g[0]]
    if sublayer is None or getattr(sublayer, g[0].split(".", 1)[1], None) is not first:
        return {}
    if where == "output":
        def stand_in(x, *args, **kwargs):
            record(x)
            return x.new_zeros(*x.shape[:-1], first.out_features)
        standins = {first: stand_in}
    elif sub == "self_attn":
        def stand_in(*args, **kwargs):          # the decoder layer calls it as self_attn(hidden_states=...)
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            record(x)
            return torch.zeros_like(x), None
        standins = {sublayer: stand_in}
    else:
        def stand_in(x, *args, **kwargs):
            record(x)
            return torch.zeros_like(x)
        standins = {sublayer: stand_in}
    for later in _SUBLAYERS[_SUBLAYERS.index(sub) + 1:]:
        if getattr(layer, later, None) is not None:
            standins[getattr(layer, later)] = _zeros
    return standins


class _OutputCache:
    """True-sequential calibration without re-running what is already final. A block's attention
    returns o_proj(x_o) and its MLP returns down_proj(x_d), where x_o depends only on q/k/v and
    x_d only on what precedes down_proj. So the stage that calibrates o_proj keeps the x_o it
    sees; once o_proj is quantized the attention's output is o_proj(x_o), and later stages and
    the propagation need nothing more of the attention. Likewise x_d, kept by the down_proj
    stage, gives the MLP's output at propagation. The block then costs one forward pass in all,
    not one per stage plus one to propagate; every value is the one the uncached passes compute
    (tested bit for bit against `reuse_outputs=False`).

    The attention's output is not kept either: it is added into the hidden states in place, h <-
    h + attention part (the block run with its MLP returning zeros), and from then on the block
    runs with its attention returning zeros. Both are exact for these blocks: every norm after
    a sublayer maps 0 to 0 and the residual adds it, so h + 0 = h.

    Applies to blocks whose `self_attn` ends in `o_proj` and whose `mlp` ends in `down_proj`
    (llama, mistral, qwen2/3, gemma2/3, phi3, glm4, olmo2, granite, smollm3), as the decoder
    layers of transformers call them:
    `hidden, _ = self.self_attn(...)` and `hidden = self.mlp(hidden)`."""

    ATTN, MLP = ("self_attn.o_proj",), ("mlp.down_proj",)

    def __init__(self, attn: nn.Module, mlp: nn.Module, lin: dict[str, nn.Linear], n: int):
        self.attn, self.mlp, self.lin, self.n = attn, mlp, lin, n
        # one buffer per kept tensor [n, ...] (a single large allocation, returned to the system
        # when freed, instead of n mid-sized ones that fragment the heap)
        self.x_attn: torch.Tensor | None = None     # o_proj inputs
        self.attn_ready = False                     # the hidden states already include the attention
        self.x_mlp: torch.Tensor | None = None      # down_proj inputs
        self.k = 0                                  # the sample being run

    @classmethod
    def for_layer(cls, layer: nn.Module, groups: list[tuple[str, ...]], lin: dict[str, nn.Linear], n: int):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or cls.ATTN not in groups or cls.MLP not in groups:
            return None
        if getattr(attn, "o_proj", None) is not lin[cls.ATTN[0]] or getattr(mlp, "down_proj", None) is not lin[cls.MLP[0]]:
            return None
        return cls(attn, mlp, lin, n)

    def keeps(self, g: tuple[str, ...]) -> bool:
        return g in (self.ATTN, self.MLP)

    def keep(self, g: tuple[str, ...], x: torch.Tensor) -> None:
        target = "x_attn" if g == self.ATTN else "x_mlp"
        buf = getattr(self, target)
        if buf is None:
            buf = torch.empty(self.n, *x.shape, dtype=x.dtype)
            setattr(self, target, buf)
        buf[self.k].copy_(x)

    @torch.no_grad()
    def quantized(self, g: tuple[str, ...], layer: nn.Module, hidden: list[torch.Tensor], kwargs: dict) -> None:
        """After group g is quantized: for o_proj, the attention's final output goes into the
        hidden states (in place) and its inputs are dropped."""
        if g != self.ATTN or self.x_attn is None:
            return
        o = self.lin[self.ATTN[0]]
        for k, h in enumerate(hidden):
            out = o(self.x_attn[k])
            h.copy_(_out(_run_with(layer, h, kwargs, {self.attn: lambda *a, out=out, **kw: (out, None),
                                                      self.mlp: _zeros})))
        self.x_attn = None
        self.attn_ready = True

    def release_spent(self, lin: dict[str, nn.Linear], done: dict, lp: str) -> None:
        """Streaming: drop the weights no pass will use again. Once the attention's output is
        cached, its linears have done their work; once the down_proj inputs are, so have gate
        and up. Only quantized linears (their stored form is in `done`) are dropped. On a
        13B-shaped block this frees about 1 GB of float32 weights before the 13824-wide down
        projection is solved, the block's memory peak."""
        spent = []
        if self.attn_ready:
            spent += [n for n in lin if n.startswith("self_attn.")]
        if self.x_mlp is not None:
            spent += [n for n in lin if n.startswith("mlp.") and n != self.MLP[0]]
        for n in spent:
            w = lin[n].weight
            if f"{lp}.{n}" in done and w.numel():
                w.data = torch.empty(0, dtype=w.dtype)

    @staticmethod
    def _attn_forward(hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states), None

    def _mlp_forward(self, *args, **kwargs):
        return self.lin[self.MLP[0]](self.x_mlp[self.k])

    def standins(self, k: int, mlp: bool = False) -> dict[nn.Module, Callable]:
        """For running the layer on sample k: once the hidden states include the attention, the
        attention returns zeros; with `mlp`, the MLP's output is taken from the cache."""
        self.k = k
        standins: dict[nn.Module, Callable] = {}
        if self.attn_ready:
            standins[self.attn] = self._attn_forward
        if mlp:
            standins[self.mlp] = self._mlp_forward
        return standins

    @torch.no_grad()
    def propagate(self, layer: nn.Module, hidden: list[torch.Tensor], kwargs: dict) -> None:
        """The block's outputs, written over its inputs."""
        mlp = self.x_mlp is not None
        for k, h in enumerate(hidden):
            hidden[k].copy_(_out(_run_with(layer, h, kwargs, self.standins(k, mlp))))
        self.x_attn = self.x_mlp = None


def _calibrate(layer: nn.Module, groups: list[tuple[str, ...]], lin: dict[str, nn.Linear], hidden,
               kwargs, cache: _OutputCache | None = None) -> dict[tuple[str, ...], torch.Tensor]:
    """One pass of the block over the calibration data; the Hessian of each group's shared
    input, recorded by a hook on the group's first linear. The pass ends at the last of those
    inputs (`_stop_at`: in a true-sequential stage the q/k/v Hessian needs only the input norm,
    not the block). With a cache, the inputs of o_proj and down_proj are kept and the
    attention's output is reused."""
    hs: dict[tuple[str, ...], torch.Tensor] = {}
    counts: dict[tuple[str, ...], int] = {}
    for g in groups:
        if len({lin[n].in_features for n in g}) != 1:
            raise QuantkitError(f"linears {', '.join(g)} should share one input but differ in width")
        hs[g] = new_hessian(lin[g[0]].in_features)
        counts[g] = 0

    def record(g: tuple[str, ...], x: torch.Tensor) -> None:
        counts[g] = accumulate_hessian(x, hs[g], counts[g], upper=True)
        if cache is not None and cache.keeps(g):
            cache.keep(g, x.detach())

    last = groups[-1]   # groups come in data-flow order
    stop = _stop_at(layer, last, lin, lambda x: record(last, x))
    hooked = groups[:-1] if stop else groups
    handles = [lin[g[0]].register_forward_pre_hook(lambda mod, inp, g=g: record(g, inp[0])) for g in hooked]
    try:
        with torch.no_grad():
            for k, h in enumerate(hidden):
                standins = cache.standins(k) if cache is not None else {}
                _run_with(layer, h, kwargs, {**standins, **stop})
    finally:
        for h in handles:
            h.remove()
    for H in hs.values():
        symmetrize_hessian(H)
    return hs
