"""quantkit eval: perplexity and KL divergence against slow, obvious implementations; torch and
llama.cpp agreeing on the same token ids; Q8_0 / Q4_0 of the bundled model; encoder classifiers
(SST-2 dev accuracy beside size and latency); the cache's size cap; bad input.

Kept short (< 1 min on 2 busy cores): one or two chunks of 128 tokens, one thread (llama.cpp's
spinning threads slow down badly on an oversubscribed machine), llama.cpp's own quantizer to
make the bundled model's F32 / Q8_0 / Q4_0 files in seconds.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from quantkit.cli import main
from quantkit.eval import metrics
from quantkit.eval.evaluate import EvalOptions, evaluate
from quantkit.eval.facts import ModelFacts, check_same_vocab
from quantkit.eval.ladder import ladder_types
from quantkit.eval.speed import run_probe
from quantkit.util.errors import QuantkitError

N_CTX = 128
FIRST = N_CTX // 2


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def eval_cache(bundled_gguf, tmp_path_factory):
    """A private quantkit cache (digests, F32 references, log-probabilities), set after the
    bundled model has been located in the normal one."""
    old = os.environ.get("QUANTKIT_CACHE")
    os.environ["QUANTKIT_CACHE"] = str(tmp_path_factory.mktemp("qk-cache"))
    yield os.environ["QUANTKIT_CACHE"]
    if old is None:
        os.environ.pop("QUANTKIT_CACHE", None)
    else:
        os.environ["QUANTKIT_CACHE"] = old


@pytest.fixture(scope="module")
def text(data_dir) -> str:
    return os.path.join(data_dir, "wikitext-2", "test.txt")


@pytest.fixture(scope="module")
def bundled_set(bundled_gguf, tmp_path_factory) -> dict[str, str]:
    """The bundled model dequantized to F32 and re-quantized to Q8_0 and Q4_0 by llama.cpp."""
    from helpers.ggml_reference import llama_quantize
    d = tmp_path_factory.mktemp("bundled")
    out = {"f32": str(d / "gemma-f32.gguf")}
    llama_quantize(bundled_gguf, out["f32"], "f32")
    for ft in ("q8_0", "q4_0"):
        out[ft] = str(d / f"gemma-{ft}.gguf")
        llama_quantize(out["f32"], out[ft], ft)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    """A tiny random llama (HF directory, SentencePiece tokenizer trained on wikitext-2), its
    F32 GGUF written by quantkit, and llama.cpp's Q8_0 / Q4_0 of it."""
    import quantkit.api as qk
    from helpers.ggml_reference import llama_quantize
    from helpers.tiny_models import build_hf_model
    root = tmp_path_factory.mktemp("tiny")
    hf = build_hf_model("llama", root)
    f32 = root / "tiny-f32.gguf"
    qk.quantize(str(hf), str(f32), format="gguf:f32", show_progress=False)
    out = {"hf": str(hf), "f32": str(f32)}
    for ft in ("q8_0", "q4_0"):
        out[ft] = str(root / f"tiny-{ft}.gguf")
        llama_quantize(str(f32), out[ft], ft, pure=True)
    return out


def _opts(text, **kw) -> EvalOptions:
    base = dict(text=text, n_chunks=1, n_ctx=N_CTX, n_threads=1, speed=False, show_progress=False)
    base.update(kw)
    return EvalOptions(**base)


def _row(res, path):
    (r,) = [r for r in res.rows if r.path == os.path.abspath(path)]
    return r


