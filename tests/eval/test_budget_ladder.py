"""A ladder of budgets: budget rungs in the recipe grammar (gguf:bpw5+gptq, gguf:size=...) are
built, scored beside stock rungs, and the ladder's folder gets the provided-files table."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from quantkit import api
from quantkit.eval.ladder import ladder_types, parse_rung, rung_label
from quantkit.util.errors import QuantkitError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_budget_rungs_parse():
    assert ladder_types(["gguf:bpw4.5+gptq", "size=300MB", "q4_k_m"]) == ["bpw4.5+gptq", "size=300000000", "q4_k_m"]
    assert parse_rung("bpw4.5+gptq") == ("bpw4.5", "gptq")
    assert rung_label("bpw4.5-gptq") == "bpw4.5 GPTQ"
    with pytest.raises(QuantkitError, match="fit budget"):
        ladder_types(["gguf:fit=rtx-3060"])


def test_ladder_of_budgets_writes_the_provided_files_table(gptq_llama_dir, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "cache"))
    wt = Path(data_dir) / "wikitext-2"
    text = tmp_path / "test.txt"
    text.write_text((wt / "test.txt").read_text(encoding="utf-8")[:30000], encoding="utf-8")
    out = tmp_path / "ladder"
    res = api.eval_ladder(str(gptq_llama_dir), ["q4_k_m", "gguf:bpw5", "gguf:bpw6+gptq"], out_dir=str(out),
                          calib=str(wt / "valid.txt"), nsamples=4, seqlen=64, text=str(text), n_chunks=2, n_ctx=128,
                          speed=False, show_progress=False)
    rungs = {r.rung: r for r in res.rows if r.rung}
    assert {"Q4_K_M RTN", "bpw5 RTN", "bpw6 GPTQ"} <= set(rungs)
    assert rungs["bpw6 GPTQ"].kld_mean < rungs["bpw5 RTN"].kld_mean
    table = (out / "README.md").read_text(encoding="utf-8")
    assert "| file | method | bits | size | max RAM needed | use case |" in table
    for r in ("bpw5 RTN", "bpw6 GPTQ", "Q4_K_M RTN"):
        f = os.path.basename(rungs[r].path)
        line = next(ln for ln in table.splitlines() if ln.startswith(f"| {f} |"))
        assert f"{os.path.getsize(rungs[r].path) / 1e6:,.1f} MB" in line
        bits = float(line.split("|")[3])
        if r.startswith("bpw"):
            assert bits <= float(re.match(r"bpw([0-9.]+)", r).group(1)) + 1e-9
