"""One type per tensor under a byte budget: the multiple-choice knapsack.

Each item (a tensor) has options (a type each) with a size in bytes and a cost (the estimated
KL divergence, quant.sensitivity); choose one option per item so that the summed size stays
within the budget and the summed cost is least.

Solved exactly by dynamic programming over a byte grid: sizes are rounded *up* to a grid unit
u = ceil(budget / cells), so any solution of the rounded problem meets the true budget, and
the solution is optimal among all choices whose sizes, rounded up, fit. The optimality gap
against the unrounded problem is bounded: the true optimum at a budget smaller by n_items x u
bytes (at most n/cells of the budget, 0.1% for 128 tensors and 2^17 cells) is feasible in the
rounded problem, so ours is no worse than it. A greedy pass then spends the bytes the rounding
left: the single change that lowers the cost most and still fits, repeated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DEFAULT_CELLS = 1 << 17


@dataclass(frozen=True)
class Option:
    label: str
    nbytes: int
    cost: float


@dataclass
class Allocation:
    choice: dict[str, str]          # item -> option label
    nbytes: int                     # summed size of the choices
    cost: float                     # summed cost
    gap_bytes: int                  # the grid's rounding allowance (n_items x unit), see the module doc


class Infeasible(ValueError):
    """No choice fits: `smallest` is the least total size any choice has."""

    def __init__(self, smallest: int, budget: int):
        super().__init__(f"budget {budget} below the smallest total {smallest}")
        self.smallest, self.budget = smallest, budget


def smallest_total(items: dict[str, list[Option]]) -> int:
    return sum(min(o.nbytes for o in opts) for opts in items.values())


def largest_total(items: dict[str, list[Option]]) -> int:
    return sum(max(o.nbytes for o in opts) for opts in items.values())


def allocate(items: dict[str, list[Option]], budget: int, cells: int = DEFAULT_CELLS) -> Allocation:
    """The least-cost choice of one option per item with summed nbytes <= budget. Raises
    Infeasible when even the smallest options do not fit."""
    names = list(items)
    if not names:
        return Allocation({}, 0, 0.0, 0)
    lo = smallest_total(items)
    if lo > budget:
        raise Infeasible(lo, budget)
    # every item at its cheapest option fits: nothing to trade
    best = {n: min(items[n], key=lambda o: (o.cost, o.nbytes)) for n in names}
    if sum(o.nbytes for o in best.values()) <= budget:
        return _result(best, 0)
    unit = max(1, math.ceil(budget / cells))
    cap = budget // unit
    inf = np.inf
    dp = np.full(cap + 1, inf)                 # dp[c]: least cost using at most c units
    dp[:] = 0.0
    picks = np.zeros((len(names), cap + 1), dtype=np.int16)
    for i, n in enumerate(names):
        new = np.full(cap + 1, inf)
        arg = np.zeros(cap + 1, dtype=np.int16)
        for j, o in enumerate(items[n]):
            w = -(-o.nbytes // unit)
            if w > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[w:] = dp[:cap + 1 - w] + o.cost
            better = cand < new
            new[better] = cand[better]
            arg[better] = j
        dp = new
        picks[i] = arg
    if not np.isfinite(dp[cap]):               # the rounding made the smallest choice too big
        rounded = {n: min(items[n], key=lambda o: o.nbytes) for n in names}
        return _fill(items, rounded, budget, unit * len(names))
    c = cap
    choice = {}
    for i in range(len(names) - 1, -1, -1):
        o = items[names[i]][int(picks[i, c])]
        choice[names[i]] = o
        c -= -(-o.nbytes // unit)
    return _fill(items, choice, budget, unit * len(names))


def _fill(items: dict[str, list[Option]], choice: dict[str, Option], budget: int, gap: int) -> Allocation:
    """Spend the bytes left under the budget: the change that lowers the cost most and fits."""
    used = sum(o.nbytes for o in choice.values())
    while True:
        best, best_gain = None, 0.0
        for n, cur in choice.items():
            for o in items[n]:
                gain = cur.cost - o.cost
                if gain > best_gain and used - cur.nbytes + o.nbytes <= budget:
                    best, best_gain = (n, o), gain
        if best is None:
            break
        n, o = best
        used += o.nbytes - choice[n].nbytes
        choice[n] = o
    return _result(choice, gap)


def _result(choice: dict[str, Option], gap: int) -> Allocation:
    return Allocation({n: o.label for n, o in choice.items()}, sum(o.nbytes for o in choice.values()),
                      float(sum(o.cost for o in choice.values())), gap)


def brute_force(items: dict[str, list[Option]], budget: int) -> Allocation | None:
    """Every combination (small instances only: the tests' reference)."""
    import itertools
    names = list(items)
    best = None
    for combo in itertools.product(*(items[n] for n in names)):
        size = sum(o.nbytes for o in combo)
        if size > budget:
            continue
        cost = sum(o.cost for o in combo)
        if best is None or cost < best.cost - 1e-12:
            best = Allocation({n: o.label for n, o in zip(names, combo)}, size, cost, 0)
    return best