def _link(src: str, dst: Path) -> str:
    """The same bytes under another name: evaluated as a model of its own, not skipped as the reference."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy(src, dst)
    return str(dst)


# ------------------------------------------------------------------------------- metrics, pure
def _slow_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - (x.max() + np.log(np.exp(x - x.max()).sum()))


def test_metrics_against_float64_reference():
    rng = np.random.default_rng(0)
    ref = (rng.standard_normal((37, 5000)) * 3).astype(np.float32)
    model = (ref + rng.standard_normal(ref.shape).astype(np.float32) * 0.3).astype(np.float32)
    targets = rng.integers(0, 5000, 37)
    ref_lp = np.empty_like(ref)
    metrics.log_softmax_into(ref, ref_lp)
    s = metrics.Scores()
    metrics.score_against_reference(model, ref_lp, targets, s)
    kld = np.array([(np.exp(_slow_log_softmax(r)) * (_slow_log_softmax(r) - _slow_log_softmax(m))).sum()
                    for r, m in zip(ref, model)])
    nll = np.array([-_slow_log_softmax(m)[t] for m, t in zip(model, targets)])
    np.testing.assert_allclose(s.cat("kld"), kld, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(s.cat("nll"), nll, rtol=1e-7)   # exp in float32, as llama.cpp's expf
    assert (s.cat("same_top") == (ref.argmax(1) == model.argmax(1))).all()
    summ = metrics.summarize(s)
    assert summ["ppl"] == pytest.approx(np.exp(nll.mean()), rel=1e-7)
    assert summ["kld_median"] == pytest.approx(np.median(kld), rel=1e-4)

    same = metrics.Scores()
    metrics.score_against_reference(ref, ref_lp, targets, same)
    assert (same.cat("kld") == 0).all()  # identical logits: exactly zero, not just small


def test_pareto_front():
    pts = [(100, 0.0), (30, 0.002), (25, 0.3), (26, 0.4), (30, 0.01)]
    assert metrics.pareto_front(pts) == [True, True, True, False, False]


def test_different_vocabulary_is_refused():
    f = dict(runtime="llama.cpp", n_params=1, file_bytes=1, tensor_bytes=1, linear_params=1, linear_bytes=1,
             types={}, all_f32=True)
    ref = ModelFacts(path="/m/ref.gguf", vocab=["<s>", "a", "b"], **f)
    with pytest.raises(QuantkitError, match=r"token 2 is 'c', the reference's is 'b'"):
        check_same_vocab(ref, ModelFacts(path="/m/other.gguf", vocab=["<s>", "a", "c"], **f))
    with pytest.raises(QuantkitError, match=r"2 tokens vs the reference's 3"):
        check_same_vocab(ref, ModelFacts(path="/m/other.gguf", vocab=["<s>", "a"], **f))


def test_ladder_types_follow_what_quantkit_encodes():
    from quantkit.quant.gguf_export import supported_file_types
    types = ladder_types()
    assert types[:6] == ["f16", "q8_0", "q5_0", "q4_1", "q4_0", "q4_0+gptq"]    # Q4_0 RTN beside Q4_0 GPTQ
    assert {t.removesuffix("+gptq") for t in types} <= set(supported_file_types())
    assert ladder_types(["Q4_0+GPTQ", "q4_0", "gguf:q4_0+gptq"]) == ["q4_0+gptq", "q4_0"]
    assert ladder_types(["q4_0-gptq"]) == ["q4_0+gptq"]        # the old spelling, read with a note
    with pytest.raises(QuantkitError, match="GPTQ needs a quantized type"):
        ladder_types(["f16+gptq"])
    if "q4_k_m" in supported_file_types():
        assert "q4_k_m" in types
    assert {"iq4_xs", "iq3_s", "iq2_m"} <= set(types)            # IQ rungs beside the K-quants of their size
    with pytest.raises(QuantkitError, match="q9_9"):
        ladder_types(["q8_0", "q9_9"])


def test_result_rows_keep_their_json_keys():
    """A row's JSON object has the keys `quantkit eval --json` has always written: speed only when
    measured, a rung only in a ladder, the build facts only for a rung built in this run."""
    from quantkit.eval.results import ClassifierRow, EvalResult, ModelRow
    summary = dict(n_scored=3, nll=1.0, ppl=2.7, ppl_stderr=0.1, kld_mean=0.01, kld_stderr=0.001, kld_median=0.005,
                   kld_p99=0.1, kld_max=0.2, top1_agreement=0.9, delta_p_mean=-0.01, delta_p_rms=0.02)
    r = ModelRow(path="/m/a.gguf", runtime="llama.cpp", is_reference=False, eval_s=1.0, eval_load_s=0.1, **summary)
    r.set_size("a.gguf", 1000, 250, {"q8_0": 2}, 200, 500)
    head = ["path", "runtime", "is_reference", "eval_s", "eval_load_s", *summary]
    size = ["name", "file_bytes", "n_params", "types", "bits_per_weight", "bits_per_weight_linear"]
    assert list(r.to_dict()) == head + size and r.bits_per_weight == 32.0 and r.bits_per_weight_linear == 20.0
    r.speed = {"load_s": 0.1}
    r.rung = "source"
    assert list(r.to_dict()) == head + size + ["speed", "rung", "method"]
    r.rung, r.method, r.file_type, r.build_s, r.build_reused, r.calibration = "Q8_0 RTN", "rtn", "q8_0", 1.0, False, None
    assert list(r.to_dict())[-6:] == ["rung", "method", "file_type", "build_s", "build_reused", "calibration"]
    again = EvalResult([r.to_dict()], {}).rows[0]            # a saved result read back: typed again
    assert isinstance(again, ModelRow) and again == r
    c = EvalResult([{"path": "/m/c", "runtime": "torch", "accuracy": 0.9}], {"kind": "classifier"}).rows[0]
    assert isinstance(c, ClassifierRow) and c.accuracy == 0.9 and c.to_dict()["ppl"] is None


# ------------------------------------------------------------------------------- bundled model
def test_bundled_q8_q4_against_f32_and_llama_cpp_logits(bundled_set, text, eval_cache, tmp_path):
    """Q8_0 close to F32, Q4_0 much further; the reference's perplexity and Q8_0's KL divergence
    equal a slow numpy computation over llama.cpp's full logits (Llama(logits_all=True))."""
    import llama_cpp
    res = evaluate([bundled_set["q8_0"], bundled_set["q4_0"]], _opts(text, ref=bundled_set["f32"]))
    ref, q8, q4 = (_row(res, bundled_set[k]) for k in ("f32", "q8_0", "q4_0"))
    assert ref.is_reference and ref.kld_mean == 0
    assert 3 < ref.ppl < 60, ref.ppl                    # Gemma-3-270M on wikitext-2: ~8-20
    assert 0 < q8.kld_mean < 0.01, q8.kld_mean         # measured 0.0016
    assert q4.kld_mean > 10 * q8.kld_mean, (q4.kld_mean, q8.kld_mean)   # measured 0.28
    assert q8.top1_agreement > q4.top1_agreement
    assert res.rows[0].n_scored == N_CTX - 1 - FIRST
    assert res.meta["timings"]["ref_cached_chunks"] == 0

    # the slow, obvious way: the whole text tokenized as llama-perplexity does, every position's logits
    full = {}
    tokens = None
    for k in ("f32", "q8_0"):
        llm = llama_cpp.Llama(model_path=bundled_set[k], n_ctx=N_CTX, n_batch=N_CTX, logits_all=True,
                              n_threads=1, verbose=False)
        try:
            if tokens is None:
                with open(text, encoding="utf-8") as f:
                    head = f.read(100_000)   # far more than 128 tokens; cut at a line end
                head = head[:head.rindex("\n") + 1]
                tokens = llm.tokenize(head.encode(), add_bos=True, special=False)[:N_CTX]
                assert tokens[0] == llm.token_bos()
            llm.reset()
            llm.eval(tokens)
            full[k] = np.array(llm.scores[:N_CTX], dtype=np.float64)
        finally:
            llm.close()
    nll, kld = [], []
    for j in range(FIRST, N_CTX - 1):
        lp = {k: _slow_log_softmax(full[k][j]) for k in full}
        nll.append(-lp["f32"][tokens[j + 1]])
        kld.append(float((np.exp(lp["f32"]) * (lp["f32"] - lp["q8_0"])).sum()))
    assert ref.ppl == pytest.approx(float(np.exp(np.mean(nll))), rel=1e-4)
    assert q8.kld_mean == pytest.approx(float(np.mean(kld)), rel=1e-3)

    # second run, the same bytes under another name as the model: the reference now comes from
    # the on-disk cache (no reference pass) and the KL divergence of a model to itself is exactly 0
    same = _link(bundled_set["f32"], tmp_path / "same-f32.gguf")
    again = evaluate([same], _opts(text, ref=bundled_set["f32"]))
    assert again.meta["timings"]["ref_cached_chunks"] == 1
    r = _row(again, same)
    assert not r.is_reference
    assert r.kld_mean == 0 and r.kld_p99 == 0 and r.top1_agreement == 1
    assert r.ppl == pytest.approx(ref.ppl, rel=1e-6)
    assert _row(again, bundled_set["f32"]).ppl == ref.ppl


