"""quantkit eval on Ray (a local runtime of 2 worker processes, loopback): the same numbers as the
local run for a ladder and a two-model sweep, the reference's log-probabilities encoded within the
stated KL bound, a worker killed mid-task retried, finished cells resumed from the cache, Ctrl-C
leaving nothing, bad sweep files and an unreachable address in one line; and no Ray without --ray.

Kept short: the tiny llama, 1 chunk of 64 tokens, 1 thread.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from quantkit.eval import logprob_codec as codec
from quantkit.eval import metrics

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src")
FLAGS = ["--chunks", "1", "--ctx", "64", "--threads", "1", "--no-speed"]


@pytest.fixture(scope="module")
def env(tmp_path_factory, data_dir):
    """A private quantkit cache, the tiny llama's F32 GGUF and its Q8_0 (a second model)."""
    import quantkit.api as qk
    from helpers.tiny_models import build_hf_model
    old = os.environ.get("QUANTKIT_CACHE")
    cache = tmp_path_factory.mktemp("qk-cache")
    os.environ["QUANTKIT_CACHE"] = str(cache)
    root = tmp_path_factory.mktemp("tiny-ray")
    hf = build_hf_model("llama", root)
    f32, q8 = root / "tiny-f32.gguf", root / "tiny-q8_0.gguf"
    qk.quantize(str(hf), str(f32), format="gguf:f32", show_progress=False)
    qk.quantize(str(f32), str(q8), format="gguf:q8_0", show_progress=False)
    yield {"f32": str(f32), "q8": str(q8), "root": root, "cache": str(cache),
           "text": os.path.join(data_dir, "wikitext-2", "test.txt")}
    if old is None:
        os.environ.pop("QUANTKIT_CACHE", None)
    else:
        os.environ["QUANTKIT_CACHE"] = old


