"""The HTML report, rendered as a person would see it: in headless Chromium (Debian's chromium
package), after its JavaScript has drawn the chart. The page must work offline: Chromium runs
with background networking off, and the page references no external resource."""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path

import pytest

from helpers.chromium import needs_chromium, rendered_points, run_chromium
from quantkit.eval.results import EvalResult
from quantkit.eval.metrics import pareto_front
from quantkit.eval.report import write_report


def _row(name, size_mb, kld, ppl, ref=False):
    return {"name": name, "path": f"/models/{name}", "runtime": "llama.cpp", "is_reference": ref,
            "file_bytes": int(size_mb * 1e6), "n_params": 268_000_000, "bits_per_weight": 8 * size_mb * 1e6 / 268e6,
            "bits_per_weight_linear": None, "ppl": ppl, "ppl_stderr": 0.1, "kld_mean": kld, "kld_median": kld / 2,
            "kld_p99": kld * 5, "top1_agreement": 1 - kld, "delta_p_mean": -kld / 10, "n_scored": 2040,
            "speed": {"load_s": 0.5, "pp_tok_s": 100.0, "tg_tok_s": 20.0, "llama_pp_tok_s": 101.0,
                      "llama_tg_tok_s": 20.5, "peak_rss_bytes": int(size_mb * 1e6 + 5e7), "rss_before_load_bytes": int(4e7)}}


def _result() -> EvalResult:
    rows = [_row("gemma-f32.gguf", 1079, 0.0, 15.28, ref=True), _row("gemma-q8_0.gguf", 292, 0.0021, 15.3),
            _row("gemma-q5_0.gguf", 250, 0.03, 15.6), _row("gemma-q4_1.gguf", 260, 0.05, 15.9),
            _row("gemma-<q4_0>.gguf", 241, 0.336, 19.0)]
    meta = {"command": "quantkit eval gemma-q8_0.gguf --chunks 8 --ctx 512 --report r.html",
            "protocol": "llama.cpp perplexity protocol: 8 chunk(s) ...", "reference": "/models/gemma-f32.gguf",
            "reference_how": "given (--ref)", "reference_runtime": "llama.cpp", "tokenizer": "the reference's",
            "text": "/data/test.txt", "speed": "fresh subprocess per model", "metrics": {"kld": "KL(ref || model)"},
            "machine": {"cpu": "Test CPU 9000", "cores": 2, "threads": 2}}
    return EvalResult(rows, meta)


def _realistic_result() -> EvalResult:
    """An F32 reference of 1.07 GB and nine quantized files of 150 to 550 MB with KL divergence
    from 0.002 to 0.5, named as real files are (long, sharing a prefix, two pairs close together)."""
    q = [("q8_0", 571, 0.002, 15.30), ("q6_k", 450, 0.0064, 15.34), ("q5_1", 402, 0.017, 15.45),
         ("q5_0", 380, 0.02, 15.52), ("q5_0-gptq", 381, 0.019, 15.50), ("q4_1", 356, 0.08, 15.90),
         ("q4_0", 330, 0.2, 16.7), ("q4_0-gptq", 331, 0.072, 16.2), ("q2_k", 172, 0.52, 24.0)]
    rows = [_row("gemma-3-270m-f32.gguf", 1073, 0.0, 15.28, ref=True)]
    rows += [_row(f"gemma-3-270m-{t}.gguf", mb, kld, ppl) for t, mb, kld, ppl in q]
    res = _result()
    return EvalResult(rows, {**res.meta, "reference": "/models/gemma-3-270m-f32.gguf"})


def _classifier_result() -> EvalResult:
    """A classifier report (the wider table: accuracy, agreement, latency) with long Hub-style names."""
    rows = []
    for name, quant, mb, kld, ref in [("distilbert-base-uncased-finetuned-sst-2-english-fp32", None, 268, 0.0, True),
                                      ("distilbert-base-uncased-finetuned-sst-2-english-int8", "dynamic-int8", 132, 0.004, False)]:
        r = _row(name, mb, kld, 1.0, ref)
        r.update(quantization=quant, accuracy=0.91, accuracy_stderr=0.01,
                 speed={"load_s": 0.4, "latency_ms": 5.2, "sent_s": 300.0, "peak_rss_bytes": int(5e8),
                        "rss_before_load_bytes": int(1e8)})
        rows.append(r)
    return EvalResult(rows, {**_result().meta, "kind": "classifier", "task": "SST-2 dev"})


