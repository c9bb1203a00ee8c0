"""One type per tensor under a byte budget: the multiple-choice knapsack.

Each item (a tensor) has options (a type each) with a size in bytes and a cost (the estimated
KL divergence, quant.sensitivity); choose one option per item so that the summed size stays
within the budget and the summed cost is least.

Solved exactly by dynamic programming over a byte grid: sizes are rounded *up* to a grid unit
u = ceil(budget / cells), so any solution of the rounded problem meets the true budget, and
the solution is optimal among all choices whose sizes, rounded up, fit. The optimality gap
against the unrounded problem is bounded: the true optimum at a budget smaller by n_items x u
bytes (at most n/cells of the budget, 0.05% for 128 tensors and 2^18 cells) is feasible in the
rounded problem, so ours is no worse than it.

The bytes are then spent. Estimates are flat where a tensor is already (near) lossless, so
many choices share the least cost and the least-cost one found first may sit far under the
budget (a large tensor whose next type up does not fit leaves a gap no cost-lowering change
can fill). The grid's table holds the least cost at every exact total, so the allocation
takes the *largest* total whose cost is within TIE_REL x least + TIE_ABS of the least (a
stated tolerance: 0.1% of the estimate plus 1e-6, far below the estimate's own accuracy): lexicographically least cost,
then most bytes. Two greedy passes on the true bytes follow: the single change to a type no smaller that
lowers the cost most and fits, repeated; then changes to larger types whose added cost stays within what
is left of the tolerance, each the one that adds least cost (ties: most bytes), repeated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DEFAULT_CELLS = 1 << 18
TIE_REL = 1e-3               # cost tolerance (relative) within which more bytes are preferred
TIE_ABS = 1e-6                # ... and absolute (nats per token: far below a measurement's noise)


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


def allocate(items: dict[str, list[Option]], budget: int, cells: int = DEFAULT_CELLS,
             tie_rel: float = TIE_REL) -> Allocation:
    """The least-cost choice of one option per item with summed nbytes <= budget, then the most
    bytes among choices within `tie_rel` of that cost (module doc). Raises Infeasible when even
    the smallest options do not fit."""
    names = list(items)
    if not names:
        return Allocation({}, 0, 0.0, 0)
    lo = smallest_total(items)
    if lo > budget:
        raise Infeasible(lo, budget)
    unit = max(1, math.ceil(budget / cells))
    cap = budget // unit
    dp = np.full(cap + 1, np.inf)              # dp[c]: least cost with rounded total exactly c units
    dp[0] = 0.0
    picks = np.zeros((len(names), cap + 1), dtype=np.int16)
    for i, n in enumerate(names):
        new = np.full(cap + 1, np.inf)
        arg = np.zeros(cap + 1, dtype=np.int16)
        for j, o in enumerate(items[n]):
            w = -(-o.nbytes // unit)
            if w > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[w:] = dp[:cap + 1 - w] + o.cost
            better = cand < new
            new[better] = cand[better]
            arg[better] = j
        dp = new
        picks[i] = arg
    finite = np.isfinite(dp)
    if not finite.any():                       # the rounding made the smallest choice too big
        rounded = {n: min(items[n], key=lambda o: o.nbytes) for n in names}
        return _spend(items, _fill(items, rounded, budget), budget, tie_rel, unit * len(names))
    least = float(dp[finite].min())
    tol = tie_rel * abs(least) + TIE_ABS
    c = int(np.flatnonzero(finite & (dp <= least + tol))[-1])
    choice = {}
    for i in range(len(names) - 1, -1, -1):
        o = items[names[i]][int(picks[i, c])]
        choice[names[i]] = o
        c -= -(-o.nbytes // unit)
    choice = _fill(items, choice, budget)
    return _spend(items, choice, budget, least + tol, unit * len(names))


def _fill(items: dict[str, list[Option]], choice: dict[str, Option], budget: int) -> dict[str, Option]:
    """Spend the bytes left under the budget: the change to a type no smaller that lowers the cost
    most and fits (no smaller: the total only grows, so the grid's most-bytes choice stands)."""
    used = sum(o.nbytes for o in choice.values())
    while True:
        best, best_gain = None, 0.0
        for n, cur in choice.items():
            for o in items[n]:
                gain = cur.cost - o.cost
                if gain > best_gain and o.nbytes >= cur.nbytes and used - cur.nbytes + o.nbytes <= budget:
                    best, best_gain = (n, o), gain
        if best is None:
            return choice
        n, o = best
        used += o.nbytes - choice[n].nbytes
        choice[n] = o


def _spend(items: dict[str, list[Option]], choice: dict[str, Option], budget: int, ceiling: float,
           gap: int) -> Allocation:
    """Move tensors to larger types while the summed cost stays <= `ceiling`: each step the change
    that adds least cost (ties: most bytes) and fits."""
    used = sum(o.nbytes for o in choice.values())
    cost = sum(o.cost for o in choice.values())
    while True:
        best, key = None, None
        for n, cur in choice.items():
            for o in items[n]:
                grow = o.nbytes - cur.nbytes
                add = o.cost - cur.cost
                if grow <= 0 or used + grow > budget or cost + add > ceiling:
                    continue
                k = (add, -grow)
                if key is None or k < key:
                    best, key = (n, o), k
        if best is None:
            return _result(choice, gap)
        n, o = best
        used += o.nbytes - choice[n].nbytes
        cost += o.cost - choice[n].cost
        choice[n] = o


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