def _cli(args, cache, timeout=240):
    """`quantkit ARGS` in a child process (its own Ray driver): (exit code, stdout, stderr)."""
    e = {**os.environ, "QUANTKIT_CACHE": cache, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-c", f"import sys; from quantkit.cli import main; sys.exit(main({args!r}))"],
                       capture_output=True, text=True, env=e, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def _same(local: dict, ray: dict, bound: float) -> None:
    """Row for row: perplexity, top-1 and Δp equal; KL divergence within the codec's bound."""
    assert [os.path.basename(r["path"]) for r in local["models"]] == [os.path.basename(r["path"]) for r in ray["models"]]
    for a, b in zip(local["models"], ray["models"]):
        assert a.get("rung") == b.get("rung") and a["file_bytes"] == b["file_bytes"]
        assert b["ppl"] == pytest.approx(a["ppl"], rel=1e-9)
        assert b["top1_agreement"] == a["top1_agreement"]
        assert b["delta_p_mean"] == pytest.approx(a["delta_p_mean"], rel=1e-6, abs=1e-12)
        assert abs(b["kld_mean"] - a["kld_mean"]) <= bound + 1e-9
    assert bound < 1e-3


LADDER = ["--ladder", "q8_0,q4_0", *FLAGS, "--json"]


@pytest.fixture(scope="module")
def local_ladder(env) -> dict:
    """The two-rung ladder run here, without Ray: the numbers every Ray run must give."""
    rc, out, err = _cli(["eval", env["f32"], "--text", env["text"], *LADDER], env["cache"])
    assert rc == 0, err
    return json.loads(out)


# ------------------------------------------------------------------------------- the codec
def test_codec_keeps_kld_within_its_bound_at_two_bytes_an_entry():
    rng = np.random.default_rng(0)
    v, n = 32000, 8
    ref = (rng.standard_normal((n, v)) * 3).astype(np.float32)
    ref[:, :5] += 12           # a few likely tokens, as language models have
    model = ref + rng.standard_normal((n, v)).astype(np.float32) * 0.5
    lp = np.empty_like(ref)
    metrics.log_softmax_into(ref, lp)
    targets = rng.integers(0, v, n)
    enc = codec.encode(lp, targets)
    dec = codec.decode(enc)
    assert np.abs(dec - lp).max() <= codec.half_step(enc).max()
    assert np.array_equal(dec[np.arange(n), targets], lp[np.arange(n), targets])
    lq = model.astype(np.float64) - metrics.logsumexp(model)
    kl_true = (np.exp(lp.astype(np.float64)) * (lp - lq)).sum(axis=1)
    kl_dec = (np.exp(dec.astype(np.float64)) * (dec - lq)).sum(axis=1)
    bound = codec.kld_error_bound(enc, 0, dec, lq)
    assert np.all(np.abs(kl_dec - kl_true) <= bound)
    assert bound.max() < 1e-3
    # llama-perplexity's base file: 2 bytes an entry + 8 a row; this one adds the exact entries
    per_entry_262k = 2 + (8 + 8 * codec.TOP_K + 8 + 4) / 262144
    assert codec.nbytes(enc) / (n * v) <= 2 + (8 + 8 * codec.TOP_K + 8 + 4) / v
    assert per_entry_262k < 2.002


def test_a_task_no_node_can_hold_is_refused_saying_how_much():
    from quantkit.eval.ray_eval import check_fits
    from quantkit.util.errors import QuantkitError
    nodes = [{"Alive": True, "Resources": {"memory": 8 * 2**30}}, {"Alive": True, "Resources": {"memory": 2**30}}]
    check_fits(6 * 2**30, nodes)
    with pytest.raises(QuantkitError, match=r"needs 12.00 GiB .* largest Ray node offers 8.00 GiB"):
        check_fits(12 * 2**30, nodes)


def test_plain_eval_never_imports_ray(env):
    code = (f"import sys; from quantkit.cli import main; "
            f"rc = main({['eval', env['f32'], '--text', env['text'], *FLAGS, '--json']!r}); "
            f"print('RAY' if 'ray' in sys.modules else 'NO-RAY', file=sys.stderr); sys.exit(rc)")
    e = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stderr.strip().splitlines()[-1] == "NO-RAY"


# ------------------------------------------------------------------------------- equal to local
@pytest.fixture(scope="module")
def ray_session(env):
    """One local Ray runtime of 2 CPUs for the in-process runs (quantkit runs on a runtime the
    application started, and leaves it up)."""
    import ray
    from quantkit.runtimes import ray_cluster
    ray_cluster.start_local(2, configure_logging=False)      # on loopback, as quantkit's own runtimes
    yield ray
    ray.shutdown()


def _opts(env, **kw):
    return dict(text=env["text"], n_chunks=1, n_ctx=64, n_threads=1, speed=False, show_progress=False, **kw)


def test_ladder_on_ray_equals_local_and_resumes_from_cache(env, local_ladder, ray_session, tmp_path):
    import quantkit.api as qk
    from quantkit.eval.report import write_report
    res = qk.eval_ladder(env["f32"], ["q8_0", "q4_0"], ray="local", **_opts(env))
    assert ray_session.is_initialized()          # the application's runtime is left up
    ray = json.loads(res.to_json())
    assert ray["meta"]["ray"]["cells"] == 2 and "ladder" in ray["meta"]
    assert not ray["meta"]["ray"]["reference_from_cache"]
    _same(local_ladder, ray, ray["meta"]["ray"]["kld_error_bound"])
    report = tmp_path / "ray.html"
    write_report(res, report)
    assert report.stat().st_size > 10000 and b"Q4_0 RTN" in report.read_bytes()
    # again: both cells and the reference come from the cache, with the same numbers
    again = json.loads(qk.eval_ladder(env["f32"], ["q8_0", "q4_0"], ray="local", **_opts(env)).to_json())
    assert again["meta"]["ray"]["cells_from_cache"] == 2 and again["meta"]["ray"]["reference_from_cache"]
    assert [r["kld_mean"] for r in again["models"]] == [r["kld_mean"] for r in ray["models"]]


def test_two_model_sweep_on_ray_equals_local(env, ray_session, tmp_path):
    import quantkit.api as qk
    from quantkit.eval.sweep import write_sweep_report
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"models: [{env['f32']}, {env['q8']}]\nrecipes: [q4_0, q5_0]\ntexts: [{env['text']}]\n")
    local = json.loads(qk.eval_sweep(str(sweep), **_opts(env)).to_json())
    res = qk.eval_sweep(str(sweep), ray="local", **_opts(env, cache=False))
    ray = json.loads(res.to_json())
    assert len(local["sections"]) == len(ray["sections"]) == 2
    for a, b in zip(local["sections"], ray["sections"]):
        _same(a, b, b["meta"]["ray"]["kld_error_bound"])
    assert ray["sections"][1]["models"][0]["path"].endswith("-f32.gguf")    # q8's own F32 reference
    write_sweep_report(res, tmp_path / "s.html")
    assert (tmp_path / "s.html").read_text().count('class="sweep-model"') == 2


