"""The planner's resident memory of llama.cpp front ends at a full context, and `--fit` on a CPU:
a file quantize --fit writes runs in llama-cpp-python at its full context within the planner's
peak RSS (+5%), in a child process whose peak (VmHWM) is measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.cli import run_cli
from quantkit.plan import memory
from quantkit.plan.fit import cpu_weight_bytes, fit_budget
from quantkit.plan.model import load
from quantkit.plan.planner import PlanOptions, plan

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = "ddr4-2666-2ch"
BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "plan_vs_measured.json"

CHILD = r"""
import json, sys, llama_cpp
path, n_ctx, n_gen = sys.argv[1], int(sys.argv[2]), 16
llm = llama_cpp.Llama(path, n_ctx=n_ctx, n_threads=1, swa_full=False, verbose=False)
toks = [llm.token_bos()] + [5 + i % 200 for i in range(n_ctx - n_gen - 1)]
llm.create_completion(toks, max_tokens=n_gen, temperature=0.0)
hwm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps({"peak_rss": hwm}))
"""


def _peak_rss(path: Path, n_ctx: int) -> int:
    p = subprocess.run([sys.executable, "-c", CHILD, str(path), str(n_ctx)], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])["peak_rss"]


def test_fit_file_runs_within_the_planned_memory_at_full_context(gptq_llama_dir, data_dir, tmp_path, capsys,
                                                                 monkeypatch):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "cache"))
    n_ctx = 512
    out = tmp_path / "fit.gguf"
    code, err = run_cli(["quantize", str(gptq_llama_dir), "-o", str(out), "--fit", CPU, "--ctx", str(n_ctx),
                         "--calib", str(Path(data_dir) / "wikitext-2" / "valid.txt"), "--nsamples", "4",
                         "--seqlen", "64"], capsys)
    assert code == 0, err
    m = load(str(out))
    fb = fit_budget(m, CPU, n_ctx)
    assert cpu_weight_bytes(m.tensors) <= fb.weights
    row = plan(m, PlanOptions(devices=[CPU], formats=[m.stored_format], n_ctx=n_ctx,
                              runtime="llama-cpp-python")).rows[0]
    assert row.cpu_resident <= fb.available
    # the model card beside the file states that same peak RSS as the memory needed
    card = (out.parent / "README.md").read_text(encoding="utf-8")
    assert f"| {row.cpu_resident / 2**30:.2f} GiB |" in card, card
    measured = _peak_rss(out, n_ctx)
    assert measured <= row.cpu_resident * 1.05, (measured, row.cpu_resident)
    # the plan is not a loose upper bound either: a tiny model is the process and its buffers
    assert measured >= row.cpu_resident * 0.85, (measured, row.cpu_resident)


def test_front_ends_differ_as_their_defaults_do(bundled_gguf):
    m = load(bundled_gguf)
    rows = {rt: plan(m, PlanOptions(formats=["q4_k_m"], n_ctx=32768, runtime=rt)) for rt in
            ("llama-cpp-python", "llama-server", "llama.cpp")}
    py, srv = rows["llama-cpp-python"], rows["llama-server"]
    assert rows["llama.cpp"].rows[0].cpu_resident == py.rows[0].cpu_resident
    assert srv.options.flash_attn and not py.options.flash_attn and srv.options.runtime == "llama.cpp"
    inf = py.rows[0].memory
    a = memory.cpu_resident_parts(m, inf, 32768, "llama-cpp-python")
    b = memory.cpu_resident_parts(m, srv.rows[0].memory, 32768, "llama-server")
    # no flash attention: the f32 scores of 4 heads x 512 tokens x 32768 cells; their f16 copy
    assert a["compute_touched"] > 4 * 512 * 32768 * 4 and a["work"] >= 4 * 512 * 32768 * 2
    assert b["work"] == 0 and b["compute_touched"] < a["compute_touched"] / 4
    # the server's 4 slots share one cache; its 15 sliding-window layers keep 512 x 4 + 512 cells
    row = inf.kv_detail.bytes_per_cell_layer
    assert b["kv"] == row * (3 * 32768 + 15 * 2560) and a["kv"] == row * (3 * 32768 + 15 * 1024)
    # two checkpoints of the sequence's 512-cell window in 15 sliding-window layers (a prompt longer
    # than one 2048-token batch); one for a prompt of one batch
    assert b["checkpoint"] == 2 * row * 15 * 512 and a["checkpoint"] == 0
    one = memory.cpu_resident_parts(m, srv.rows[0].memory, 2048, "llama-server")["checkpoint"]
    assert one == row * 15 * 512
    assert b["output"] == 4 * a["output"] == 4 * 262144 * 4
    assert sum(a.values()) == py.rows[0].cpu_resident


def test_cpu_fit_budget_is_memory_less_the_rest_of_the_rss(bundled_gguf):
    m = load(bundled_gguf)
    for rt in ("llama-cpp-python", "llama-server"):
        fb = fit_budget(m, CPU, 4096, runtime=rt)
        inf = plan(m, PlanOptions(formats=["f16"], n_ctx=4096, runtime=rt)).rows[0].memory
        rss = memory.cpu_resident(m, inf, 4096, rt)
        assert fb.weights == fb.available - (rss - inf.weights - inf.repack)
        assert fb.runtime == rt


def test_plan_cli_runtime_choice(bundled_gguf, capsys):
    from quantkit.cli import main
    assert main(["plan", bundled_gguf, "--format", "q4_k_m", "--ctx", "4096", "--runtime", "llama-server",
                 "--device", CPU, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    srv = d["budgets"][0]
    assert srv["runtime"] == "llama-server" and srv["weights_bytes"] == fit_budget(bundled_gguf, CPU, 4096,
                                                                                   runtime="llama-server").weights


def test_full_context_benchmark_is_within_five_percent(bundled_gguf):
    """benchmarks/plan_vs_measured.json, full_context: peak RSS of llama-cpp-python and llama-server
    with the context filled, against the planner (recomputed here, so the JSON is not stale)."""
    res = json.load(open(BENCH))["full_context"]
    assert {(c["runtime"], c["n_ctx"]) for c in res["cases"] if c["file"] == "bundled q4_k_m"} >= \
        {("llama-cpp-python", 512), ("llama-cpp-python", 4096)}
    for c in res["cases"]:
        m = load(c["path"]) if os.path.exists(c["path"]) else None
        if m is not None:
            inf = memory.inference(m, m.stored_format, c["n_ctx"], tensors=m.tensors)
            assert memory.cpu_resident(m, inf, c["n_ctx"], c["runtime"]) == c["planned"], c
        assert abs(c["planned"] / c["measured_peak_rss"] - 1) <= 0.05, c
