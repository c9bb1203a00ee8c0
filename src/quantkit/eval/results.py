"""The rows of an evaluation, typed: one ModelRow per language model, one ClassifierRow per encoder
classifier, one DemoRow per rung of `quantkit demo`; EvalResult holds the rows and the run's meta.

to_dict() gives the JSON object of a row, with the keys users and tests read: a group of optional
fields (speed; a ladder rung's build facts) appears only when it was measured or set.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..runtimes import TORCH_PREFIX, split_spec

_HEAD = ("path", "runtime", "is_reference", "eval_s", "eval_load_s")
_SIZE = ("name", "file_bytes", "n_params", "types", "bits_per_weight", "bits_per_weight_linear")


@dataclass(kw_only=True)
class ScoredRow:
    """What every scored model has: where it is, how it ran, its sizes and (measured) speed."""
    path: str
    runtime: str
    is_reference: bool = False
    eval_s: float | None = None
    eval_load_s: float | None = None
    name: str = ""
    file_bytes: int = 0
    n_params: int = 0
    types: dict[str, int] = field(default_factory=dict)
    bits_per_weight: float | None = None
    bits_per_weight_linear: float | None = None
    speed: dict[str, Any] | None = None    # the speed probe's figures (eval.speed, eval.classify)

    _TAIL: ClassVar[tuple[str, ...]] = ()  # optional groups after speed, dropped while unset

    def set_size(self, name: str, file_bytes: int, n_params: int, types: dict[str, int], linear_params: int,
                 linear_bytes: int) -> None:
        self.name, self.file_bytes, self.n_params, self.types = name, file_bytes, n_params, types
        self.bits_per_weight = 8 * file_bytes / n_params if n_params else None
        self.bits_per_weight_linear = 8 * linear_bytes / linear_params if linear_params else None

    def _present(self, name: str) -> bool:
        return True

    def to_dict(self) -> dict[str, Any]:
        names = [f.name for f in dataclasses.fields(self)]
        own = [n for n in names if n not in _HEAD and n not in _SIZE and n != "speed" and n not in self._TAIL]
        order = [*_HEAD, *own, *_SIZE, *(["speed"] if self.speed is not None else []),
                 *(n for n in self._TAIL if self._present(n))]
        return {n: getattr(self, n) for n in order}

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """A row from its JSON object (keys this row type does not have are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(kw_only=True)
class ModelRow(ScoredRow):
    """A language model scored against the reference on the same token ids (eval.metrics.summarize)."""
    n_scored: int = 0
    nll: float | None = None
    ppl: float | None = None
    ppl_stderr: float | None = None
    kld_mean: float | None = None
    kld_stderr: float | None = None
    kld_median: float | None = None
    kld_p99: float | None = None
    kld_max: float | None = None
    top1_agreement: float | None = None
    delta_p_mean: float | None = None
    delta_p_rms: float | None = None
    # a ladder's rows (eval.ladder.label_ladder): the rung; a rung built here also its build facts
    rung: str | None = None
    method: str | None = None
    file_type: str | None = None
    build_s: float | None = None
    build_reused: bool | None = None
    calibration: str | None = None

    _TAIL: ClassVar[tuple[str, ...]] = ("rung", "method", "file_type", "build_s", "build_reused", "calibration")

    def _present(self, name: str) -> bool:
        if name in ("rung", "method"):
            return self.rung is not None
        return self.file_type is not None


@dataclass(kw_only=True)
class ClassifierRow(ScoredRow):
    """An encoder classifier: task accuracy, and agreement with the reference's label distribution."""
    quantization: str | None = None
    n_layers: int = 0
    n_examples: int = 0
    accuracy: float = 0.0
    accuracy_stderr: float = 0.0
    kld_mean: float = 0.0
    kld_median: float = 0.0
    kld_p99: float = 0.0
    kld_max: float = 0.0
    top1_agreement: float = 0.0
    delta_p_mean: float = 0.0
    ppl: None = None
    ppl_stderr: None = None


@dataclass(kw_only=True)
class DemoRow:
    """One rung of `quantkit demo`: the file, its greedy continuation of the prompt in llama.cpp,
    and (when the demo scores them) its quality against the F32 reference."""
    format: str            # "Q4_0"
    method: str            # "RTN" | "GPTQ"
    rung: str              # "Q4_0 GPTQ"
    file: str
    file_bytes: int
    bits_per_weight: float
    quantize_s: float | None   # None: re-used from the cache
    reused: bool
    calibration: str | None
    load_s: float
    prompt_tok_s: float
    gen_tok_s: float
    threads: int
    output: str
    ppl: float | None = None
    kld: float | None = None
    top1: float | None = None
    ref_ppl: float | None = None
    report: str | None = None
    eval_tokens: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class EvalResult:
    rows: list[ScoredRow]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        # rows given as JSON objects (a saved result read back): typed by the run's kind
        row_type = ClassifierRow if self.meta.get("kind") == "classifier" else ModelRow
        self.rows = [row_type.from_dict(r) if isinstance(r, dict) else r for r in self.rows]

    def to_dict(self) -> dict[str, Any]:
        return {"meta": self.meta, "models": [r.to_dict() for r in self.rows]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_json_default)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(type(o).__name__)


def model_labels(specs: list[str]) -> list[str]:
    """Each model's name in a table: its file or directory name ("torch:" kept), or its whole
    path where two names would be the same."""
    names = []
    for sp in specs:
        path, forced = split_spec(sp)
        names.append((TORCH_PREFIX if forced else "") + os.path.basename(os.path.normpath(path)))
    return [n if names.count(n) == 1 else p for n, p in zip(names, specs)]
