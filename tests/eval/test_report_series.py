"""The size-against-KL page for several families of files (the budgeted-GGUF benchmark's Pareto
plot), drawn by headless Chromium: one point per file in its family's colour, the Pareto front
over all families, each family in the legend."""

from __future__ import annotations

import re

from helpers.chromium import needs_chromium, rendered_points, run_chromium
from quantkit.eval.metrics import pareto_front
from quantkit.eval.report import SERIES_COLORS, write_series_report

SERIES = {
    "quantkit budget": [{"name": "Q3_K_M size", "bytes": 241_900_000, "kld": 0.012},
                        {"name": "Q4_K_M size", "bytes": 253_000_000, "kld": 0.0039}],
    "llama.cpp imatrix": [{"name": "Q3_K_M", "bytes": 241_961_952, "kld": 0.088},
                          {"name": "Q4_K_M", "bytes": 253_113_312, "kld": 0.0038}],
    "llama.cpp RTN": [{"name": "Q3_K_M", "bytes": 241_961_664, "kld": 0.17},
                      {"name": "<Q2_K>", "bytes": 237_077_184, "kld": 0.5}],
}


@needs_chromium
def test_series_page_draws_each_family_in_its_colour(tmp_path):
    out = tmp_path / "pareto.html"
    write_series_report(SERIES, {"title": "Gemma-3-270M", "text": "wikitext-2 test", "command": "python b.py",
                                 "machine": {"cpu": "Test CPU 9000"}}, out)
    page = out.read_text(encoding="utf-8")
    assert "Test CPU 9000" in page and "&lt;Q2_K&gt;" in page
    points = rendered_points(out, tmp_path)
    rows = [(s, p) for s, pts in SERIES.items() for p in pts]
    assert [p["data-model"] for p in points] == [f"{s}: {p['name']}" for s, p in rows]
    front = pareto_front([(p["bytes"], p["kld"]) for _, p in rows])
    assert ["pareto" in p["class"].split() for p in points] == front
    assert front == [True, True, False, True, False, True]
    colour = {s: SERIES_COLORS[i] for i, s in enumerate(SERIES)}
    for p, (s, _) in zip(points, rows):
        assert p["stroke"] == colour[s]
        assert p["fill"] == (colour[s] if "pareto" in p["class"] else "#fff")
    dom = run_chromium(tmp_path, "--dump-dom", out.resolve().as_uri()).stdout
    legend = re.findall(r'<text[^>]*class="legend"[^>]*>([^<]*)</text>', dom)
    assert legend[:3] == list(SERIES)
