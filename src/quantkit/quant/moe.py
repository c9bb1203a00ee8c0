"""Mixtures of experts (Qwen3-MoE, Mixtral) in the block-sequential GPTQ pipeline.

transformers keeps a sparse MLP as `mlp.gate` (the router: weight [E, hidden]; its forward
returns (logits, top-k weights, top-k indices)) and `mlp.experts` (fused 3-D parameters
gate_up_proj [E, 2I, hidden], gate rows first, and down_proj [E, hidden, I]); checkpoints store
one 2-D tensor per expert (`mlp.experts.{e}.gate_proj.weight`, Mixtral's
`block_sparse_moe.experts.{e}.w1/w3/w2.weight`). `expert_fetch` builds the fused parameters
from those (a Hugging Face checkpoint storing them fused is read through models.hf as the
per-expert one, each expert's rows alone, so the same path and memory serve both).

Routed calibration (`quantize_experts`, the pipeline's `sparse_mlp` stage, after the attention
is quantized; `RoutedTokens`): one pass of the block with its MLP replaced by a recorder that
returns zeros gives every token's MLP input x and, exactly, the block's output without its MLP
(residual + attention). The model's own router (`mlp.gate`, its softmax / top-k /
norm_topk_prob as the model computes them) routes x; expert e's gate/up Hessian comes from the
tokens routed to it alone, and its down Hessian from those tokens' down inputs computed with
its already-quantized gate/up (true-sequential). The block's output is then residual + the
model's MoE forward with the quantized experts. quant.distributed runs the same steps on Ray
workers, each routing a share of the calibration, the Hessians summed per expert.

Starved experts: an expert routed fewer than `min_tokens` calibration tokens (GPTQConfig
`moe_min_tokens`; default max(16, hidden // 8)) is solved on its Hessian mixed with the layer's
pooled one, H' = (n_e H_e + m H̄) / (n_e + m) with m = min_tokens: m pseudo-tokens drawn from
every routed token of the layer (H̄ for gate/up: all tokens' MLP inputs; for down: every
expert's down inputs). An expert no token reaches is solved on H̄ alone. Each layer's token
counts and safeguarded experts are reported (PipelineReport.experts).

Batches: experts are solved EXPERT_BATCH_ELEMENTS weights at a time (8 of Qwen3-30B-A3B's
gate/up, 16 of its downs) by quant.gptq.quantize_weights, whose column loop runs once for the
batch and gives each expert exactly what solving it alone gives.

Memory: a batch's Hessians, factors and float32 working copies (~0.7 GB at 30B-A3B's shapes),
the two pooled Hessians (hidden² + I² floats), the layer's MLP inputs (as large as the block's hidden states) and the experts' stored forms; never every
expert's Hessians at once (a starved expert's down Hessian is computed again from its few
tokens when the pooled one is whole, not held meanwhile) (`expert_work_bytes`). The streaming driver loads a bf16 checkpoint's
fused expert parameters in bf16 (`expert_fetch(compact=True)`, lossless), half of float32;
those are not overwritten with the solved values: the block's output is then `moe_output`, the
eager experts forward of transformers run on the stored forms decoded one expert at a time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..util.errors import QuantkitError
from .gptq import accumulate_hessian, new_hessian, quantize_weights
from .pipeline import PipelineConfig, PipelineReport

PARTS = ("gate_proj", "up_proj", "down_proj")
# checkpoint names of one expert's matrices: transformers' (Qwen3-MoE) and Mixtral's w1/w3/w2
_DISK = {"gate_proj": ("gate_proj", "w1"), "up_proj": ("up_proj", "w3"), "down_proj": ("down_proj", "w2")}
_FUSED = re.compile(r"^(.*)\.mlp\.(gate\.weight|experts\.gate_up_proj|experts\.down_proj)$")


def sparse_mlp(layer: nn.Module) -> nn.Module | None:
    """The decoder layer's sparse MLP (router `gate`, fused `experts`), or None for a dense one."""
    mlp = getattr(layer, "mlp", None)
    experts, gate = getattr(mlp, "experts", None), getattr(mlp, "gate", None)
    w = getattr(experts, "gate_up_proj", None)
    if gate is None or not isinstance(w, torch.Tensor) or w.dim() != 3:
        return None
    return mlp


