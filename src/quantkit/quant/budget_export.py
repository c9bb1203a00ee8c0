"""Writing a budgeted GGUF: sensitivity (cached), allocation, then the file by round to nearest
or by GPTQ onto each tensor's own grid (quant.gguf_export / quant.gguf_gptq with the mix as an
explicit per-tensor plan). Used by quantkit.api.quantize_budget and by ladder budget rungs."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

from ..models.open import open_model
from .budget import Budget, MixPlan, check_written, mix_file_type, plan_mix, smallest_weights
from .budget_check import MixProbe, check_mix
from .gptq import GPTQConfig
from .sensitivity import SENS_NSAMPLES, Sensitivity
from .sensitivity_pass import cache_path, measure_sensitivity


@dataclass
class BudgetReport:
    path: str
    source: str                   # the model's path
    mix: MixPlan
    sens: Sensitivity
    fit: object | None = None     # what `fit_resolver` returned (plan.fit.FitBudget)
    seconds: dict = field(default_factory=dict)
    n_probed: int = 0             # whole-mix KL probes the measured check ran (0: all cached, or no check)

    @property
    def file_bytes(self) -> int:
        return os.path.getsize(self.path)


def export_budget(model, output: str, budget: Budget, *, method: str = "rtn", calib: str | None = None,
                  nsamples: int = 128, seqlen: int = 512, gptq: GPTQConfig = GPTQConfig(),
                  true_sequential: bool = True, show_progress: bool = True, ray=None,
                  fit_resolver: Callable[[str, int], object] | None = None, check: bool = True,
                  types: list[str] | None = None) -> BudgetReport:
    """A GGUF of `model` under `budget` at `output`. Sensitivity on min(nsamples, SENS_NSAMPLES)
    x seqlen tokens of `calib`; GPTQ (method "gptq") on nsamples x seqlen. A fit budget needs
    `fit_resolver(model_path, smallest_weight_bytes)` returning an object whose `weights` is the
    byte budget for weights (the planner's, plan.fit.check_fit). `check`: measure the knapsack's
    mix and its runner-ups as wholes and keep the measured best (quant.budget_check). `types`: the
    candidate types (None: every type quantkit encodes without an importance matrix)."""
    t0 = time.perf_counter()
    src = open_model(model)
    fit = None
    try:
        sens = measure_sensitivity(src, src.path, calib=calib, nsamples=min(nsamples, SENS_NSAMPLES),
                                   seqlen=seqlen, show_progress=show_progress, types=types)
        t_sens = time.perf_counter()
        if budget.kind == "fit":
            fit = fit_resolver(src.path, smallest_weights(sens))
        fit_bytes = fit.weights if fit is not None else None
        mix = plan_mix(sens, budget, src.metadata, fit_bytes)
        t_alloc = time.perf_counter()
        n_probed = 0
        if check:
            probe = MixProbe(src, src.path, sens, calib, seqlen,
                             cache_path(src.path, calib, min(nsamples, SENS_NSAMPLES), seqlen,
                                        sorted(set(types)) if types else None).replace(".json", "-mixes.json")
                             if os.path.exists(src.path) else None)
            mix, _ = check_mix(sens, budget, src.metadata, mix, probe, fit_bytes)
            n_probed = probe.n_probed
            del probe
        t_check, ft, path = time.perf_counter(), mix_file_type(mix.plan), src.path
        if method != "gptq":
            from .gguf_export import export_gguf
            export_gguf(src, output, ft, plan=mix.plan, show_progress=show_progress)
    finally:
        src.close()
    if method == "gptq":
        from .gguf_gptq import export_gguf_gptq
        export_gguf_gptq(path, output, ft, calib=calib, nsamples=nsamples, seqlen=seqlen, gptq=gptq,
                         true_sequential=true_sequential, show_progress=show_progress, ray=ray, plan=mix.plan)
    check_written(output, mix)
    seconds = {"sensitivity": t_sens - t0, "allocation": t_alloc - t_sens, "check": t_check - t_alloc,
               "total": time.perf_counter() - t0,
               "sensitivity_cached": "seconds" in sens.meta and t_sens - t0 < 0.5 * sens.meta["seconds"]}
    return BudgetReport(output, path, mix, sens, fit, seconds, n_probed)
