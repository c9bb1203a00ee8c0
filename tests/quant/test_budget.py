"""Budgeted GGUFs end to end on a tiny llama: `quantize --target-size / --target-bpw` writes a
file within the budget that loads and runs in llama.cpp, its types are the allocation's, the
model card's numbers are the file's; a budget above F16 gives the F16 file with a note; bad
input is one line with nothing left behind."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from helpers.cli import assert_one_line, run_cli
from quantkit import api
from quantkit.models.gguf import GGUFSource
from quantkit.quant.budget import (Budget, budget_from_flags, parse_size, resolve_budget, split_budget_rung)
from quantkit.util.errors import QuantkitError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sizes_and_budget_flags():
    assert parse_size("2.5GB") == 2_500_000_000
    assert parse_size("300MiB") == 300 << 20
    assert parse_size("123456") == 123456
    for bad in ("lots", "-3MB", "0", "3XB"):
        with pytest.raises(QuantkitError):
            parse_size(bad)
    assert budget_from_flags(target_bpw="4.5") == Budget("bpw", 4.5)
    assert budget_from_flags(fit="rtx-3060", ctx=8192) == Budget("fit", device="rtx-3060", n_ctx=8192)
    with pytest.raises(QuantkitError, match="two budgets"):
        budget_from_flags(target_bpw="4.5", target_size="1GB")
    with pytest.raises(QuantkitError, match="--fit"):
        budget_from_flags(ctx=4096)
    server = budget_from_flags(fit="ddr4-2666-2ch", ctx=512, runtime="llama-server")
    assert server.runtime == "llama-server" and server.flags()[-2:] == ["--runtime", "llama-server"]
    assert budget_from_flags(fit="ddr4-2666-2ch").runtime == "llama-cpp-python"
    for bad in ({"runtime": "llama-server"}, {"target_size": "1GB", "runtime": "llama-server"}):
        with pytest.raises(QuantkitError, match="--runtime"):
            budget_from_flags(**bad)
    with pytest.raises(QuantkitError, match="--runtime torch"):
        budget_from_flags(fit="ddr4-2666-2ch", runtime="torch")
    assert split_budget_rung("gguf:bpw4.5+gptq") == (Budget("bpw", 4.5), "gptq")
    assert split_budget_rung("size=300MB") == (Budget("size", 300e6), "rtn")
    assert split_budget_rung("gguf:fit=rtx-3060@8192+gptq")[0] == Budget("fit", device="rtx-3060", n_ctx=8192)
    assert split_budget_rung("gguf:q4_k_m+gptq") is None
    with pytest.raises(QuantkitError, match="two budgets"):
        resolve_budget(Budget("bpw", 4.0), "gguf:bpw5", None)
    with pytest.raises(QuantkitError, match="one llama.cpp mix"):
        resolve_budget(Budget("bpw", 4.0), "gguf:q4_k_m", None)


@pytest.fixture(scope="module")
def calib(data_dir):
    return str(Path(data_dir) / "wikitext-2" / "valid.txt")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("qk-cache")
    old = os.environ.get("QUANTKIT_CACHE")
    os.environ["QUANTKIT_CACHE"] = str(d)
    yield d
    if old is None:
        os.environ.pop("QUANTKIT_CACHE")
    else:
        os.environ["QUANTKIT_CACHE"] = old


def _runs_in_llama_cpp(path: Path) -> None:
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False, n_threads=1)
    try:
        llm.eval([llm.token_bos(), 5, 6, 7])
        assert len(llm.scores[3]) == 1024
    finally:
        llm.close()


def _card_numbers(card: Path, gguf: Path) -> tuple[int, float]:
    text = card.read_text(encoding="utf-8")
    m = re.search(r"\| " + re.escape(gguf.name) + r" \| [0-9.,]+ MB \(([0-9,]+) bytes\) \| ([0-9.]+) \|", text)
    assert m, text
    return int(m.group(1).replace(",", "")), float(m.group(2))


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_budgeted_file_fits_runs_and_matches_its_card(gptq_llama_dir, calib, cache, tmp_path, capsys, method):
    f16 = api.quantize(str(gptq_llama_dir), tmp_path / "f16.gguf", format="gguf:f16", show_progress=False)
    q4 = api.quantize(str(gptq_llama_dir), tmp_path / "q4.gguf", format="gguf:q4_k_m", show_progress=False)
    budget = (f16.file_bytes + q4.file_bytes) // 2 - 12345
    out = tmp_path / "out" / "mix.gguf"
    out.parent.mkdir()
    args = [str(gptq_llama_dir), "-o", str(out), "--target-size", str(budget), "--calib", calib,
            "--nsamples", "4", "--seqlen", "64"] + (["--method", "gptq"] if method == "gptq" else [])
    code, err = run_cli(["quantize", *args], capsys)
    assert code == 0, err
    size = os.path.getsize(out)
    assert size <= budget and size > 0.9 * budget
    with GGUFSource(out) as g:
        types = {t.name: t.type for t in g.tensors()}
        n_params = sum(int(__import__("math").prod(t.shape)) for t in g.tensors())
        tensor_bytes = sum(int(g.raw(t.name)[0].nbytes) for t in g.tensors())
    assert len({t for n, t in types.items() if n.startswith("blk.") and "norm" not in n}) >= 2      # a mix
    card = out.parent / "README.md"
    card_bytes, card_bpw = _card_numbers(card, out)
    assert card_bytes == size
    assert card_bpw == pytest.approx(tensor_bytes * 8 / n_params, abs=5e-4)
    text = card.read_text(encoding="utf-8")
    assert f"--target-size {budget}" in text and method.upper() in text
    _runs_in_llama_cpp(out)
    # the same budget again: the sensitivity comes from the cache, the same mix is written
    res = api.quantize(str(gptq_llama_dir), tmp_path / "again.gguf", target_size=budget, calib=calib, nsamples=4,
                       seqlen=64, method=method, show_progress=False)
    assert res.types == types
    assert res.file_bytes == size


def test_bpw_budget_and_f16_note(gptq_llama_dir, calib, cache, tmp_path):
    res = api.quantize(str(gptq_llama_dir), tmp_path / "b.gguf", target_bpw=5.0, calib=calib, nsamples=4,
                       seqlen=64, show_progress=False)
    with GGUFSource(res.output) as g:
        n = sum(int(__import__("math").prod(t.shape)) for t in g.tensors())
        tb = sum(int(g.raw(t.name)[0].nbytes) for t in g.tensors())
    assert 4.9 < tb * 8 / n <= 5.0
    big = api.quantize(str(gptq_llama_dir), tmp_path / "big" / "f.gguf", target_size="1GB", calib=calib, nsamples=4,
                       seqlen=64, show_progress=False) if (tmp_path / "big").mkdir() is None else None
    assert {t for n, t in big.types.items() if "norm" not in n} == {"f16"}
    assert "this is the F16 file" in (tmp_path / "big" / "README.md").read_text(encoding="utf-8")


def test_bad_budgets_are_one_line_and_leave_nothing(gptq_llama_dir, calib, cache, tmp_path, capsys):
    out = tmp_path / "o" / "x.gguf"
    out.parent.mkdir()
    base = ["quantize", str(gptq_llama_dir), "-o", str(out), "--calib", calib, "--nsamples", "4", "--seqlen", "64"]
    code, err = run_cli(base + ["--target-size", "100KB"], capsys)
    assert code != 0
    assert_one_line(err, "smallest file", "--target-size")
    code, err = run_cli(base + ["--target-size", "1MB", "--target-bpw", "4"], capsys)
    assert code != 0
    assert_one_line(err, "two budgets")
    code, err = run_cli(base + ["--fit", "rtx-9999"], capsys)
    assert code != 0
    assert_one_line(err, "rtx-9999")
    code, err = run_cli(base + ["--target-bpw", "4", "--format", "gguf:q4_k_m"], capsys)
    assert code != 0
    assert_one_line(err, "gguf:q4_k_m")
    code, err = run_cli(base + ["--target-bpw", "4", "--types", "q8_0,q9_9"], capsys)
    assert code != 0
    assert_one_line(err, "q9_9")
    code, err = run_cli(base + ["--types", "q8_0"], capsys)
    assert code != 0
    assert_one_line(err, "--types")
    assert list(out.parent.iterdir()) == []


def test_fit_runtime_sizes_the_budget_for_that_front_end(gptq_llama_dir, calib, cache, tmp_path, capsys):
    """quantize --fit DEVICE --runtime llama-server: the budget is what the planner leaves beside
    llama-server (not llama-cpp-python), and the card's memory is llama-server's peak RSS."""
    from quantkit.plan.fit import cpu_weight_bytes, fit_budget
    from quantkit.plan.model import load
    from quantkit.plan.planner import PlanOptions, plan
    cpu, n_ctx = "ddr4-2666-2ch", 512
    out = tmp_path / "srv" / "fit.gguf"
    out.parent.mkdir()
    code, err = run_cli(["quantize", str(gptq_llama_dir), "-o", str(out), "--fit", cpu, "--ctx", str(n_ctx),
                         "--runtime", "llama-server", "--calib", calib, "--nsamples", "4", "--seqlen", "64"], capsys)
    assert code == 0, err
    m = load(str(out))
    fb = fit_budget(m, cpu, n_ctx, runtime="llama-server")
    assert fb.runtime == "llama-server" and fit_budget(m, cpu, n_ctx).weights != fb.weights
    assert cpu_weight_bytes(m.tensors) <= fb.weights
    row = plan(m, PlanOptions(devices=[cpu], formats=[m.stored_format], n_ctx=n_ctx, runtime="llama-server")).rows[0]
    card = (out.parent / "README.md").read_text(encoding="utf-8")
    assert "llama.cpp (llama-server)" in card and f"| {row.cpu_resident / 2**30:.2f} GiB |" in card, card
    assert "--runtime llama-server" in card
    code, err = run_cli(["quantize", str(gptq_llama_dir), "-o", str(tmp_path / "x.gguf"), "--target-size", "1GB",
                         "--runtime", "llama-server"], capsys)
    assert code != 0
    assert_one_line(err, "--runtime")
    assert not (tmp_path / "x.gguf").exists()
