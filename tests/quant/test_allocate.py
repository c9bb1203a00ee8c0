"""The multiple-choice knapsack behind budgeted GGUFs: the same optimum as brute force on small
random instances, never over the budget, and the infeasible case named."""

from __future__ import annotations

import random

import pytest

from quantkit.quant.allocate import Infeasible, Option, allocate, brute_force, smallest_total


def _instance(seed: int, n_items: int, n_opts: int, scale: int):
    rng = random.Random(seed)
    items = {}
    for i in range(n_items):
        sizes = sorted(rng.sample(range(1, scale), n_opts), reverse=True)
        # larger types cost less, with noise (as real sensitivities do), sometimes not monotone
        costs = sorted((rng.random() for _ in sizes))
        if rng.random() < 0.3:
            rng.shuffle(costs)
        items[f"t{i}"] = [Option(f"o{j}", s, c) for j, (s, c) in enumerate(zip(sizes, costs))]
    return items


@pytest.mark.parametrize("seed", range(40))
def test_equals_brute_force_on_small_instances(seed):
    rng = random.Random(1000 + seed)
    items = _instance(seed, rng.randint(1, 6), rng.randint(1, 4), 60)
    lo = smallest_total(items)
    hi = sum(max(o.nbytes for o in v) for v in items.values())
    budget = rng.randint(lo, hi + 5)
    got = allocate(items, budget, cells=1 << 12)         # unit 1 byte: exact
    want = brute_force(items, budget)
    assert got.nbytes <= budget
    assert got.cost == pytest.approx(want.cost, abs=1e-12)


@pytest.mark.parametrize("seed", range(20))
def test_never_over_budget_on_a_coarse_grid(seed):
    """A grid far coarser than the sizes: rounding up keeps every solution under the budget, and
    the greedy fill leaves it within the stated gap of brute force's optimum at a budget smaller
    by the gap."""
    rng = random.Random(seed)
    items = _instance(seed, 6, 4, 10_000)
    lo = smallest_total(items)
    budget = rng.randint(lo, lo + 20_000)
    got = allocate(items, budget, cells=64)
    assert got.nbytes <= budget
    best = brute_force(items, budget)
    assert got.cost >= best.cost - 1e-12
    inner = brute_force(items, budget - got.gap_bytes)
    if inner is not None:
        assert got.cost <= inner.cost + 1e-12


def test_below_the_smallest_total_names_it():
    items = _instance(3, 4, 3, 100)
    lo = smallest_total(items)
    with pytest.raises(Infeasible) as e:
        allocate(items, lo - 1)
    assert e.value.smallest == lo
    assert allocate(items, lo).nbytes == lo


def test_all_cheapest_when_the_budget_holds_them():
    items = {"a": [Option("big", 100, 0.0), Option("small", 10, 1.0)],
             "b": [Option("big", 100, 0.0), Option("small", 10, 5.0)]}
    assert allocate(items, 200).choice == {"a": "big", "b": "big"}
    assert allocate(items, 110).choice == {"a": "small", "b": "big"}      # the cheaper loss goes
    assert allocate(items, 109).choice == {"a": "small", "b": "small"}