@needs_chromium
def test_report_renders_one_point_per_model_with_pareto_front(tmp_path):
    res = _result()
    out = tmp_path / "report.html"
    write_report(res, out)
    page = out.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "the page must be self-contained"
    assert "Test CPU 9000" in page and "quantkit eval gemma-q8_0.gguf --chunks 8" in page
    assert "&lt;q4_0&gt;" in page  # names are escaped in the table

    points = rendered_points(out, tmp_path)
    assert [p["data-model"] for p in points] == [r.name for r in res.rows]
    front = pareto_front([(r.file_bytes, r.kld_mean) for r in res.rows])
    assert ["pareto" in p["class"].split() for p in points] == front == [True, True, True, False, True]
    # smaller files to the left, larger KL divergence higher up (smaller y in SVG)
    by = {p["data-model"]: (float(p["cx"]), float(p["cy"])) for p in points}
    assert by["gemma-<q4_0>.gguf"][0] < by["gemma-q8_0.gguf"][0] < by["gemma-f32.gguf"][0]
    assert by["gemma-<q4_0>.gguf"][1] < by["gemma-q5_0.gguf"][1] < by["gemma-q8_0.gguf"][1]


# Injected into a copy of the page by the layout test: after load, the boxes a person would see
# (getBoundingClientRect, in CSS pixels of the window) go into <pre id="layout">, which --dump-dom returns.
_MEASURE = """<script>
window.addEventListener('load', () => {
  const box = e => { if (!e) return null; const r = e.getBoundingClientRect(); return {x: r.left, y: r.top, r: r.right, b: r.bottom}; };
  const all = s => Array.from(document.querySelectorAll(s));
  const root = document.documentElement;
  const out = {client_width: root.clientWidth, scroll_width: root.scrollWidth,
               svg: box(document.querySelector('#chart svg')), plot: box(document.querySelector('#chart rect.plot-area')),
               table: box(document.getElementById('results-table')),
               table_box: box(document.getElementById('results-table').parentElement),
               labels: all('#chart text.label').map(e => Object.assign({model: e.dataset.model, text: e.textContent}, box(e))),
               points: all('#chart circle.point').map(e => Object.assign({model: e.dataset.model}, box(e))),
               ticks: all('#chart text.tick').map(e => e.textContent)};
  const pre = document.createElement('pre');
  pre.id = 'layout';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def _layout(result: EvalResult, tmp_path: Path, width: int = 1280) -> dict:
    """Render RESULT's report at WIDTH x 900 in headless Chromium and return the measured boxes."""
    out = tmp_path / "report.html"
    write_report(result, out)
    probe = tmp_path / "probe.html"
    probe.write_text(out.read_text(encoding="utf-8").replace("</body>", _MEASURE + "</body>"), encoding="utf-8")
    proc = run_chromium(tmp_path, f"--window-size={width},900", "--virtual-time-budget=5000", "--dump-dom", probe.resolve().as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = re.search(r'<pre id="layout">(.*?)</pre>', proc.stdout, re.S)
    assert m, "the measuring script did not run"
    return json.loads(html.unescape(m.group(1)))


def _intersect(a: dict, b: dict, tol: float = 0.5) -> bool:
    return a["x"] + tol < b["r"] and b["x"] + tol < a["r"] and a["y"] + tol < b["b"] and b["y"] + tol < a["b"]


@needs_chromium
@pytest.mark.parametrize("make", [_realistic_result, _result, _classifier_result], ids=["realistic", "small", "classifier"])
def test_report_layout_fits_1280_and_reads(tmp_path, make):
    res = make()
    lay = _layout(res, tmp_path)
    # nothing runs off a 1280-pixel window: not the page, not the table
    assert lay["scroll_width"] <= 1280 and lay["client_width"] <= 1280, lay
    assert lay["table"]["r"] <= lay["client_width"], (lay["table"], lay["client_width"])
    assert lay["table"]["r"] <= lay["table_box"]["r"] + 0.5, (lay["table"], lay["table_box"])  # no scrolling inside it
    svg, plot = lay["svg"], lay["plot"]
    assert svg and plot, "no chart, or no rect.plot-area marking the axes' extent"
    assert svg["r"] <= lay["client_width"]

    # every model has one point and one label; labels inside the chart, apart from each other and from the points
    names = [r.name for r in res.rows]
    assert [p["model"] for p in lay["points"]] == names
    labels = lay["labels"]
    assert sorted(lab["model"] for lab in labels) == sorted(names)
    for lab in labels:
        assert svg["x"] <= lab["x"] and lab["r"] <= svg["r"] and svg["y"] <= lab["y"] and lab["b"] <= svg["b"], lab
        assert lab["r"] <= 1280
        for p in lay["points"]:
            assert not _intersect(lab, p, tol=1.5), (lab, p)
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            assert not _intersect(a, b), (a, b)

    # KL divergence on a log axis: the point's height is linear in log10(KL), so a decade is a fixed distance
    centre = {p["model"]: ((p["x"] + p["r"]) / 2, (p["y"] + p["b"]) / 2) for p in lay["points"]}
    quant = [r for r in res.rows if not r.is_reference]
    xs = [centre[r.name][0] for r in quant]
    assert all(plot["x"] <= x <= plot["r"] for x in xs), (xs, plot)
    if len(quant) > 1:
        lo, hi = min(quant, key=lambda r: r.kld_mean), max(quant, key=lambda r: r.kld_mean)
        per_decade = (centre[lo.name][1] - centre[hi.name][1]) / math.log10(hi.kld_mean / lo.kld_mean)
        assert per_decade > 40
        for r in quant:
            expect = centre[lo.name][1] - per_decade * math.log10(r.kld_mean / lo.kld_mean)
            assert abs(centre[r.name][1] - expect) < 1.0, (r.name, centre[r.name], expect)
        # the size axis spans the quantized files
        assert max(xs) - min(xs) >= 0.6 * (plot["r"] - plot["x"]), (xs, plot)

    # the reference is marked apart, to the right of the size axis, its size written under it
    ref = next(r for r in res.rows if r.is_reference)
    assert centre[ref.name][0] > plot["r"]
    assert f"{ref.file_bytes / 1e6:,.0f}" in lay["ticks"]


@needs_chromium
def test_report_layout_log_decades_are_equal(tmp_path):
    # the brief's own reading of a log axis: 0.002 to 0.02 is as far as 0.02 to 0.2
    res = _realistic_result()
    lay = _layout(res, tmp_path)
    y = {p["model"]: (p["y"] + p["b"]) / 2 for p in lay["points"]}
    kl = {r.kld_mean: r.name for r in res.rows}
    a, b, c = y[kl[0.002]], y[kl[0.02]], y[kl[0.2]]
    assert a > b > c and abs((a - b) - (b - c)) <= 2, (a, b, c)
    assert {"0.001", "0.01", "0.1", "0.002", "0.005", "0.02", "0.05"} <= set(lay["ticks"])


@needs_chromium
def test_report_screenshot_is_not_blank(tmp_path):
    out = tmp_path / "report.html"
    write_report(_realistic_result(), out)
    shot = tmp_path / "shot.png"
    proc = run_chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,900", out.resolve().as_uri())
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


@needs_chromium
def test_report_with_a_nan_score_still_draws(tmp_path):
    """A row scored NaN (a NaN KL divergence or perplexity) keeps its table row ("nan") and is left
    off the chart; the embedded data is strict JSON (no bare NaN, which JSON.parse rejects), so
    Chromium still draws every other point."""
    res = _result()
    res.rows[2].kld_mean = float("nan")
    res.rows[3].ppl = float("inf")
    out = tmp_path / "report.html"
    write_report(res, out)
    page = out.read_text(encoding="utf-8")
    data = re.search(r'<script type="application/json" id="results">(.*?)</script>', page, re.S)
    assert data, "no embedded data"

    def strict(c):
        raise AssertionError(f"{c} in the report's JSON")
    points = json.loads(data.group(1).replace("<\\/", "</"), parse_constant=strict)
    assert [p["name"] for p in points] == [r.name for i, r in enumerate(res.rows) if i != 2]
    assert len(rendered_points(out, tmp_path)) == len(res.rows) - 1
    assert "<td>nan</td>" in page