def expert_fetch(fetch, n_expert: int, compact: bool = False):
    """fetch(hf_name) that also answers transformers' fused expert parameters
    (`{layer}.mlp.experts.gate_up_proj` / `down_proj`, `{layer}.mlp.gate.weight`) from a
    checkpoint storing one tensor per expert (Qwen3-MoE's `mlp.experts.{e}.*_proj`, Mixtral's
    `block_sparse_moe`). compact: the fused parameters in bfloat16 when every value is one
    (a bf16 checkpoint: half the memory of float32, nothing lost); only for `quantize_experts`,
    which reads them expert by expert and never runs the model's own expert forward on them."""
    def get(hf_name: str):
        t = fetch(hf_name)
        m = _FUSED.match(hf_name)
        if t is not None or m is None:
            return t
        layer, what = m.groups()
        for mlp in ("mlp", "block_sparse_moe"):
            base = f"{layer}.{mlp}"
            if what == "gate.weight":
                t = fetch(f"{base}.gate.weight")
            else:
                parts = ("gate_proj", "up_proj") if what.endswith("gate_up_proj") else ("down_proj",)
                t = _stack(fetch, base, parts, n_expert, compact)
            if t is not None:
                return t
        return None
    return get


def _bf16_exact(w: torch.Tensor) -> bool:
    return w.dtype == torch.bfloat16 or torch.equal(w.to(torch.bfloat16).to(w.dtype), w)


def _stack(fetch, base: str, parts: tuple[str, ...], n_expert: int, compact: bool = False) -> torch.Tensor | None:
    out = None
    for e in range(n_expert):
        mats = []
        for part in parts:
            t = next((x for x in (fetch(f"{base}.experts.{e}.{d}.weight") for d in _DISK[part]) if x is not None),
                     None)
            if t is None:
                return None
            mats.append(t)
        w = torch.cat(mats) if len(mats) > 1 else mats[0]
        if out is None:
            dtype = torch.bfloat16 if compact and _bf16_exact(w) else w.dtype
            out = torch.empty(n_expert, *w.shape, dtype=dtype)
        elif out.dtype == torch.bfloat16 and not _bf16_exact(w):
            out = out.to(w.dtype)
        out[e] = w
    return out


@dataclass
class ExpertStack:
    """One 3-D expert tensor's stored form: each expert's quantized matrix, in expert order.
    Its bytes are the experts' bytes one after another, as GGUF stores [n_expert, rows, cols]."""
    parts: list

    def to_bytes(self) -> torch.Tensor:
        return torch.cat([p.to_bytes() for p in self.parts])

    def dequantize(self) -> torch.Tensor:
        return torch.stack([p.dequantize() for p in self.parts])


