"""What each tensor's type costs the model's output: an estimate of the KL divergence to the
unquantized model, per quantizable tensor and per candidate type, from one calibration pass.

    decoder linears   err(t, type) = tr(ΔW H ΔWᵀ), ΔW the round-to-nearest error of the type,
                      H = 2/N Σ x xᵀ the Hessian of the linear's input over the calibration tokens.
                      KL ≈ scale(class, layer) · err: the scale is measured by single-tensor KL
                      probes (the tensor alone at its lowest candidate type, the rest float) at a
                      few layers per class (first, middle, last), interpolated in log space
                      between them.
    token_embd, output   measured directly: one probe per candidate type (the tensor's input is
                      a lookup, and when the embedding is the tied output head both roles are in
                      the one measurement).

Costs add over tensors (the allocation, quant.allocate, sums them). Candidate types come from
the type registry (codecs.registry.can_encode): every type quantkit encodes, but F32 and BF16
(F16 is the float candidate) and the types that need an importance matrix, each where its
block divides the tensor's rows. `spearman` and `validate` check the ranking against measured
single-tensor changes.

The pass holds the model in float32 (the blocks are loaded all at once): sized for the models
quantkit quantizes on a CPU.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import torch

from ..codecs.registry import QTYPES, can_encode, qtype

FLOAT_SKIP = ("f32", "bf16")
HEAD_NAMES = ("token_embd.weight", "output.weight")
MAX_ERR_VALUES = 1 << 22          # rows sampled per tensor for the error estimate beyond this many values
PROBE_SAMPLES = 2                 # calibration samples the probes score...
PROBE_TOKENS = 64                 # ...their first this many tokens each
SENS_NSAMPLES = 16                # calibration samples for the Hessians (at most the recipe's)
CLASS_KEYS = (("attn_qkv", "attn_qkv"), ("attn_q.", "attn_q"), ("attn_k.", "attn_k"), ("attn_v.", "attn_v"),
              ("attn_output", "attn_output"), ("ffn_gate", "ffn_gate"), ("ffn_up", "ffn_up"),
              ("ffn_down", "ffn_down"))


def tensor_class(name: str) -> str:
    """token_embd, output, attn_q ... ffn_down, or other."""
    if name in HEAD_NAMES:
        return name.split(".")[0]
    for key, cls in CLASS_KEYS:
        if key in name:
            return cls
    return "other"


def tensor_layer(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blk" and parts[1].isdigit() else None


def candidate_types(shape: tuple[int, ...], allowed=None) -> list[str]:
    """The types a quantizable tensor of this shape may take, largest first: every type quantkit
    encodes whose block divides the rows (F32/BF16 left out: F16 is the float candidate; types
    that need an importance matrix left out); `allowed`: only these (the user's --types)."""
    ncols = int(shape[-1])
    out = []
    for name, q in QTYPES.items():
        if name in FLOAT_SKIP or not can_encode(name) or q.needs_imatrix:
            continue
        if allowed is not None and name not in allowed:
            continue
        if ncols % q.block_size == 0:
            out.append(name)
    return sorted(out, key=lambda t: -qtype(t).nbytes((1, ncols)) if ncols % qtype(t).block_size == 0 else 0)


def roundtrip(type_name: str, w: torch.Tensor) -> torch.Tensor:
    """w float32 [rows, n] through `type_name` and back (llama.cpp's round to nearest)."""
    q = qtype(type_name)
    data = q.quantize_rows(w.contiguous())
    return q.dequantize_rows(data, w.shape[-1])


@dataclass
class TensorCost:
    shape: tuple[int, ...]
    cls: str
    layer: int | None
    costs: dict[str, float]                    # type -> estimated KL divergence
    errors: dict[str, float] = field(default_factory=dict)   # type -> tr(ΔW H ΔWᵀ) (decoder linears)


@dataclass
class Sensitivity:
    """Per quantizable tensor (GGUF name) its candidate types' estimated KL; the tensors that
    keep their type (`fixed`: name -> (shape, type)); `order`: every tensor in file order."""
    tensors: dict[str, TensorCost]
    fixed: dict[str, tuple[tuple[int, ...], str]]
    order: list[str]
    scales: dict[str, list[tuple[int, float]]]   # class -> [(layer, KL per unit error)]
    probes: list[dict]                           # every single-tensor probe: tensor, type, kl, err
    meta: dict = field(default_factory=dict)     # calibration, seconds

    def n_params(self) -> int:
        shapes = [c.shape for c in self.tensors.values()] + [s for s, _ in self.fixed.values()]
        return sum(math.prod(s) for s in shapes)

    def to_json(self) -> str:
        d = {"tensors": {k: asdict(v) for k, v in self.tensors.items()},
             "fixed": {k: [list(s), t] for k, (s, t) in self.fixed.items()}, "order": self.order,
             "scales": self.scales, "probes": self.probes, "meta": self.meta}
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> "Sensitivity":
        d = json.loads(text)
        ts = {k: TensorCost(tuple(v["shape"]), v["cls"], v["layer"], v["costs"], v.get("errors", {}))
              for k, v in d["tensors"].items()}
        fixed = {k: (tuple(s), t) for k, (s, t) in d["fixed"].items()}
        scales = {k: [tuple(p) for p in v] for k, v in d["scales"].items()}
        return cls(ts, fixed, d["order"], scales, d["probes"], d.get("meta", {}))


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(x):
        t = torch.tensor(x, dtype=torch.float64)
        order = torch.argsort(t)
        r = torch.empty_like(t)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        for v in torch.unique(t):               # ties: the mean rank
            m = t == v
            if int(m.sum()) > 1:
                r[m] = r[m].mean()
        return r
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("spearman needs two lists of the same length, at least 2")
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den else 0.0


class Prober:
    """The float model with its probe tokens' reference log-probabilities: kl(changes) swaps
    some weights for others, scores the probe tokens and puts the weights back.

    With the decoder `layers` given, the reference pass keeps each layer's output for the probe
    tokens, and a probe whose changes lie in layer L (`first_layer`) replays layers 0..L-1 from
    those outputs instead of running them: the same numbers, only the layers from L on (and the
    output head) computed."""

    def __init__(self, model, ids: torch.Tensor, layers=None):
        self.model, self.ids = model, ids
        self.layers = list(layers) if layers is not None else []
        self.cached: list[list] = [[] for _ in self.layers]          # [layer][row] -> that layer's output
        hooks = [layer.register_forward_hook(self._keeper(i)) for i, layer in enumerate(self.layers)]
        try:
            self.ref = [self._logp(row) for row in ids]
        finally:
            for h in hooks:
                h.remove()

    def _keeper(self, i: int):
        def keep(mod, args, out):
            self.cached[i].append(out)
        return keep

    @torch.no_grad()
    def _logp(self, row: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=row[None], use_cache=False)
        return torch.log_softmax(out.logits[0].float(), dim=-1)

    @torch.no_grad()
    def kl(self, changes: dict[torch.nn.Parameter, torch.Tensor], first_layer: int | None = None) -> float:
        saved = {p: p.data for p in changes}
        for p, w in changes.items():
            p.data = w
        skip = self.layers[:first_layer] if first_layer and all(self.cached) else []
        try:
            tot, n = 0.0, 0
            for r, (row, ref) in enumerate(zip(self.ids, self.ref)):
                own = [layer.__dict__.get("forward") for layer in skip]      # an instance-level forward, kept
                for i, layer in enumerate(skip):
                    layer.forward = (lambda out: lambda *a, **k: out)(self.cached[i][r])
                try:
                    lq = self._logp(row)
                finally:
                    for layer, f in zip(skip, own):
                        if f is None:
                            del layer.forward
                        else:
                            layer.forward = f
                tot += float((ref.exp() * (ref - lq)).sum())
                n += ref.shape[0]
                del lq
        finally:
            for p, w in saved.items():
                p.data = w
        return max(tot / max(n, 1), 0.0)


def _row_sample(w: torch.Tensor) -> tuple[torch.Tensor, float]:
    rows = w.shape[0]
    keep = max(1, min(rows, MAX_ERR_VALUES // max(1, w.shape[1])))
    if keep >= rows:
        return w, 1.0
    idx = torch.linspace(0, rows - 1, keep).round().long()
    return w[idx], rows / keep


def linear_errors(w: torch.Tensor, H: torch.Tensor, types: list[str]) -> dict[str, float]:
    """tr(ΔW H ΔWᵀ) of w [out, in] at each type (rows sampled beyond MAX_ERR_VALUES values)."""
    ws, scale = _row_sample(w.float())
    Hd = H.to(torch.float64)
    out = {}
    for t in types:
        d = (roundtrip(t, ws) - ws).to(torch.float64)
        out[t] = float(((d @ Hd) * d).sum()) * scale
    return out


def interp_scale(points: list[tuple[int, float]], layer: int) -> float:
    """Log-linear interpolation of (layer, scale) points (constant beyond the ends)."""
    pts = sorted(points)
    if layer <= pts[0][0]:
        return pts[0][1]
    for (l0, s0), (l1, s1) in zip(pts, pts[1:]):
        if layer <= l1:
            f = (layer - l0) / max(1, l1 - l0)
            return math.exp(math.log(s0) * (1 - f) + math.log(s1) * f)
    return pts[-1][1]


def probe_layers(n_layer: int, k: int = 3) -> list[int]:
    return sorted({round(i * (n_layer - 1) / max(1, k - 1)) for i in range(k)})
