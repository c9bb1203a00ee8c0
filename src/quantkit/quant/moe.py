"""Mixtures of experts (Qwen3-MoE, Mixtral) in the block-sequential GPTQ pipeline.

transformers keeps a sparse MLP as `mlp.gate` (the router: weight [E, hidden]; its forward
returns (logits, top-k weights, top-k indices)) and `mlp.experts` (fused 3-D parameters
gate_up_proj [E, 2I, hidden], gate rows first, and down_proj [E, hidden, I]); checkpoints store
one 2-D tensor per expert (`mlp.experts.{e}.gate_proj.weight`, Mixtral's
`block_sparse_moe.experts.{e}.w1/w3/w2.weight`). `expert_fetch` builds the fused parameters
from those (a Hugging Face checkpoint storing them fused is read through models.hf as the
per-expert one, each expert's rows alone, so the same path and memory serve both).

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

Batches: experts are solved EXPERT_BATCH_ELEMENTS weights at a time (8 of Qwen3-30B-A3B's
gate/up, 16 of its downs) by quant.gptq.quantize_weights, whose column loop runs once for the
batch and gives each expert exactly what solving it alone gives.

Memory: a batch's Hessians, factors and float32 working copies (~0.7 GB at 30B-A3B's shapes),
the two pooled Hessians (hidden² + I² floats), the starved experts' few down inputs, the
layer's MLP inputs (as large as the block's hidden states) and the experts' stored forms;
never every expert's Hessians at once. The streaming driver loads a bf16 checkpoint's fused
expert parameters in bf16 (`expert_fetch(compact=True)`, lossless), half of float32; those are
not overwritten with the solved values: the block's output is then `moe_output`, the eager
experts forward of transformers run on the stored forms decoded one expert at a time.
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


# weights in one batched solve (quant.gptq.quantize_weights): the batch's float32 working copies
# (weights, codes, solved values) are ~0.1 GB each, its Hessians and factors a few more
EXPERT_BATCH_ELEMENTS = 24 << 20


class _Layer:
    """One sparse MLP's experts being solved, a batch of experts at a time."""

    def __init__(self, mlp: nn.Module, lp: str, cfg: PipelineConfig, report: PipelineReport, done: dict):
        self.mlp, self.lp, self.cfg, self.report, self.done = mlp, lp, cfg, report, done
        ex = mlp.experts
        self.gu, self.dn, self.act = ex.gate_up_proj.data, ex.down_proj.data, ex.act_fn
        self.n_expert, two_i, self.hidden = self.gu.shape
        self.inter = two_i // 2
        # float32 parameters take the solved values (the model's own forward then runs on them);
        # compact (bf16) ones keep the checkpoint's, the solved values being the stored forms'
        self.write_back = self.gu.dtype == torch.float32 and self.dn.dtype == torch.float32
        self.grids = {p: cfg.grid(f"{lp}.mlp.experts.{p}") if callable(cfg.grid) else cfg.grid for p in PARTS}
        self.stored: dict[str, list] = {p: [None] * self.n_expert for p in PARTS}

    def batch(self, fused: torch.Tensor) -> int:
        return max(1, EXPERT_BATCH_ELEMENTS // fused[0].numel())

    def _solve(self, es: list[int], parts: tuple[str, ...], W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
        """Experts es's matrices W [B, rows, in] (the rows of `parts`, stacked) solved on their
        H [B, in, in]; returns Ŵ [B, rows, in] (parts left unquantized by the grid keep their values)."""
        out = W.clone()
        groups: dict[object, list[int]] = {}
        for k, p in enumerate(parts):
            if self.grids[p] is not None:
                groups.setdefault(self.grids[p], []).append(k)
        rows = W.shape[1] // len(parts)
        for grid, ks in groups.items():
            sel = torch.cat([torch.arange(k * rows, (k + 1) * rows) for k in ks])
            name = ", ".join(f"{self.lp}.mlp.experts.{{{es[0]}..{es[-1]}}}.{parts[k]}" for k in ks)
            try:
                res = quantize_weights(W[:, sel].contiguous(), H, grid, self.cfg.gptq)
            except ValueError as e:
                raise QuantkitError(f"cannot quantize {name}: {e}") from None
            for b, (e, r) in enumerate(zip(es, res)):
                out[b, sel] = r.dequantized.to(W.dtype)
                pieces = r.weight.split_rows([rows] * len(ks)) if len(ks) > 1 else [r.weight]
                for k, piece in zip(ks, pieces):
                    self.stored[parts[k]][e] = piece
                    key = f"{self.lp}.mlp.experts.{parts[k]}"
                    self.report.damp[key] = max(self.report.damp.get(key, 0.0), r.damp or 0.0)
                    self.report.loss[key] = self.report.loss.get(key, 0.0) + (r.loss or 0.0)
        return out

    def gate_up(self, es: list[int], xs: list[torch.Tensor], H: torch.Tensor) -> list[torch.Tensor]:
        """Solve experts es's gate/up on H [B, hidden, hidden]; returns the down inputs of each
        one's tokens xs[b] through its solved gate/up."""
        W = self._solve(es, ("gate_proj", "up_proj"), self.gu[es].float(), H)
        out = []
        for b, e in enumerate(es):
            if self.write_back:
                self.gu[e] = W[b]
            g, u = F.linear(xs[b], self.gu[e] if self.write_back else W[b]).chunk(2, dim=-1)
            out.append(self.act(g) * u)
        return out

    def down(self, es: list[int], H: torch.Tensor) -> None:
        W = self._solve(es, ("down_proj",), self.dn[es].float(), H)
        if self.write_back:
            self.dn[es] = W

    def solved(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's solved (gate_up, down) matrices, float32: the stored forms decoded."""
        if self.write_back:
            return self.gu[e], self.dn[e]
        gu = [self.stored[p][e].dequantize() if self.stored[p][e] is not None else w.float()
              for p, w in zip(PARTS[:2], self.gu[e].chunk(2))]
        d = self.stored["down_proj"][e]
        return torch.cat(gu), d.dequantize() if d is not None else self.dn[e].float()

    def finish(self) -> None:
        for p in PARTS:
            if self.grids[p] is not None:
                self.done[f"{self.lp}.mlp.experts.{p}"] = ExpertStack(self.stored[p])


def _hessian_of(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    H = new_hessian(x.shape[-1])
    return H, accumulate_hessian(x, H, 0)


def _stacked(Hs: list[torch.Tensor]) -> torch.Tensor:
    out = torch.empty(len(Hs), *Hs[0].shape, dtype=Hs[0].dtype)
    for b, H in enumerate(Hs):
        out[b] = H
    return out


def _chunks(items: list[int], n: int) -> list[list[int]]:
    return [items[k:k + n] for k in range(0, len(items), n)]


@torch.no_grad()
def quantize_experts(layer: nn.Module, lp: str, hidden: list[torch.Tensor] | None, kwargs: dict,
                     cfg: PipelineConfig, report: PipelineReport, done: dict) -> bool:
    """The pipeline's `sparse_mlp` stage: GPTQ of the block's experts on routed calibration
    (module docstring), their stored forms into `done` ({lp}.mlp.experts.{gate,up,down}_proj:
    ExpertStack), the block's outputs written over `hidden`. False for a dense block (nothing
    done). Experts are solved a batch at a time (quant.gptq.quantize_weights, the same result as
    one at a time): gate/up of a batch, then the down of its experts with enough tokens; the
    starved experts' downs at the end, on the layer's pooled down Hessian."""
    mlp = sparse_mlp(layer)
    if mlp is None:
        return False
    if cfg.method != "gptq" or hidden is None:
        raise QuantkitError("the experts of a mixture of experts are quantized with GPTQ only in the block pipeline",
                            hint="use --method gptq with a GGUF format, or --method rtn for a plain GGUF")
    _own_forward_or_float(mlp)
    xs = _record_mlp_inputs(layer, mlp, hidden, kwargs)
    x = xs.reshape(-1, xs.shape[-1])
    idx = route(mlp, x)
    L = _Layer(mlp, lp, cfg, report, done)
    m = cfg.gptq.moe_min_tokens or default_min_tokens(L.hidden)
    counts = torch.bincount(idx.reshape(-1), minlength=L.n_expert).tolist()
    pooled_gu, _ = _hessian_of(x)           # every token routed to top_k experts: the pooled gate/up Hessian
    pooled_dn, n_dn = new_hessian(L.inter), 0
    starved: dict[int, torch.Tensor] = {}   # expert -> its down inputs
    for es in _chunks(list(range(L.n_expert)), L.batch(L.gu)):
        xe = [x[(idx == e).any(dim=-1).nonzero().squeeze(-1)] for e in es]
        Hs = []
        for e, xb in zip(es, xe):
            H, _ = _hessian_of(xb)
            Hs.append(H if counts[e] >= m else _mixed(H, xb.shape[0], pooled_gu, m))
        H = _stacked(Hs)
        del Hs
        xds = L.gate_up(es, xe, H)
        del H, xe
        fed = []
        for e, xd in zip(es, xds):
            n_dn = accumulate_hessian(xd, pooled_dn, n_dn)
            if xd.shape[0] >= m:
                fed.append(e)
            else:
                starved[e] = xd
        for ds in _chunks(fed, L.batch(L.dn)):
            L.down(ds, _stacked([_hessian_of(xds[es.index(e)])[0] for e in ds]))
        del xds
    for ds in _chunks(list(starved), L.batch(L.dn)):
        Hs = []
        for e in ds:
            Hd, _ = _hessian_of(starved[e])
            Hs.append(_mixed(Hd, starved[e].shape[0], pooled_dn, m) if n_dn else Hd)
        L.down(ds, _stacked(Hs))
    L.finish()
    report.experts[lp] = {"tokens": counts, "min_tokens": m, "safeguarded": sorted(starved)}
    # residual + attention, plus the MoE with the quantized experts
    outs = [mlp(xk) for xk in xs] if L.write_back else moe_output(mlp, list(xs), L.solved)
    for h, o in zip(hidden, outs):
        h.add_(o)
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