def test_files_on_ray_equal_local(env, ray_session):
    """Plain files: Q8_0 scored against the F32 given first, each a task, as the local run."""
    import quantkit.api as qk
    local = json.loads(qk.evaluate([env["f32"], env["q8"]], **_opts(env)).to_json())
    ray = json.loads(qk.evaluate([env["f32"], env["q8"]], ray="local", **_opts(env, cache=False)).to_json())
    assert ray["meta"]["ray"]["cells"] == 1 and ray["models"][0]["is_reference"]
    _same(local, ray, ray["meta"]["ray"]["kld_error_bound"])
    assert ray["models"][1]["kld_mean"] > 0


# ------------------------------------------------------------------------------- faults
def _ray_task_pids(name: str) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if f.read().split(b"\0")[0] == f"ray::{name}".encode():
                        out.append(int(d))
            except OSError:
                pass
    return out


def test_worker_killed_mid_task_is_retried(env, local_ladder, tmp_path):
    """The first cell task seen running has its worker process killed (SIGKILL): Ray runs it
    again and the numbers are the local run's."""
    args = ["eval", env["f32"], "--text", env["text"], *LADDER]
    local = local_ladder
    killed = []

    def killer():
        deadline = time.time() + 200
        while time.time() < deadline and not killed:
            for pid in _ray_task_pids("cell_task"):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                break
            time.sleep(0.005)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    report = tmp_path / "r.html"
    rc, out, err = _cli(args + ["--ray", "--workers", "2", "--no-cache", "--report", str(report)],
                        str(tmp_path / "fresh-cache"))
    t.join(5)
    assert killed, "no cell task was seen running"
    assert rc == 0, err
    ray = json.loads(out)
    _same(local, ray, ray["meta"]["ray"]["kld_error_bound"])
    assert "--ray" in ray["meta"]["command"] and b"Q8_0 RTN" in report.read_bytes()


def test_ctrl_c_cancels_the_tasks_and_leaves_nothing(env, tmp_path):
    from helpers.cli import interrupt_mid_run
    out = tmp_path / "ladder"
    out.mkdir()
    os.environ["PYTHONPATH"] = SRC + os.pathsep + os.environ.get("PYTHONPATH", "")
    interrupt_mid_run(["eval", env["f32"], "--ladder", "q8_0,q4_0+gptq", "--ladder-dir", str(out), "--nsamples",
                       "256", "--seqlen", "64", "--text", env["text"], *FLAGS, "--ray", "--workers", "2"], out,
                      settle=0.5)
    assert _ray_task_pids("cell_task") == []


def test_bad_sweeps_and_unreachable_address_are_one_line(env, tmp_path, capsys):
    from helpers.cli import assert_one_line, run_cli
    cases = {"models: [a.gguf\n": "does not parse",
             f"models: [{env['f32']}, nowhere.gguf]\nrecipes: [q4_0]\n": "models[1] 'nowhere.gguf'",
             f"models: [{env['f32']}]\nrecipes: [q4_0, q9_9]\n": "recipes[1] 'q9_9'",
             f"models: [{env['f32']}]\nrecipes: [q4_0]\nflavours: [x]\n": "flavours"}
    for i, (body, needle) in enumerate(cases.items()):
        p = tmp_path / f"s{i}.yaml"
        p.write_text(body)
        code, err = run_cli(["eval", "--sweep", str(p), *FLAGS], capsys)
        assert code != 0
        assert_one_line(err, needle, str(p))
    t0 = time.time()
    code, err = run_cli(["eval", env["f32"], "--ladder", "q4_0", *FLAGS, "--ray", "127.0.0.1:1"], capsys)
    assert code != 0 and time.time() - t0 < 10
    assert_one_line(err, "127.0.0.1:1", "cannot reach")


def test_local_runtime_stays_on_loopback(ray_session):
    """A local runtime's node and its workers use 127.0.0.1, not the machine's network address."""
    ray = ray_session

    @ray.remote(num_cpus=1)
    def where():
        return ray.util.get_node_ip_address()

    assert [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]] == ["127.0.0.1"]
    assert ray.get(where.remote()) == "127.0.0.1"