def test_bundled_f32_in_torch_matches_llama_cpp(bundled_set, text, eval_cache):
    """The F32 reference through the torch path (the GGUF's weights in transformers'
    Gemma3ForCausalLM) and through llama.cpp, same token ids: perplexity within 0.1 %
    (measured 7.90020 llama.cpp, 7.90071 torch on this chunk)."""
    spec = "torch:" + bundled_set["f32"]
    res = evaluate([spec], _opts(text, ref=bundled_set["f32"]))
    ll, tt = _row(res, bundled_set["f32"]), next(r for r in res.rows if r.path == "torch:" + os.path.abspath(bundled_set["f32"]))
    assert tt.runtime == "torch" and tt.name.startswith("torch:")
    assert tt.ppl == pytest.approx(ll.ppl, rel=1e-3), (tt.ppl, ll.ppl)
    assert tt.kld_mean < 1e-3 and tt.top1_agreement > 0.95


# ------------------------------------------------------------------------------- tiny model
def test_runtimes_share_one_protocol(tiny):
    """llama.cpp (a GGUF) and torch (the same model's HF directory) behind one Runtime: the same
    token ids give the same scored logits."""
    from quantkit.runtimes import Runtime, open_runtime
    ll, tt = open_runtime(tiny["f32"], 64, 1), open_runtime(tiny["hf"], 64, 1)
    try:
        assert isinstance(ll, Runtime) and isinstance(tt, Runtime) and (ll.kind, tt.kind) == ("llama.cpp", "torch")
        assert ll.n_vocab == tt.n_vocab and ll.load_s > 0 and tt.load_s > 0
        ids = ([ll.bos_id()] if ll.add_bos() else []) + ll.tokenize("The tower is 324 metres tall, about the same "
                                                                    "height as an 81-storey building.")
        assert len(ids) > 12
        a, b = ll.scored_logits(ids, 6).copy(), tt.scored_logits(ids, 6)
        assert a.shape == b.shape == (len(ids) - 7, ll.n_vocab)
        # llama.cpp keeps K and V in an F16 cache: measured 8e-4 of the logit scale on this model
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-3 * float(np.abs(b).max()))
        assert ll.timed_generate(ids, 2) > 0 and tt.timed_prompt(ids) > 0
    finally:
        ll.close()
        tt.close()


