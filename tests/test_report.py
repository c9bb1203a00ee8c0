"""The HTML report, rendered as a person would see it: in headless Chromium (Debian's chromium
package), after its JavaScript has drawn the chart. The page must work offline: Chromium runs
with background networking off, and the page references no external resource."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from quantkit.eval.results import EvalResult
from quantkit.eval.metrics import pareto_front
from quantkit.eval.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Not a skip: `make test` installs Debian's chromium; without it the report is untested, a failure.
needs_chromium = pytest.mark.usefixtures("chromium_present")


@pytest.fixture
def chromium_present():
    assert CHROMIUM is not None, "chromium not installed: run `make test` (it installs Debian's chromium) or apt-get install -y chromium"


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"
    profile.mkdir(exist_ok=True)
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--no-first-run", "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def rendered_points(html_path: str | Path, tmp_path: Path) -> list[dict[str, str]]:
    """The chart's points in the DOM Chromium built: one dict of attributes per circle.point."""
    proc = _chromium(tmp_path, "--dump-dom", Path(html_path).resolve().as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]

    class Points(HTMLParser):
        def __init__(self):
            super().__init__()
            self.found: list[dict[str, str]] = []

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "circle" and "point" in (a.get("class") or "").split():
                self.found.append(a)

    p = Points()
    p.feed(proc.stdout)
    return p.found


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


@needs_chromium
def test_report_screenshot_is_not_blank(tmp_path):
    out = tmp_path / "report.html"
    write_report(_result(), out)
    shot = tmp_path / "shot.png"
    proc = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,900", out.resolve().as_uri())
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
