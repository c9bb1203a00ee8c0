"""Mixtures of experts (Qwen3-MoE, Mixtral) in the block-sequential GPTQ pipeline.

transformers keeps a sparse MLP as `mlp.gate` (the router: weight [E, hidden]; its forward
returns (logits, top-k weights, top-k indices)) and `mlp.experts` (fused 3-D parameters
gate_up_proj [E, 2I, hidden], gate rows first, and down_proj [E, hidden, I]); checkpoints store
one 2-D tensor per expert (`mlp.experts.{e}.gate_proj.weight`, Mixtral's
`block_sparse_moe.experts.{e}.w1/w3/w2.weight`). `expert_fetch` builds the fused parameters
from those.

Routed calibration (`quantize_experts`, the pipeline's `sparse_mlp` stage, after the attention
is quantized): one pass of the block with its MLP replaced by a recorder that returns zeros
gives every token's MLP input x and, exactly, the block's output without its MLP (residual +
attention). The model's own router (`mlp.gate`, its softmax / top-k / norm_topk_prob as the
model computes them) routes x; expert e's gate/up Hessian comes from the tokens routed to it
alone, and its down Hessian from those tokens' down inputs computed with its already-quantized
gate/up (true-sequential). The block's output is then residual + the model's MoE forward with
the quantized experts.

Starved experts: an expert routed fewer than `min_tokens` calibration tokens (GPTQConfig
`moe_min_tokens`; default max(16, hidden // 8)) is solved on its Hessian mixed with the layer's
pooled one, H' = (n_e H_e + m H̄) / (n_e + m) with m = min_tokens: m pseudo-tokens drawn from
every routed token of the layer (H̄ for gate/up: all tokens' MLP inputs; for down: every
expert's down inputs). An expert no token reaches is solved on H̄ alone. Each layer's token
counts and safeguarded experts are reported (PipelineReport.experts).

Memory: one expert's two Hessians at a time plus the two pooled ones (hidden² + I² floats
each), the starved experts' few down inputs, and the layer's MLP inputs (as large as the
block's hidden states); never every expert's Hessians at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..util.errors import QuantkitError
from .gptq import accumulate_hessian, new_hessian
from .pipeline import PipelineConfig, PipelineReport, solve

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


def expert_fetch(fetch, n_expert: int):
    """fetch(hf_name) that also answers transformers' fused expert parameters
    (`{layer}.mlp.experts.gate_up_proj` / `down_proj`, `{layer}.mlp.gate.weight`) from a
    checkpoint storing one tensor per expert (Qwen3-MoE's `mlp.experts.{e}.*_proj`, Mixtral's
    `block_sparse_moe`)."""
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
                t = _stack(fetch, base, parts, n_expert)
            if t is not None:
                return t
        return None
    return get


def _stack(fetch, base: str, parts: tuple[str, ...], n_expert: int) -> torch.Tensor | None:
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
            out = torch.empty(n_expert, *w.shape, dtype=w.dtype)
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


class _Layer:
    """One sparse MLP's experts being solved."""

    def __init__(self, mlp: nn.Module, lp: str, cfg: PipelineConfig, report: PipelineReport, done: dict):
        self.mlp, self.lp, self.cfg, self.report, self.done = mlp, lp, cfg, report, done
        ex = mlp.experts
        self.gu, self.dn, self.act = ex.gate_up_proj.data, ex.down_proj.data, ex.act_fn
        self.n_expert, two_i, self.hidden = self.gu.shape
        self.inter = two_i // 2
        self.grids = {p: cfg.grid(f"{lp}.mlp.experts.{p}") if callable(cfg.grid) else cfg.grid for p in PARTS}
        self.stored: dict[str, list] = {p: [None] * self.n_expert for p in PARTS}

    def _solve(self, e: int, parts: tuple[str, ...], W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
        """Expert e's matrix W (the rows of `parts`, stacked) solved on H; returns Ŵ (parts left
        unquantized by the grid keep their values)."""
        out = W.clone()
        groups: dict[object, list[int]] = {}
        for k, p in enumerate(parts):
            if self.grids[p] is not None:
                groups.setdefault(self.grids[p], []).append(k)
        rows = W.shape[0] // len(parts)
        for grid, ks in groups.items():
            sel = torch.cat([torch.arange(k * rows, (k + 1) * rows) for k in ks])
            name = ", ".join(f"{self.lp}.mlp.experts.{e}.{parts[k]}" for k in ks)
            qw, deq, damp, loss = solve(name, W[sel].contiguous(), H, grid, self.cfg)
            out[sel] = deq.to(W.dtype)
            pieces = qw.split_rows([rows] * len(ks)) if len(ks) > 1 else [qw]
            for k, piece in zip(ks, pieces):
                self.stored[parts[k]][e] = piece
                key = f"{self.lp}.mlp.experts.{parts[k]}"
                self.report.damp[key] = max(self.report.damp.get(key, 0.0), damp or 0.0)
                self.report.loss[key] = self.report.loss.get(key, 0.0) + (loss or 0.0)
        return out

    def gate_up(self, e: int, x: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
        """Solve expert e's gate/up on H; returns the down inputs of its tokens x through them."""
        self.gu[e] = self._solve(e, ("gate_proj", "up_proj"), self.gu[e], H)
        g, u = F.linear(x, self.gu[e]).chunk(2, dim=-1)
        return self.act(g) * u

    def down(self, e: int, H: torch.Tensor) -> None:
        self.dn[e] = self._solve(e, ("down_proj",), self.dn[e], H)

    def finish(self) -> None:
        for p in PARTS:
            if self.grids[p] is not None:
                self.done[f"{self.lp}.mlp.experts.{p}"] = ExpertStack(self.stored[p])


def _hessian_of(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    H = new_hessian(x.shape[-1])
    return H, accumulate_hessian(x, H, 0)


@torch.no_grad()
def quantize_experts(layer: nn.Module, lp: str, hidden: list[torch.Tensor] | None, kwargs: dict,
                     cfg: PipelineConfig, report: PipelineReport, done: dict) -> bool:
    """The pipeline's `sparse_mlp` stage: GPTQ of the block's experts on routed calibration
    (module docstring), their stored forms into `done` ({lp}.mlp.experts.{gate,up,down}_proj:
    ExpertStack), the block's outputs written over `hidden`. False for a dense block (nothing
    done)."""
    mlp = sparse_mlp(layer)
    if mlp is None:
        return False
    if cfg.method != "gptq" or hidden is None:
        raise QuantkitError("the experts of a mixture of experts are quantized with GPTQ only in the block pipeline",
                            hint="use --method gptq with a GGUF format, or --method rtn for a plain GGUF")
    xs = _record_mlp_inputs(layer, mlp, hidden, kwargs)
    x = xs.reshape(-1, xs.shape[-1])
    idx = route(mlp, x)
    L = _Layer(mlp, lp, cfg, report, done)
    m = cfg.gptq.moe_min_tokens or default_min_tokens(L.hidden)
    counts = torch.bincount(idx.reshape(-1), minlength=L.n_expert).tolist()
    pooled_gu, _ = _hessian_of(x)           # every token routed to top_k experts: the pooled gate/up Hessian
    pooled_dn, n_dn = new_hessian(L.inter), 0
    starved: dict[int, tuple[torch.Tensor, int]] = {}       # expert -> (its down inputs, its token count)
    for e in range(L.n_expert):
        tok = (idx == e).any(dim=-1).nonzero().squeeze(-1)
        xe = x[tok]
        n = xe.shape[0]
        H, _ = _hessian_of(xe)
        xd = L.gate_up(e, xe, H if n >= m else _mixed(H, n, pooled_gu, m))
        del H
        n_dn = accumulate_hessian(xd, pooled_dn, n_dn)
        if n >= m:
            Hd, _ = _hessian_of(xd)
            L.down(e, Hd)
            del Hd
        else:
            starved[e] = (xd, n)
    for e, (xd, n) in starved.items():
        Hd, _ = _hessian_of(xd)
        L.down(e, _mixed(Hd, n, pooled_dn, m) if n_dn else Hd)
    L.finish()
    report.experts[lp] = {"tokens": counts, "min_tokens": m, "safeguarded": sorted(starved)}
    for k, h in enumerate(hidden):             # residual + attention, plus the MoE with quantized experts
        h.add_(mlp(xs[k]))
    return True


def summary_lines(experts: dict[str, dict]) -> list[str]:
    """One line per MoE layer: token counts per expert (min / median / max) and the safeguarded."""
    lines = []
    for lp, r in experts.items():
        c = sorted(r["tokens"])
        s = r["safeguarded"]
        shown = ", ".join(map(str, s[:8])) + (", ..." if len(s) > 8 else "")
        lines.append(f"{lp}: {len(c)} experts, tokens per expert min {c[0]} / median {c[len(c) // 2]} / max {c[-1]}; "
                     f"{len(s)} under {r['min_tokens']} safeguarded" + (f" ({shown})" if s else ""))
    return lines
