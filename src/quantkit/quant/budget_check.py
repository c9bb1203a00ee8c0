"""The measured check of a budgeted mix: the allocation's choice against a few structurally
different runner-ups, each measured as a whole, the measured best kept.

The allocation (quant.allocate) minimises the *sum* of per-tensor estimates, each measured or
scaled from probes of one tensor at a time (quant.sensitivity). The sum is wrong when many
tensors are lossy at once: on Gemma-3-270M at llama.cpp's Q4_K_S size the knapsack kept the
embedding at Q8_0 and took lossy steps on 27 decoder tensors, estimated at 0.0087 KL and
measured at 0.099, while the mix with the embedding one type lower and the decoder lossless
measured 0.012 in fewer bytes. So after the knapsack these candidates are measured, each with
one KL probe of the whole mix (round to nearest, every tensor at its type at once) on the
calibration's probe tokens (quant.sensitivity.Prober):

    allocation          the knapsack's mix
    HEAD at TYPE        the best mix (the same knapsack) with the token embedding, or an untied
                        output head, held at TYPE: one per type that fits
    decoder lossless    the best mix with every decoder linear at its least-cost types

Every candidate is an allocation under the same byte budget, so the kept mix meets the budget
exactly as the knapsack's does. The allocation's mix is measured first, then the runner-ups in
order of the least cost their constrained tensors alone have; one whose constrained tensor, or
whose worst single tensor, alone costs more than the best measured KL so far is neither
allocated nor measured (a mix's KL is at least about its worst tensor's). Measured KLs are cached beside the sensitivity
(keyed by the mix), so a second file at the same budget (GPTQ after RTN) probes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Callable

from ..util.errors import QuantkitError
from .budget import Budget, MixPlan, plan_mix
from .sensitivity import HEAD_NAMES, Sensitivity

LOSSLESS_ABS = 1e-6        # a decoder type within this of the tensor's least cost counts as lossless


@dataclass
class Candidate:
    label: str
    mix: MixPlan | None                 # None: not allocated (skipped on its bound)
    measured: float | None = None       # KL of the whole mix on the probe tokens; None: not measured
    skipped: str = ""                   # why it was not measured

    def as_dict(self) -> dict:
        return {"label": self.label, "file_bytes": self.mix.file_bytes if self.mix else None,
                "est_kl": self.mix.est_kl if self.mix else None,
                "measured_kl": self.measured, "skipped": self.skipped}


def runner_up_restrictions(sens: Sensitivity) -> list[tuple[str, dict[str, set[str]]]]:
    """(label, restrict) of every runner-up: each head at each of its types, then the decoder at
    its least-cost types."""
    out = []
    for h in (n for n in HEAD_NAMES if n in sens.tensors):
        for t, cost in sorted(sens.tensors[h].costs.items(), key=lambda kv: kv[1]):
            out.append((f"{h.split('.')[0]} at {t.upper()}", {h: {t}}))
    dec = {}
    for n, c in sens.tensors.items():
        if n not in HEAD_NAMES:
            least = min(c.costs.values())
            dec[n] = {t for t, v in c.costs.items() if v <= least + LOSSLESS_ABS}
    if dec:
        out.append(("decoder lossless", dec))
    return out


def _bound(sens: Sensitivity, restrict: dict[str, set[str]]) -> float:
    """The least cost any mix under `restrict` can have by its worst single tensor."""
    return max((min(sens.tensors[n].costs[t] for t in ts) for n, ts in restrict.items()), default=0.0)


def _worst(sens: Sensitivity, mix: MixPlan) -> float:
    return max((sens.tensors[n].costs[t] for n, t in mix.types.items() if n in sens.tensors), default=0.0)


def check_mix(sens: Sensitivity, budget: Budget, metadata: dict, chosen: MixPlan,
              measure: Callable[[dict[str, str]], float], fit_bytes: int | None = None) -> tuple[MixPlan, list[Candidate]]:
    """(the measured best of the knapsack's mix and its runner-ups, every candidate considered).
    `measure(types)`: the KL of the mix whose tensor -> type map is `types`."""
    first = Candidate("allocation", chosen, float(measure(chosen.types)))
    cands, best = [first], first
    seen = {tuple(sorted(chosen.types.items()))}
    for label, restrict in sorted(runner_up_restrictions(sens), key=lambda lr: _bound(sens, lr[1])):
        bound = _bound(sens, restrict)
        if bound > best.measured:
            cands.append(Candidate(label, None, None, f"its constrained tensor alone costs {bound:.4g} > "
                                                         f"{best.measured:.4g} measured"))
            continue
        try:
            mix = plan_mix(sens, budget, metadata, fit_bytes, restrict=restrict)
        except QuantkitError:
            continue                                 # this type does not fit the budget
        key = tuple(sorted(mix.types.items()))
        if key in seen:
            continue
        seen.add(key)
        c = Candidate(label, mix)
        cands.append(c)
        worst = _worst(sens, mix)
        if worst > best.measured:
            c.skipped = f"its worst tensor alone costs {worst:.4g} > {best.measured:.4g} measured"
            continue
        c.measured = float(measure(mix.types))
        if c.measured < best.measured:
            best = c
    kept = best.mix
    if best is not first:
        kept.notes.append(f"measured check: kept '{best.label}' (KL {best.measured:.4g} on the probe tokens, "
                          f"estimate {kept.est_kl:.4g}) over the allocation's mix (KL {first.measured:.4g}, "
                          f"estimate {chosen.est_kl:.4g})")
    kept.checks = [c.as_dict() for c in cands]
    return kept, cands


def mix_key(types: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(sorted(types.items())).encode()).hexdigest()[:24]


class MixProbe:
    """measure(types) for check_mix: the float model of `src` and its reference on the
    calibration's probe tokens (the sensitivity pass's), loaded on the first mix not in the
    cache file `cache` (a JSON of mix key -> KL; None: no cache)."""

    def __init__(self, src, path: str, sens: Sensitivity, calib: str | None, seqlen: int, cache: str | None = None):
        self.src, self.path, self.sens, self.calib, self.seqlen, self.cache = src, path, sens, calib, seqlen, cache
        self.prober, self.params, self.n_probed = None, {}, 0
        self.known: dict[str, float] = {}
        if cache and os.path.isfile(cache):
            try:
                with open(cache, encoding="utf-8") as f:
                    self.known = {k: float(v) for k, v in json.load(f).items()}
            except (OSError, ValueError, AttributeError):
                self.known = {}

    def _load(self) -> None:
        from .calib import calibration_ids
        from .sensitivity import PROBE_SAMPLES, PROBE_TOKENS, Prober
        from .sensitivity_pass import load_float_model
        fm = load_float_model(self.src, self.path)
        ids = calibration_ids(fm.tokenizer, self.calib, PROBE_SAMPLES, self.seqlen)[:, :PROBE_TOKENS]
        self.prober, self.params = Prober(fm.model, ids, fm.layers), fm.params

    def __call__(self, types: dict[str, str]) -> float:
        key = mix_key(types)
        if key in self.known:
            return self.known[key]
        if self.prober is None:
            self._load()
        from .sensitivity import roundtrip, tensor_layer
        changes, first = {}, None
        for n, t in types.items():
            c = self.sens.tensors.get(n)
            if c is None or n not in self.params or c.errors.get(t) == 0.0:     # kept, or exactly representable
                continue
            w = self.params[n].data
            changes[self.params[n]] = w.half().float() if t == "f16" else roundtrip(t, w)
            layer = tensor_layer(n)
            first = 0 if layer is None else layer if first is None else min(first, layer)
        kl = self.prober.kl(changes, first or None)
        self.n_probed += 1
        self.known[key] = kl
        if self.cache:
            from ..util.atomic import atomic_output
            try:
                os.makedirs(os.path.dirname(self.cache), exist_ok=True)
                with atomic_output(self.cache) as tmp, open(tmp, "w", encoding="utf-8") as f:
                    json.dump(self.known, f)
            except OSError:
                pass
        return kl
