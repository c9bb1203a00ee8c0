"""Mixture-of-experts checkpoints whose experts are stored fused, seen as the per-expert
checkpoints they stand for.

transformers 5 holds a sparse MLP's experts as two 3-D parameters, `{layer}.mlp.experts.gate_up_proj`
[n_expert, 2 * ff, hidden] (each expert's gate rows, then its up rows) and `{layer}.mlp.experts.down_proj`
[n_expert, hidden, ff], and Mixtral's router as `{layer}.mlp.gate.weight`. Its save_pretrained
writes the released per-expert layout (`mlp.experts.{e}.gate_proj.weight`, Mixtral's
`block_sparse_moe.experts.{e}.w1/w3/w2.weight`) unless called with save_original_format=False,
which writes the fused parameters under those names. Its from_pretrained loads both, and for
Mixtral also the fused tensors and router spelled `block_sparse_moe.` (its conversion renames
that prefix to `mlp.`). These are the layouts read here; a fused tensor with a `.weight` suffix
is not one transformers loads (it reports it unexpected and leaves the parameter uninitialised).

`per_expert_view` maps a checkpoint's tensor listing to the listing of the per-expert checkpoint
with the same values (the names transformers' save_pretrained writes by default): every fused
tensor becomes one entry per expert and matrix, each a `Piece` saying which rows of which expert
of the stored tensor it is, so a reader needs no second code path and a converted file is the
one the per-expert checkpoint gives, byte for byte.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable, TypeVar

from ..util.errors import QuantkitError

FUSED = re.compile(r"^(.*\blayers\.\d+)\.(mlp|block_sparse_moe)\.experts\.(gate_up_proj|down_proj)$")
_ROUTER = re.compile(r"^(.*\blayers\.\d+)\.(mlp|block_sparse_moe)\.gate\.weight$")
# the per-expert names of each architecture that stores its experts fused in memory:
# (sparse MLP module, {matrix: checkpoint name})
_PER_EXPERT = {
    "qwen3moe": ("mlp", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
    "mixtral": ("block_sparse_moe", {"gate": "w1", "up": "w3", "down": "w2"}),
}

T = TypeVar("T")


@dataclass(frozen=True)
class Piece:
    """A listed tensor that is part of a stored one: rows r0:r1 of expert `expert` of the 3-D
    `stored` tensor (expert None: the whole tensor, stored under another name)."""
    stored: str
    expert: int | None = None
    r0: int = 0
    r1: int = 0


def expert_width(hp: dict) -> int:
    """An expert's FFN width: moe_intermediate_size (Qwen3-MoE), else intermediate_size (Mixtral)."""
    return int(hp.get("moe_intermediate_size") or hp["intermediate_size"])


def is_fused(name: str) -> bool:
    return FUSED.match(name) is not None


def per_expert_view(arch_key: str, shapes: dict[str, tuple[int, ...]], hp: dict | None, path: str,
                    payload: Callable[[str], T] = lambda n: n) -> tuple[dict[str, tuple[tuple[int, ...], T]],
                                                                        dict[str, Piece]]:
    """The tensors of a checkpoint (`shapes`: name -> stored shape) as its per-expert form:
    ({name: (shape, payload(stored name))}, {listed name: Piece} for the names that are not
    stored tensors). Unfused checkpoints come back unchanged. `hp` (config.json, text config
    merged): fused shapes are checked against it, a contradiction being one error naming the
    tensor, the shape config.json implies and the one found (None: not checked, shapes as stored)."""
    fused = {n: FUSED.match(n) for n in shapes}
    fused = {n: m for n, m in fused.items() if m is not None}
    out: dict[str, tuple[tuple[int, ...], T]] = {}
    pieces: dict[str, Piece] = {}
    if not fused or arch_key not in _PER_EXPERT:
        return {n: (s, payload(n)) for n, s in shapes.items()}, pieces
    module, names = _PER_EXPERT[arch_key]
    for name in sorted(fused):
        _check(name, shapes[name], fused[name].group(3), hp, path)

    def put(name: str, shape: tuple[int, ...], piece: Piece) -> None:
        if name in out:
            raise QuantkitError(f"tensor {name} is stored twice (as itself and in {piece.stored})", path,
                                "keep one layout of the experts and one spelling of the router in the checkpoint")
        out[name] = (shape, payload(piece.stored))
        if piece.stored != name:
            pieces[name] = piece

    for name, shape in shapes.items():
        m = fused.get(name)
        if m is None:
            r = _ROUTER.match(name)
            listed = f"{r.group(1)}.{module}.gate.weight" if r else name
            put(listed, shape, Piece(name))
            continue
        layer, _, what = m.groups()
        n_exp, rows, cols = shape
        mats = (("gate", 0, rows // 2), ("up", rows // 2, rows)) if what == "gate_up_proj" else (("down", 0, rows),)
        for e in range(n_exp):
            for mat, r0, r1 in mats:
                put(f"{layer}.{module}.experts.{e}.{names[mat]}.weight", (r1 - r0, cols), Piece(name, e, r0, r1))
    return out, pieces


def _check(name: str, shape: tuple[int, ...], what: str, hp: dict | None, path: str) -> None:
    """A fused tensor is [n_expert, rows, cols], gate_up_proj's rows even; with a config, the
    shape it implies."""
    cfg = os.path.join(path, "config.json")
    if hp is not None:
        n_exp = int(hp.get("num_local_experts") or hp.get("num_experts") or 0)
        if not n_exp:
            raise QuantkitError(f"the checkpoint has fused expert tensors ({name}) but config.json gives no "
                                "num_experts", cfg)
        hidden, ff = int(hp["hidden_size"]), expert_width(hp)
        want = (n_exp, 2 * ff, hidden) if what == "gate_up_proj" else (n_exp, hidden, ff)
        if tuple(shape) != want:
            raise QuantkitError(f"tensor {name} has shape {list(shape)} but config.json implies {list(want)}", cfg,
                                "the config does not match the weights")
    elif len(shape) != 3 or (what == "gate_up_proj" and shape[1] % 2):
        raise QuantkitError(f"tensor {name} has shape {list(shape)}, not [experts, rows, columns]"
                            + (" with an even number of rows (gate, then up)" if what == "gate_up_proj" else ""),
                            path, "the checkpoint is damaged")