def test_torch_and_llama_cpp_perplexities_agree(tiny, text, eval_cache):
    """The same HF model in transformers (torch, F32) and as quantkit's F32 GGUF in llama.cpp,
    on the same token ids (llama.cpp's tokenizer): perplexities within 0.1 %."""
    res = evaluate([tiny["hf"]], _opts(text, ref=tiny["f32"], n_chunks=2))
    ll, tt = _row(res, tiny["f32"]), _row(res, tiny["hf"])
    assert (ll.runtime, tt.runtime) == ("llama.cpp", "torch")
    assert tt.ppl == pytest.approx(ll.ppl, rel=1e-3), (tt.ppl, ll.ppl)
    assert tt.kld_mean < 1e-4 and tt.top1_agreement > 0.99
    assert np.isfinite(ll.ppl) and ll.ppl > 1

    # the other way round: the HF directory as the default reference, tokenized by transformers
    res2 = evaluate([tiny["hf"], tiny["f32"]], _opts(text, n_chunks=2))
    assert res2.rows[0].path == os.path.abspath(tiny["hf"]) and res2.rows[0].is_reference
    assert res2.meta["reference_runtime"].startswith("torch")
    assert _row(res2, tiny["f32"]).ppl == pytest.approx(res2.rows[0].ppl, rel=1e-3)


def test_default_reference_is_f32_dequantization(tiny, text, eval_cache):
    """The reference of a quantized first model is its own weights in F32: what is left of its
    KL divergence is llama.cpp's arithmetic (activations rounded to Q8 in quantized dot products)."""
    res = evaluate([tiny["q8_0"], tiny["q4_0"]], _opts(text))
    ref = res.rows[0]
    assert ref.is_reference and ref.path.endswith("-f32.gguf")
    assert res.meta["reference_how"].startswith("F32 dequantization of tiny-q8_0.gguf")
    assert ref.types == {"f32": sum(ref.types.values())}
    q4, q8 = _row(res, tiny["q4_0"]), _row(res, tiny["q8_0"])
    assert 0 <= q8.kld_mean < 1e-3 and q8.kld_mean < q4.kld_mean / 10, (q8.kld_mean, q4.kld_mean)
    assert q4.bits_per_weight_linear == pytest.approx(4.5) and q8.bits_per_weight_linear == pytest.approx(8.5)


