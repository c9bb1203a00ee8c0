"""quantize --fit DEVICE: the bytes the planner leaves for weights, and the context that fits."""

from __future__ import annotations

import pytest

from quantkit.plan import memory
from quantkit.plan.fit import check_fit, fit_budget, largest_context
from quantkit.util.errors import QuantkitError


def test_budget_is_device_memory_less_kv_compute_and_overhead():
    fb = fit_budget("llama-3.1-8b", "rtx-3060", 4096)
    assert fb.available == 12 * memory.GIB
    assert fb.weights == fb.available - fb.kv - fb.compute - fb.other
    assert fb.kv == 512 * memory.MIB                      # 32 layers x 8 KV heads x 128 x 2 x 2 bytes x 4096
    longer = fit_budget("llama-3.1-8b", "rtx-3060", 8192)
    assert longer.weights < fb.weights and longer.kv == 2 * fb.kv
    assert fit_budget("llama-3.1-8b", "rtx-3060", 4096, "q8_0").weights > fb.weights


def test_trained_context_that_does_not_fit_names_one_that_does():
    need = 4 * 10 ** 9
    with pytest.raises(QuantkitError) as e:
        check_fit("llama-3.1-8b", "rtx-3060", None, "f16", need)
    ctx = largest_context("llama-3.1-8b", "rtx-3060", need)
    assert ctx is not None and f"--ctx {ctx}" in str(e.value)
    assert fit_budget("llama-3.1-8b", "rtx-3060", ctx).weights >= need
    assert fit_budget("llama-3.1-8b", "rtx-3060", ctx * 2).weights < need
    assert check_fit("llama-3.1-8b", "rtx-3060", ctx, "f16", need).n_ctx == ctx


def test_unknown_device_is_one_line():
    with pytest.raises(QuantkitError) as e:
        fit_budget("llama-3.1-8b", "rtx-9999")
    assert "rtx-9999" in str(e.value) and "\n" not in str(e.value)


def test_plan_names_the_largest_budget_and_its_command(capsys):
    from helpers.cli import run_cli
    code, _ = run_cli(["plan", "llama-3.1-8b", "--device", "rtx-3060", "--ctx", "8192"], capsys)
    assert code == 0
    from quantkit.cli import main
    main(["plan", "llama-3.1-8b", "--device", "rtx-3060", "--ctx", "8192"])
    out = capsys.readouterr().out
    line = [ln for ln in out.splitlines() if ln.startswith("Largest budget on rtx-3060 at context 8192")]
    assert line, out
    gib = fit_budget("llama-3.1-8b", "rtx-3060", 8192).weights / memory.GIB
    assert f"{gib:.2f} GiB" in line[0]
    assert "quantkit quantize llama-3.1-8b --fit rtx-3060 --ctx 8192" in line[0]
