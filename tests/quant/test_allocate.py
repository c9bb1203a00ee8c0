"""The multiple-choice knapsack behind budgeted GGUFs: the same optimum as brute force on small
random instances, never over the budget, and the infeasible case named."""

from __future__ import annotations

import random

import pytest

from quantkit.quant.allocate import TIE_ABS, TIE_REL, Infeasible, Option, allocate, brute_force, smallest_total
from quantkit.quant.budget import tensor_bytes


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
    got = allocate(items, budget, cells=1 << 12, tie_rel=0.0)      # unit 1 byte: exact
    want = brute_force(items, budget)
    assert got.nbytes <= budget
    assert got.cost == pytest.approx(want.cost, abs=1e-12)


def _combos(items):
    import itertools
    for combo in itertools.product(*items.values()):
        yield sum(o.nbytes for o in combo), sum(o.cost for o in combo)


@pytest.mark.parametrize("seed", range(40))
def test_most_bytes_among_the_least_cost_choices(seed):
    """Brute force: no choice within the tolerance of the least cost holds more bytes under the
    budget than the allocation's; its cost is within that tolerance; never over."""
    rng = random.Random(2000 + seed)
    items = _instance(seed, rng.randint(1, 6), rng.randint(1, 4), 60)
    for opts in items.values():               # flat costs where a tensor is lossless, as in real tables
        if rng.random() < 0.5:
            opts[:] = [Option(o.label, o.nbytes, 0.0 if i < 2 else o.cost) for i, o in enumerate(opts)]
    lo, hi = smallest_total(items), sum(max(o.nbytes for o in v) for v in items.values())
    budget = rng.randint(lo, hi + 5)
    got = allocate(items, budget, cells=1 << 12)
    least = brute_force(items, budget).cost
    ceiling = least + TIE_REL * abs(least) + TIE_ABS
    most = max(b for b, c in _combos(items) if b <= budget and c <= ceiling)
    assert got.nbytes <= budget
    assert got.cost <= ceiling + 1e-15
    assert got.nbytes >= most


GEMMA_LAYER = {"attn_q": (1024, 640), "attn_k": (256, 640), "attn_v": (256, 640), "attn_output": (640, 1024),
               "ffn_gate": (2048, 640), "ffn_up": (2048, 640), "ffn_down": (640, 2048)}
LEGACY = ["f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"]
KQUANTS = ["q6_k", "q5_k", "q4_k", "q3_k", "q2_k"]


def _gemma_like(seed: int) -> dict[str, list[Option]]:
    """A cost table shaped like the bundled Gemma-3-270M's: a 262k x 640 embedding that takes
    only legacy types, 640-wide rows (legacy types), 1024/2048-wide rows (K-quants too); each
    tensor exact at one type (cost 0), F16 a hair above 0, the rest growing as the type shrinks
    (the embedding's types above its exact one a hair above 0 too, as its probes measure)."""
    rng = random.Random(seed)
    shapes = {"token_embd.weight": (262144, 640)}
    for i in range(18):
        shapes.update({f"blk.{i}.{k}.weight": s for k, s in GEMMA_LAYER.items()})
    items = {}
    for name, shape in shapes.items():
        types = LEGACY + (KQUANTS if shape[1] % 256 == 0 else [])
        sized = sorted(types, key=lambda t: -tensor_bytes(t, shape))
        exact = rng.choice([t for t in sized if t not in ("f16", "q8_0")])
        opts = []
        above = sized.index(exact)
        for rank, t in enumerate(sized):
            cost = 0.0 if t == exact else 1e-9 if t == "f16" else 10 ** (rank - 7) * rng.uniform(0.5, 2)
            if name == "token_embd.weight" and t != exact:
                cost = 1e-9 if rank < above else cost * 100
            opts.append(Option(t, tensor_bytes(t, shape), cost))
        items[name] = opts
    return items


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("frac", [0.3, 0.45, 0.6, 0.8])
def test_gemma_like_tables_are_filled_to_the_budget(seed, frac):
    """Between the smallest and the all-F16 total, the file lands within 0.5% under the budget
    (the F16 upgrades cost ~0, so such a choice exists within the tolerance), never over."""
    items = _gemma_like(seed)
    lo, hi = smallest_total(items), sum(max(o.nbytes for o in v) for v in items.values())
    budget = int(lo + frac * (hi - lo))
    got = allocate(items, budget)
    assert got.nbytes <= budget
    assert got.nbytes >= 0.995 * budget, (got.nbytes, budget)
    tight = allocate(items, budget, tie_rel=0.0)
    assert got.cost <= tight.cost * (1 + TIE_REL) + TIE_ABS


@pytest.mark.parametrize("seed", range(20))
def test_never_over_budget_on_a_coarse_grid(seed):
    """A grid far coarser than the sizes: rounding up keeps every solution under the budget, and
    the greedy fill leaves it within the stated gap of brute force's optimum at a budget smaller
    by the gap."""
    rng = random.Random(seed)
    items = _instance(seed, 6, 4, 10_000)
    lo = smallest_total(items)
    budget = rng.randint(lo, lo + 20_000)
    got = allocate(items, budget, cells=64, tie_rel=0.0)
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