def test_speed_probe_matches_llama_cpp_counters(tiny, text, eval_cache):
    res = evaluate([tiny["q8_0"]], _opts(text, ref=tiny["f32"], speed=True, speed_runs=2, n_prompt=64, n_gen=8))
    for r in res.rows:
        sp = r.speed
        assert sp["threads"] == 1 and sp["n_prompt"] == 64 and sp["n_gen"] == 8 and len(sp["pp_tok_s_runs"]) == 2
        assert sp["pp_tok_s"] > 0 and sp["tg_tok_s"] > 0 and sp["load_s"] > 0
        assert sp["peak_rss_bytes"] > sp["rss_before_load_bytes"] > 0
        # our wall clock around llama_decode and llama.cpp's own counters time the same calls; ours
        # adds only the Python around them (batch filling, argmax): well under 0.1 ms a step,
        # which shows only because the tiny model's steps take ~0.1-0.3 ms
        pp_extra = sp["n_prompt"] / sp["pp_tok_s"] - sp["n_prompt"] / sp["llama_pp_tok_s"]
        tg_extra = 1 / sp["tg_tok_s"] - 1 / sp["llama_tg_tok_s"]
        assert -1e-4 < pp_extra < 1e-3, (sp["pp_tok_s"], sp["llama_pp_tok_s"])
        assert -1e-5 < tg_extra < 1e-4, (sp["tg_tok_s"], sp["llama_tg_tok_s"])


def test_cli_json_and_ladder(tiny, text, eval_cache, tmp_path, capsys):
    import json
    from helpers.chromium import CHROMIUM, rendered_points
    report = tmp_path / "report.html"
    rc = main(["eval", tiny["f32"], "--ladder", "q8_0,q4_0", "--ladder-dir", str(tmp_path), "--text", text,
               "--chunks", "1", "--ctx", str(N_CTX), "--threads", "1", "--no-speed", "--json", "--report", str(report)])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in out["models"]]
    assert len(names) == 3 and out["models"][0]["is_reference"]          # the F32 model is its own reference
    assert any(n.endswith("-q8_0.gguf") for n in names) and any(n.endswith("-q4_0.gguf") for n in names)
    assert "--ladder q8_0,q4_0" in out["meta"]["command"]
    assert "second half scored" in out["meta"]["protocol"]
    assert report.is_file()
    if CHROMIUM:
        assert [p["data-model"] for p in rendered_points(report, tmp_path)] == names