def default_min_tokens(hidden: int) -> int:
    return max(16, hidden // 8)


def route(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The experts each token of x [tokens, hidden] is routed to [tokens, top_k], by the model's
    own router."""
    out = mlp.gate(x)
    return out[2] if isinstance(out, tuple) else out


def expert_token_counts(mlp: nn.Module, x: torch.Tensor) -> list[int]:
    n = mlp.experts.gate_up_proj.shape[0]
    return torch.bincount(route(mlp, x).reshape(-1), minlength=n).tolist()


@torch.no_grad()
def expert_inputs(experts: nn.Module, x: torch.Tensor, idx: torch.Tensor):
    """Per expert of a fused experts module, in order: (e, its routed tokens' inputs x[T_e], their
    down inputs act(gate) * up), for the tokens x [tokens, hidden] routed as idx [tokens, top_k]."""
    x = x.reshape(-1, x.shape[-1])
    idx = idx.reshape(x.shape[0], -1)
    for e in range(experts.gate_up_proj.shape[0]):
        xe = x[(idx == e).any(dim=-1)]
        g, u = F.linear(xe, experts.gate_up_proj[e]).chunk(2, dim=-1)
        yield e, xe, experts.act_fn(g) * u


def _record_mlp_inputs(layer: nn.Module, mlp: nn.Module, hidden: list[torch.Tensor], kwargs: dict) -> torch.Tensor:
    """Run the block with its MLP returning zeros: each hidden state becomes residual +
    attention (in place; exact, the residual adds 0) and the MLP inputs come back [n, ..., hidden]."""
    xs: list[torch.Tensor] = []

    def stand_in(x, *args, **kw):
        xs.append(x.detach().clone())
        return torch.zeros_like(x)

    mlp.forward = stand_in
    try:
        for h in hidden:
            out = layer(h, **kwargs)
            h.copy_(out[0] if isinstance(out, tuple) else out)
    finally:
        mlp.__dict__.pop("forward", None)
    return torch.stack(xs)


def _mixed(H: torch.Tensor, n: int, pooled: torch.Tensor, m: int) -> torch.Tensor:
    """(n H + m H̄) / (n + m): an expert's Hessian over n tokens with m pseudo-tokens of the pool."""
    return (H * n + pooled * m) / (n + m)


def safeguard(H: torch.Tensor, es: list[int], counts: list[int], pooled: torch.Tensor, m: int) -> torch.Tensor:
    """H [B, in, in], experts es's Hessians: those of experts routed fewer than m tokens (counts,
    the whole calibration's) mixed with the pooled Hessian, in place (module docstring)."""
    for b, e in enumerate(es):
        if counts[e] < m:
            H[b] = _mixed(H[b], counts[e], pooled, m)
    return H


def _hessian_of(x: torch.Tensor) -> torch.Tensor:
    H = new_hessian(x.shape[-1])
    accumulate_hessian(x, H, 0)
    return H


class RoutedTokens:
    """Calibration samples (all of them, or one Ray worker's share) through a block's sparse MLP
    once its attention is quantized: the MLP inputs (the hidden states become residual +
    attention, in place), each token's experts by the model's own router, and, per expert, the
    Hessians of its routed tokens: each the mean over this share's tokens of that expert, so
    shares combine weighted by their `counts`."""

    @torch.no_grad()
    def __init__(self, layer: nn.Module, mlp: nn.Module, hidden: list[torch.Tensor], kwargs: dict):
        self.mlp, self.hidden = mlp, hidden
        self.xs = _record_mlp_inputs(layer, mlp, hidden, kwargs)
        self.x = self.xs.reshape(-1, self.xs.shape[-1])
        self.idx = route(mlp, self.x)
        self.counts: list[int] = torch.bincount(self.idx.reshape(-1),
                                                minlength=mlp.experts.gate_up_proj.shape[0]).tolist()
        self.pooled_dn: torch.Tensor | None = None      # the mean over every expert's down inputs so far
        self.n_dn = 0

    def tokens(self, e: int) -> torch.Tensor:
        """The MLP inputs of the tokens routed to expert e."""
        return self.x[(self.idx == e).any(dim=-1).nonzero().squeeze(-1)]

    @torch.no_grad()
    def pooled_gate_up(self) -> torch.Tensor:
        """The Hessian of every token's MLP input (the pool a starved expert's gate/up draws on)."""
        return _hessian_of(self.x)

    @torch.no_grad()
    def gate_up_hessians(self, es: list[int]) -> torch.Tensor:
        """[B, hidden, hidden]: experts es's gate/up Hessians."""
        out = None
        for b, e in enumerate(es):
            H = _hessian_of(self.tokens(e))
            if out is None:
                out = torch.empty(len(es), *H.shape, dtype=H.dtype)
            out[b] = H
        return out

    @torch.no_grad()
    def down_hessians(self, es: list[int], gate_up, pool: bool = True) -> torch.Tensor:
        """[B, I, I]: experts es's down Hessians, their down inputs act(gate) * up computed with
        gate_up(e), expert e's solved [2I, hidden] matrix. Called (pool=True) for every expert in
        expert order, it also folds each one's down inputs into the pooled down Hessian
        (`pooled_down`); pool=False computes a starved expert's again, from its few tokens, for
        the solve that needs the whole pool (cheaper to hold than its I x I Hessian)."""
        out = None
        for b, e in enumerate(es):
            g, u = F.linear(self.tokens(e), gate_up(e)).chunk(2, dim=-1)
            xd = self.mlp.experts.act_fn(g) * u
            if pool and self.pooled_dn is None:
                self.pooled_dn = new_hessian(xd.shape[-1])
            if pool:
                self.n_dn = accumulate_hessian(xd, self.pooled_dn, self.n_dn)
            H = _hessian_of(xd)
            if out is None:
                out = torch.empty(len(es), *H.shape, dtype=H.dtype)
            out[b] = H
            del xd
        return out

    def pooled_down(self) -> tuple[torch.Tensor | None, int]:
        """(the pooled down Hessian, its row count) once every expert's down Hessian is taken."""
        return self.pooled_dn, self.n_dn

    @torch.no_grad()
    def output(self, write_back: bool, solved) -> None:
        """The block's outputs over the hidden states: residual + attention, plus the MoE with
        the quantized experts (the model's own forward on write-back parameters, else
        `moe_output` on solved(e))."""
        outs = [self.mlp(xk) for xk in self.xs] if write_back else moe_output(self.mlp, list(self.xs), solved)
        for h, o in zip(self.hidden, outs):
            h.add_(o)


# weights in one batched solve (quant.gptq.quantize_weights): the batch's float32 working copies
# (weights, codes, solved values) are ~0.1 GB each, its Hessians and factors a few more
EXPERT_BATCH_ELEMENTS = 24 << 20
GATE_UP, DOWN = ("gate_proj", "up_proj"), ("down_proj",)


def solve_experts(name: str, W: torch.Tensor, H: torch.Tensor, grid, gptq) -> list:
    """quant.gptq.quantize_weights of W [B, rows, in] on H [B, in, in], a failure in one line
    naming the matrices."""
    try:
        return quantize_weights(W, H, grid, gptq)
    except ValueError as e:
        raise QuantkitError(f"cannot quantize {name}: {e}") from None


class ExpertLayer:
    """One sparse MLP's experts being solved, a batch of experts at a time: their stored forms
    (and, for float32 parameters, the solved values written over them), damp and loss into the
    report. A Ray worker keeps one too, filled with the driver's stored forms (`put`), for the
    down inputs and the block's outputs."""

    def __init__(self, mlp: nn.Module, lp: str, cfg: PipelineConfig, report: PipelineReport, done: dict):
        _own_forward_or_float(mlp)
        self.mlp, self.lp, self.cfg, self.report, self.done = mlp, lp, cfg, report, done
        ex = mlp.experts
        self.gu, self.dn = ex.gate_up_proj.data, ex.down_proj.data
        self.n_expert, two_i, self.hidden = self.gu.shape
        self.inter = two_i // 2
        self.min_tokens = cfg.gptq.moe_min_tokens or default_min_tokens(self.hidden)
        # float32 parameters take the solved values (the model's own forward then runs on them);
        # compact (bf16) ones keep the checkpoint's, the solved values being the stored forms'
        self.write_back = self.gu.dtype == torch.float32 and self.dn.dtype == torch.float32
        self.grids = {p: cfg.grid(f"{lp}.mlp.experts.{p}") if callable(cfg.grid) else cfg.grid for p in PARTS}
        self.stored: dict[str, list] = {p: [None] * self.n_expert for p in PARTS}

    def batches(self, parts: tuple[str, ...], es: list[int] | None = None, ways: int = 1) -> list[list[int]]:
        """Experts es (default all), in order, in batches of a solve's size for `parts`, and at
        least `ways` batches where there are that many experts (to solve side by side)."""
        fused = self.dn if parts == DOWN else self.gu
        es = list(range(self.n_expert)) if es is None else es
        size = min(max(1, EXPERT_BATCH_ELEMENTS // fused[0].numel()), max(1, -(-len(es) // ways)))
        return _chunks(es, size)

    def jobs(self, es: list[int], parts: tuple[str, ...]) -> list[tuple[str, list[int], torch.Tensor, object]]:
        """The batched solves of experts es's `parts`, one per grid: (label, indices into parts,
        W [B, rows, in] float32, grid). Parts left unquantized by the grid have none."""
        W = (self.dn if parts == DOWN else self.gu)[es]
        groups: dict[object, list[int]] = {}
        for k, p in enumerate(parts):
            if self.grids[p] is not None:
                groups.setdefault(self.grids[p], []).append(k)
        rows = W.shape[1] // len(parts)
        out = []
        for grid, ks in groups.items():
            sel = torch.cat([torch.arange(k * rows, (k + 1) * rows) for k in ks])
            name = ", ".join(f"{self.lp}.mlp.experts.{{{es[0]}..{es[-1]}}}.{parts[k]}" for k in ks)
            out.append((name, ks, W[:, sel].float().contiguous(), grid))
        return out

    def solve(self, es: list[int], parts: tuple[str, ...], H: torch.Tensor) -> None:
        """Solve experts es's `parts` on H [B, in, in], in this process."""
        for name, ks, W, grid in self.jobs(es, parts):
            self.apply(es, parts, ks, solve_experts(name, W, H, grid, self.cfg.gptq))

    def apply(self, es: list[int], parts: tuple[str, ...], ks: list[int], results: list) -> None:
        """One job's results (quant.gptq.GPTQResult per expert of es) into the stored forms,
        the report and, with write-back, the parameters."""
        fused = self.dn if parts == DOWN else self.gu
        rows = fused.shape[1] // len(parts)
        for e, r in zip(es, results):
            pieces = r.weight.split_rows([rows] * len(ks)) if len(ks) > 1 else [r.weight]
            for j, (k, piece) in enumerate(zip(ks, pieces)):
                self.stored[parts[k]][e] = piece
                if self.write_back:
                    fused[e, k * rows:(k + 1) * rows] = r.dequantized[j * rows:(j + 1) * rows]
                key = f"{self.lp}.mlp.experts.{parts[k]}"
                self.report.damp[key] = max(self.report.damp.get(key, 0.0), r.damp or 0.0)
                self.report.loss[key] = self.report.loss.get(key, 0.0) + (r.loss or 0.0)

    def pieces(self, es: list[int], parts: tuple[str, ...]) -> dict[str, dict[int, object]]:
        """Experts es's stored forms of `parts` (those quantized), for `put` elsewhere."""
        return {p: {e: self.stored[p][e] for e in es} for p in parts if self.grids[p] is not None}

    @torch.no_grad()
    def put(self, pieces: dict[str, dict[int, object]]) -> None:
        """Stored forms solved elsewhere (`pieces`) into this layer: their values written over
        write-back parameters, else kept for `solved`."""
        rows = {"down_proj": self.dn.shape[1], "gate_proj": self.inter, "up_proj": self.inter}
        for p, by_expert in pieces.items():
            k = PARTS.index(p) % 2
            for e, piece in by_expert.items():
                if not self.write_back:
                    self.stored[p][e] = piece
                elif p == "down_proj":
                    self.dn[e] = piece.dequantize()
                else:
                    self.gu[e, k * rows[p]:(k + 1) * rows[p]] = piece.dequantize()

    def solved_gate_up(self, e: int) -> torch.Tensor:
        """Expert e's solved gate/up matrix [2I, hidden], float32."""
        if self.write_back:
            return self.gu[e]
        return torch.cat([self.stored[p][e].dequantize() if self.stored[p][e] is not None else w.float()
                          for p, w in zip(GATE_UP, self.gu[e].chunk(2))])

    def solved(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's solved (gate_up, down) matrices, float32: the stored forms decoded."""
        if self.write_back:
            return self.gu[e], self.dn[e]
        d = self.stored["down_proj"][e]
        return self.solved_gate_up(e), d.dequantize() if d is not None else self.dn[e].float()

    def finish(self, counts: list[int], starved: list[int]) -> None:
        for p in PARTS:
            if self.grids[p] is not None:
                self.done[f"{self.lp}.mlp.experts.{p}"] = ExpertStack(self.stored[p])
        self.report.experts[self.lp] = {"tokens": counts, "min_tokens": self.min_tokens, "safeguarded": starved}


def expert_work_bytes(mlp: nn.Module, tokens: int) -> int:
    """What the experts' stage adds to a block's memory on `tokens` calibration tokens (a Ray
    worker's share): the MLP inputs, one expert's gate/up outputs and down inputs, one batch's
    solve (its Hessians, their factors and a copy, the float32 working copies), the two pooled
    Hessians, and the layer's stored forms (at most 8.5 bits a weight)."""
    n_expert, two_i, hidden = mlp.experts.gate_up_proj.shape
    inter = two_i // 2
    batch = max(min(n_expert, max(1, EXPERT_BATCH_ELEMENTS // (two_i * hidden))) * hidden ** 2,
                min(n_expert, max(1, EXPERT_BATCH_ELEMENTS // (inter * hidden))) * inter ** 2)
    solve = batch * 4 * 3 + min(EXPERT_BATCH_ELEMENTS, n_expert * two_i * hidden) * 4 * 3
    acts = tokens * (hidden + 3 * two_i) * 4
    return solve + acts + (hidden ** 2 + inter ** 2) * 4 + n_expert * 3 * inter * hidden * 17 // 16


def _chunks(items: list[int], n: int) -> list[list[int]]:
    return [items[k:k + n] for k in range(0, len(items), n)]


@torch.no_grad()
def quantize_experts(layer: nn.Module, lp: str, hidden: list[torch.Tensor] | None, kwargs: dict,
                     cfg: PipelineConfig, report: PipelineReport, done: dict) -> bool:
    """The pipeline's `sparse_mlp` stage: GPTQ of the block's experts on routed calibration
    (module docstring), their stored forms into `done` ({lp}.mlp.experts.{gate,up,down}_proj:
    ExpertStack), the block's outputs written over `hidden`. False for a dense block (nothing
    done). Experts are solved a batch at a time (quant.gptq.quantize_weights, the same result as
    one at a time): every expert's gate/up, then the downs of those with enough tokens; the
    starved experts' downs at the end, on the layer's pooled down Hessian. quant.distributed
    runs the same steps with the Hessians summed over Ray workers."""
    mlp = sparse_mlp(layer)
    if mlp is None:
        return False
    if cfg.method != "gptq" or hidden is None:
        raise QuantkitError("the experts of a mixture of experts are quantized with GPTQ only in the block pipeline",
                            hint="use --method gptq with a GGUF format, or --method rtn for a plain GGUF")
    L = ExpertLayer(mlp, lp, cfg, report, done)
    share = RoutedTokens(layer, mlp, hidden, kwargs)
    counts, m = share.counts, L.min_tokens
    starved = [e for e, c in enumerate(counts) if c < m]
    pooled = share.pooled_gate_up() if starved else None
    for es in L.batches(GATE_UP):
        L.solve(es, GATE_UP, safeguard(share.gate_up_hessians(es), es, counts, pooled, m))
    for es in L.batches(DOWN):
        H = share.down_hessians(es, L.solved_gate_up)
        fed = [b for b, e in enumerate(es) if counts[e] >= m]
        if fed:
            L.solve([es[b] for b in fed], DOWN, H if len(fed) == len(es) else H[fed])
        del H
    pooled_dn, n_dn = share.pooled_down()
    for es in L.batches(DOWN, starved):         # their down Hessians again, now the pool is whole
        H = share.down_hessians(es, L.solved_gate_up, pool=False)
        L.solve(es, DOWN, safeguard(H, es, counts, pooled_dn, m) if n_dn else H)
    L.finish(counts, starved)
    share.output(L.write_back, L.solved)
    return True


def _own_forward_or_float(mlp: nn.Module) -> None:
    """Compact (bf16) experts are run by `moe_output`, which knows a router and routed experts
    only: an MLP with more (shared experts) gets float32 parameters and its own forward."""
    ex = mlp.experts
    if ex.gate_up_proj.dtype != torch.float32 and set(n for n, _ in mlp.named_children()) != {"gate", "experts"}:
        ex.gate_up_proj.data = ex.gate_up_proj.data.float()
        ex.down_proj.data = ex.down_proj.data.float()


@torch.no_grad()
def moe_output(mlp: nn.Module, xs: list[torch.Tensor], solved) -> list[torch.Tensor]:
    """The sparse MLP's output for each x of xs, as transformers' eager experts forward computes
    it (the model's router; per expert hit, in expert order: gate/up, act(gate) * up, down,
    times the routing weight, added into the token's row), with expert e's matrices from
    solved(e) -> (gate_up [2I, hidden], down [hidden, I]), each fetched once for all xs."""
    n = mlp.experts.gate_up_proj.shape[0]
    flat = [x.reshape(-1, x.shape[-1]) for x in xs]
    routed = [mlp.gate(f) for f in flat]
    masks = [F.one_hot(r[2], num_classes=n + 1).permute(2, 1, 0) for r in routed]
    outs = [torch.zeros_like(f) for f in flat]
    for e in range(n):
        hits = [torch.where(mk[e]) for mk in masks]
        if all(t.numel() == 0 for _, t in hits):
            continue
        gu, dn = solved(e)
        for f, r, (pos, tok), out in zip(flat, routed, hits, outs):
            if tok.numel() == 0:
                continue
            g, u = F.linear(f[tok], gu).chunk(2, dim=-1)
            y = F.linear(mlp.experts.act_fn(g) * u, dn) * r[1][tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
    return [o.reshape(x.shape) for o, x in zip(outs, xs)]


def summary_lines(experts: dict[str, dict]) -> list[str]:
    """One line per MoE layer: token counts per expert (min / median / max) and the safeguarded."""
    lines = []
    for lp, r in experts.items():
        c = sorted(r["tokens"])
        s = r["safeguarded"]
        shown = ", ".join(map(str, s[:8])) + (", ..." if len(s) > 8 else "")
        lines.append(f"{lp}: {len(c)} experts, tokens per expert min {c[0]} / median {c[len(c) // 2]} / max {c[-1]}; "
                     f"{len(s)} under {r['min_tokens']} tokens safeguarded" + (f" ({shown})" if s else ""))
    return lines