@pytest.mark.usefixtures("one_thread")
def test_ladder_gptq_rung_beats_rtn_and_is_cached(gptq_llama_dir, data_dir, text, eval_cache, tmp_path, capsys):
    """`eval --ladder q4_0,q4_0+gptq`: both rungs built into the cache, labelled by method, the
    GPTQ one closer to the reference on text its calibration never saw; a rerun re-uses both
    files; another calibration makes another GPTQ file."""
    import json
    import quantkit.api as qk
    f32 = tmp_path / "tiny-f32.gguf"
    qk.quantize(str(gptq_llama_dir), str(f32), format="gguf:f32", show_progress=False)
    calib = os.path.join(data_dir, "wikitext-2", "valid.txt")
    argv = ["eval", str(f32), "--ladder", "q4_0,q4_0+gptq", "--calib", calib, "--nsamples", "8",
            "--seqlen", "128", "--text", text, "--chunks", "2", "--ctx", "256", "--threads", "1", "--no-speed"]

    def run(*extra):
        assert main([*argv, *extra, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        return out, {r.get("rung"): r for r in out["models"]}

    out, rows = run()
    assert [r["rung"] for r in out["models"]] == ["reference", "Q4_0 RTN", "Q4_0 GPTQ"]
    assert rows["Q4_0 RTN"]["method"] == "rtn" and rows["Q4_0 GPTQ"]["method"] == "gptq"
    assert rows["Q4_0 GPTQ"]["file_bytes"] == rows["Q4_0 RTN"]["file_bytes"]      # the same llama.cpp type
    k_rtn, k_gptq = rows["Q4_0 RTN"]["kld_mean"], rows["Q4_0 GPTQ"]["kld_mean"]
    assert k_gptq * 1.3 < k_rtn, (k_gptq, k_rtn)    # measured about 2x (tests/quant/test_gguf_gptq.py)
    assert f"8 x 128 tokens of {calib}" in out["meta"]["ladder"]["gptq"]
    assert out["meta"]["ladder"]["reused"] == []
    assert "--nsamples 8" in out["meta"]["command"]

    again, rows2 = run()                                          # cached: nothing rebuilt, the same scores
    assert again["meta"]["ladder"]["reused"] == ["Q4_0 RTN", "Q4_0 GPTQ"]
    assert rows2["Q4_0 GPTQ"]["path"] == rows["Q4_0 GPTQ"]["path"]
    assert rows2["Q4_0 GPTQ"]["kld_mean"] == pytest.approx(k_gptq, rel=1e-6)

    other, rows3 = run("--nsamples", "4")                   # another calibration: another GPTQ file
    assert other["meta"]["ladder"]["reused"] == ["Q4_0 RTN"]
    assert rows3["Q4_0 GPTQ"]["path"] != rows["Q4_0 GPTQ"]["path"]

    assert main(argv) == 0                                       # the terminal table shows the method
    table = capsys.readouterr().out
    assert "Q4_0 GPTQ" in table and "Q4_0 RTN" in table and "GPTQ = GPTQ onto the same llama.cpp types" in table


# ------------------------------------------------------------------------------- bad input
def _fails(argv, capsys, *needles):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


def test_bad_input(tiny, text, eval_cache, tmp_path, capsys, bundled_gguf):
    base = ["--ctx", str(N_CTX), "--chunks", "1", "--threads", "1", "--no-speed"]
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.\n", encoding="utf-8")
    _fails(["eval", tiny["f32"], "--text", str(short), *base], capsys, "text too short", "tokens", "need 128")
    _fails(["eval", tiny["f32"], "--text", str(short), "--ctx", "64", "--chunks", "3", "--no-speed"], capsys,
           "3 chunk(s) of 64 need 192")

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(Path(tiny["q8_0"]).read_bytes()[:5000])
    _fails(["eval", str(broken), "--ref", tiny["f32"], "--text", text, *base], capsys, "broken.gguf")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\0" * 100)
    _fails(["eval", str(junk), "--ref", tiny["f32"], "--text", text, *base], capsys, "junk.bin", "neither GGUF")
    _fails(["eval", str(tmp_path / "missing.gguf"), "--text", text, *base], capsys, "missing.gguf", "no such")

    _fails(["eval", tiny["f32"], "--ref", bundled_gguf, "--text", text, *base], capsys,
           "vocabulary differs", "1024 tokens vs the reference's 262144")

    _fails(["eval", tiny["f32"], "--text", text, "--report", str(tmp_path / "no" / "dir" / "r.html"), *base], capsys,
           "does not exist")
    _fails(["eval", tiny["f32"], "--text", text, "--report", str(tmp_path), *base], capsys, "existing directory")
    _fails(["eval", tiny["f32"], "--text", str(tmp_path / "nope.txt"), *base], capsys, "nope.txt", "cannot read")

    # GPTQ rungs: calibration on the scored text, a missing calibration file, flags without --ladder
    _fails(["eval", tiny["f32"], "--ladder", "q4_0+gptq", "--calib", text, "--text", text, *base], capsys,
           "is the scored text")
    _fails(["eval", tiny["f32"], "--ladder", "q4_0+gptq", "--calib", str(tmp_path / "nocal.txt"), "--text", text,
            *base], capsys, "nocal.txt", "no such calibration file")
    _fails(["eval", tiny["f32"], "--ladder", "q4_0,f16+gptq", "--text", text, *base], capsys, "GPTQ needs a quantized")
    _fails(["eval", tiny["f32"], "--nsamples", "4", "--text", text, *base], capsys, "with --ladder")


# ------------------------------------------------------------------------------- classifiers
@pytest.fixture(scope="module")
def classifiers(tmp_path_factory) -> dict[str, str]:
    """A small random BERT classifier (MiniLM's tokenizer, labels 0/1 as SST-2's), its dynamic
    int8 made by quantkit, a head-less encoder and a classifier with other label names."""
    from helpers.encoders import save_tiny_bert

    import quantkit.api as qk
    root = tmp_path_factory.mktemp("cls")
    out = {"fp32": str(save_tiny_bert(root / "cls-fp32", ["0", "1"]))}
    out["int8"] = str(root / "cls-int8")
    qk.quantize_dynamic(out["fp32"], out["int8"])
    out["nohead"] = str(save_tiny_bert(root / "nohead"))
    out["otherlabels"] = str(save_tiny_bert(root / "otherlabels", ["neg", "pos"]))
    return out


@pytest.fixture(scope="module")
def sst2_dev(data_dir) -> str:
    return os.path.join(data_dir, "sst2", "dev.tsv")


@pytest.mark.usefixtures("one_thread")
def test_classifier_accuracy_size_latency(classifiers, sst2_dev, eval_cache):
    """SST-2 dev accuracy of an fp32 classifier and its int8, side by side with size and latency;
    each accuracy equals distill's own accuracy() of the same model (an independent path)."""
    import torch

    from quantkit.api import load_encoder
    from quantkit.distill.scoring import accuracy
    from quantkit.util.textdata import read_labelled
    threads = torch.get_num_threads()
    res = evaluate([classifiers["fp32"], classifiers["int8"]],
                   EvalOptions(task_data=sst2_dev, n_threads=1, speed=False, show_progress=False))
    assert torch.get_num_threads() == threads           # the caller's thread setting is left alone
    assert res.meta["kind"] == "classifier" and res.meta["task"] == "SST-2 dev" and res.meta["n_examples"] == 872
    ref, q = _row(res, classifiers["fp32"]), _row(res, classifiers["int8"])
    texts, labels = read_labelled(sst2_dev, ["0", "1"])
    for r, key in ((ref, "fp32"), (q, "int8")):
        assert r.n_examples == 872
        # the same batches (32): padding length changes the GEMM shapes, which can flip a borderline int8 prediction
        assert r.accuracy == accuracy(load_encoder(classifiers[key]), texts, labels, batch_size=32)
        assert r.ppl is None and r.runtime == "torch"
    assert ref.is_reference and ref.kld_mean == 0 and ref.top1_agreement == 1
    assert q.quantization == "dynamic-int8" and not q.is_reference
    assert 0 < q.kld_mean < 0.01 and q.top1_agreement > 0.9
    # int8 linear weights: 8 bits + one fp32 scale per row of 32 or 64 inputs (the biases are not weights)
    assert ref.bits_per_weight_linear == pytest.approx(32)
    assert 8 < q.bits_per_weight_linear < 9 and q.file_bytes < ref.file_bytes
    assert ref.n_params == q.n_params

    # speed and memory: the int8 model alone in a fresh process (as `evaluate` runs it per model)
    sp = run_probe(classifiers["int8"], texts[:32], 0, 1, 1, kind="classifier")
    assert sp["runtime"] == "torch" and sp["threads"] == 1 and sp["batch"] == 32 and sp["n_latency"] == 8
    assert sp["latency_ms"] > 0 and sp["sent_s"] > 0 and 0 < sp["load_s"] < 5
    assert sp["peak_rss_bytes"] > sp["rss_before_load_bytes"] > 0


def test_classifier_cli_table_json_report(classifiers, sst2_dev, eval_cache, tmp_path, capsys):
    import json
    from helpers.chromium import CHROMIUM, rendered_points
    base = ["eval", classifiers["fp32"], classifiers["int8"], "--task-data", sst2_dev, "--task-limit", "100",
            "--threads", "1", "--no-speed"]
    assert main(base) == 0
    table = capsys.readouterr().out
    assert "SST-2 dev acc %" in table and "cls-int8" in table and "100 labelled examples" in table
    report = tmp_path / "cls.html"
    assert main([*base, "--json", "--report", str(report)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in out["models"]] == ["cls-fp32", "cls-int8"]
    assert all(0 <= r["accuracy"] <= 1 and r["n_examples"] == 100 for r in out["models"])
    assert "--task-limit 100" in out["meta"]["command"]
    page = report.read_text(encoding="utf-8")
    assert "SST-2 dev accuracy" in page and "dynamic-int8" in page
    if CHROMIUM:
        assert [p["data-model"] for p in rendered_points(report, tmp_path)] == ["cls-fp32", "cls-int8"]


def test_classifier_bad_input(classifiers, tiny, sst2_dev, text, eval_cache, tmp_path, capsys):
    base = ["--task-data", sst2_dev, "--threads", "1", "--no-speed"]
    _fails(["eval", classifiers["fp32"], tiny["f32"], *base], capsys, "classifiers and language models", "tiny-f32.gguf")
    _fails(["eval", classifiers["nohead"], *base], capsys, "not a classifier", "nohead")
    _fails(["eval", classifiers["fp32"], classifiers["otherlabels"], *base], capsys,
           "labels ['neg', 'pos'] differ from the reference's ['0', '1']", "otherlabels")
    bad = tmp_path / "bad.tsv"
    bad.write_text("label\tsentence\n1\tfine\n2\tunknown label\n", encoding="utf-8")
    _fails(["eval", classifiers["fp32"], "--task-data", str(bad), "--no-speed"], capsys, "line 3", "unknown label '2'")
    _fails(["eval", classifiers["fp32"], "--task-data", str(tmp_path / "none.tsv"), "--no-speed"], capsys, "none.tsv")
    _fails(["eval", classifiers["fp32"], "--ladder", "--no-speed"], capsys, "not encoders")


# ------------------------------------------------------------------------------- cache cap
def test_cache_prunes_least_recently_used_first(tmp_path, monkeypatch):
    from quantkit.eval import cache as ec
    root = tmp_path / "eval"
    (root / "logprobs").mkdir(parents=True)
    (root / "refs" / "abc").mkdir(parents=True)
    files = {}
    for i, (name, size) in enumerate([("logprobs/a.npy", 400), ("refs/abc/m-f32.gguf", 1000), ("logprobs/b.npy", 400),
                                      ("logprobs/c.npy", 400)]):
        p = root / name
        p.write_bytes(b"\0" * size)
        os.utime(p, (1000 + i, 1000 + i))
        files[name] = p
    (root / "logprobs" / ".d.npy.1234.partial").write_bytes(b"\0" * 5000)   # another run writing: untouched
    (root / "digests.json").write_text("{}")                                   # not a prunable file
    # the reference GGUF used again now, through its marker (its own mtime keys the SHA-256 memo)
    ec.touch(str(files["refs/abc/m-f32.gguf"]), keep_mtime=True)
    assert os.stat(files["refs/abc/m-f32.gguf"]).st_mtime == 1001

    got = ec.prune(str(root), 1500)
    assert got == {"removed_bytes": 800, "removed_files": 2, "kept_bytes": 1400, "limit_bytes": 1500}
    assert [n for n, p in files.items() if p.exists()] == ["refs/abc/m-f32.gguf", "logprobs/c.npy"]
    assert (root / "logprobs" / ".d.npy.1234.partial").exists() and (root / "digests.json").exists()

    assert ec.prune(str(root), 0)["removed_files"] == 2
    assert not (root / "refs" / "abc").exists()        # the emptied reference folder goes too

    assert ec.parse_size("4G") == 4 << 30 and ec.parse_size("1.5MiB") == 3 << 19 and ec.parse_size("123") == 123
    monkeypatch.setenv(ec.ENV, "2g")
    assert ec.max_bytes() == 2 << 30 and ec.max_bytes("10M") == 10 << 20
    monkeypatch.delenv(ec.ENV)
    assert ec.max_bytes() == ec.DEFAULT_MAX_BYTES
    with pytest.raises(QuantkitError, match="--cache-max '4X'"):
        ec.max_bytes("4X")


def test_cache_cap_applies_after_a_run(tiny, text, eval_cache, capsys):
    """A run under a cap smaller than its own reference chunks: afterwards the cache holds at most
    the cap (what is left is the newest); an unreadable cap fails before any work."""
    from quantkit.eval.cache import cached_files
    root = os.path.join(eval_cache, "eval")
    # each reference chunk: 63 scored rows x 1024 tokens x 4 B = 258 KB; the cap holds one of the two
    res = evaluate([tiny["q8_0"]], _opts(text, ref=tiny["f32"], n_chunks=2, cache_max="300K"))
    pruned = res.meta["cache_pruned"]
    assert pruned["limit_bytes"] == 300 << 10 and pruned["removed_files"] >= 1
    left = cached_files(root)
    assert len(left) == 1 and 0 < sum(s for _, s, _ in left) <= 300 << 10
    again = evaluate([tiny["q8_0"]], _opts(text, ref=tiny["f32"], n_chunks=2, cache_max="300K"))
    assert again.meta["timings"]["ref_cached_chunks"] == 1      # the kept chunk is re-used, the other re-made
    assert _row(again, tiny["q8_0"]).kld_mean == _row(res, tiny["q8_0"]).kld_mean
    _fails(["eval", tiny["q8_0"], "--text", text, "--cache-max", "lots", "--no-speed"], capsys, "--cache-max 'lots'")
