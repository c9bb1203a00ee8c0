"""`quantkit eval --report out.html`: one self-contained page (no network, no dependency).

The table of every model, a chart of file size against mean KL divergence with the Pareto front
(no other model is both smaller and closer to the reference) marked, and the exact command,
protocol and machine. The chart is an SVG drawn by a few lines of inline JavaScript from the
results embedded as JSON, so the page needs nothing but a browser; points carry
class="point" and data-model, which is what the headless-Chromium test counts.
"""

from __future__ import annotations

import html
import json
import os
from typing import Any

from ..util.atomic import atomic_output
from .metrics import pareto_front
from .results import ClassifierRow, EvalResult, ModelRow, ScoredRow

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.9em}td{white-space:nowrap}th,td{padding:.3em .6em;border-bottom:1px solid #ddd;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
tr.pareto td:first-child{font-weight:600}tr.ref td{background:#f7fbff}
code,pre{background:#f6f6f6;padding:.15em .3em;border-radius:3px}pre{padding:.6em;overflow-x:auto;white-space:pre-wrap}
.note{color:#666;font-size:.85em}#chart svg{border:1px solid #eee;background:#fff}
"""

_JS = r"""
(function(){
  const data = JSON.parse(document.getElementById('results').textContent);
  const W = 760, H = 440, L = 70, R = 30, T = 20, B = 55;
  const ns = 'http://www.w3.org/2000/svg';
  const el = (name, attrs, text) => { const e = document.createElementNS(ns, name);
    for (const k in attrs) e.setAttribute(k, attrs[k]); if (text !== undefined) e.textContent = text; return e; };
  const xs = data.map(d => d.size_mb), ys = data.map(d => d.kld);
  const xmin = Math.min(...xs) * 0.9, xmax = Math.max(...xs) * 1.05;
  const ymax = Math.max(...ys, 1e-6) * 1.1;
  const X = v => L + (v - xmin) / (xmax - xmin || 1) * (W - L - R);
  const Y = v => H - B - v / ymax * (H - T - B);
  const svg = el('svg', {width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: 'img',
                         'aria-label': 'file size against mean KL divergence'});
  for (let i = 0; i <= 5; i++) {
    const yv = ymax * i / 5, xv = xmin + (xmax - xmin) * i / 5;
    svg.appendChild(el('line', {x1: L, x2: W - R, y1: Y(yv), y2: Y(yv), stroke: '#eee'}));
    svg.appendChild(el('text', {x: L - 6, y: Y(yv) + 4, 'text-anchor': 'end', 'font-size': 11}, yv.toPrecision(2)));
    svg.appendChild(el('text', {x: X(xv), y: H - B + 16, 'text-anchor': 'middle', 'font-size': 11}, xv.toFixed(0)));
  }
  svg.appendChild(el('line', {x1: L, x2: W - R, y1: H - B, y2: H - B, stroke: '#888'}));
  svg.appendChild(el('line', {x1: L, x2: L, y1: T, y2: H - B, stroke: '#888'}));
  svg.appendChild(el('text', {x: (L + W - R) / 2, y: H - 12, 'text-anchor': 'middle', 'font-size': 13}, 'file size (MB)'));
  svg.appendChild(el('text', {x: 16, y: (T + H - B) / 2, 'text-anchor': 'middle', 'font-size': 13,
                              transform: `rotate(-90 16 ${(T + H - B) / 2})`}, 'mean KL divergence to the reference'));
  const front = data.filter(d => d.pareto).sort((a, b) => a.size_mb - b.size_mb);
  if (front.length > 1) {
    let pts = []; front.forEach((d, i) => { if (i) pts.push(`${X(d.size_mb)},${Y(front[i - 1].kld)}`);
                                            pts.push(`${X(d.size_mb)},${Y(d.kld)}`); });
    svg.appendChild(el('polyline', {points: pts.join(' '), fill: 'none', stroke: '#d62728',
                                    'stroke-width': 1.5, 'stroke-dasharray': '5,3', class: 'pareto-line'}));
  }
  data.forEach(d => {
    const g = el('g', {});
    const c = el('circle', {cx: X(d.size_mb), cy: Y(d.kld), r: 6, class: 'point' + (d.pareto ? ' pareto' : ''),
                            'data-model': d.name, fill: d.pareto ? '#d62728' : '#fff',
                            stroke: d.ref ? '#1f77b4' : '#d62728', 'stroke-width': 2});
    c.appendChild(el('title', {}, `${d.name}: ${d.size_mb.toFixed(1)} MB, KLD ${d.kld.toPrecision(3)}, ${d.quality}`));
    g.appendChild(c);
    g.appendChild(el('text', {x: X(d.size_mb) + 9, y: Y(d.kld) - 7, 'font-size': 11}, d.label));
    svg.appendChild(g);
  });
  const legend = el('text', {x: W - R, y: T + 10, 'text-anchor': 'end', 'font-size': 11, fill: '#d62728'},
                    'filled, dashed: Pareto front (nothing smaller is closer to the reference)');
  svg.appendChild(legend);
  document.getElementById('chart').appendChild(svg);
})();
"""


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _quality(r: ScoredRow) -> str:
    if isinstance(r, ClassifierRow):
        return f"accuracy {100 * r.accuracy:.2f} %"
    return f"PPL {r.ppl:.3f}"


def _classifier_table(rows: list[ClassifierRow], front: list[bool], task: str) -> tuple[list[str], list[list[str]]]:
    head = ["model", "quantization", "size MB", "bits/weight", "bits/weight (linear)", f"{task} accuracy",
            "agreement with reference", "KLD mean", "KLD median", "KLD p99", "mean Δp (gold)", "load s",
            "latency ms/sentence (batch 1)", "sentences/s (batch 32)", "peak RSS MB (before load)"]
    out = []
    for r in rows:
        sp = r.speed or {}
        rss = (f"{sp['peak_rss_bytes'] / 1e6:,.0f} ({sp['rss_before_load_bytes'] / 1e6:,.0f})"
               if sp.get("peak_rss_bytes") else "-")
        out.append([r.name + (" (reference)" if r.is_reference else ""), r.quantization or "fp32",
                    f"{r.file_bytes / 1e6:,.1f}", _fmt(r.bits_per_weight, ".3f"),
                    _fmt(r.bits_per_weight_linear, ".3f"),
                    f"{100 * r.accuracy:.2f} ± {100 * r.accuracy_stderr:.2f} %",
                    f"{100 * r.top1_agreement:.2f} %", f"{r.kld_mean:.6f}", f"{r.kld_median:.6f}",
                    f"{r.kld_p99:.5f}", f"{100 * r.delta_p_mean:+.3f} %", _fmt(sp.get("load_s"), ".2f"),
                    _fmt(sp.get("latency_ms"), ".2f"), _fmt(sp.get("sent_s"), ".1f"), rss])
    return head, out


def render(result: EvalResult) -> str:
    rows = result.rows
    meta = result.meta
    classifier = meta.get("kind") == "classifier"
    front = pareto_front([(r.file_bytes, r.kld_mean) for r in rows])
    points = [{"name": r.name, "label": r.rung if isinstance(r, ModelRow) and r.method else _short(r.name), "size_mb": r.file_bytes / 1e6, "kld": r.kld_mean,
               "quality": _quality(r), "pareto": bool(p), "ref": bool(r.is_reference)} for r, p in zip(rows, front)]
    ladder = meta.get("ladder")
    head = ["model", *(["rung (method)"] if ladder else []), "runtime", "size MB", "bits/weight", "bits/weight (linear)", "PPL", "KLD mean", "KLD median",
            "KLD p99", "top-1 agreement", "mean Δp", "load s", "prompt tok/s", "gen tok/s",
            "llama.cpp pp / tg tok/s", "peak RSS MB (before load)"]
    cells_of = []
    for r in ([] if classifier else rows):
        sp = r.speed or {}
        llama = (f"{_fmt(sp.get('llama_pp_tok_s'), '.1f')} / {_fmt(sp.get('llama_tg_tok_s'), '.1f')}"
                 if sp.get("llama_pp_tok_s") is not None else "-")
        rss = (f"{sp['peak_rss_bytes'] / 1e6:,.0f} ({sp['rss_before_load_bytes'] / 1e6:,.0f})"
               if sp.get("peak_rss_bytes") else "-")
        cells = [r.name + (" (reference)" if r.is_reference else ""), *([r.rung or "-"] if ladder else []),
                 r.runtime,
                 f"{r.file_bytes / 1e6:,.1f}", _fmt(r.bits_per_weight, ".3f"),
                 _fmt(r.bits_per_weight_linear, ".3f"), f"{r.ppl:.4f} ± {r.ppl_stderr:.4f}",
                 f"{r.kld_mean:.6f}", f"{r.kld_median:.6f}", f"{r.kld_p99:.5f}",
                 f"{100 * r.top1_agreement:.2f} %", f"{100 * r.delta_p_mean:+.3f} %",
                 _fmt(sp.get("load_s"), ".2f"), _fmt(sp.get("pp_tok_s"), ".1f"), _fmt(sp.get("tg_tok_s"), ".1f"),
                 llama, rss]
        cells_of.append(cells)
    if classifier:
        head, cells_of = _classifier_table(rows, front, meta.get("task", "task"))
    trs = []
    for r, p, cells in zip(rows, front, cells_of):
        cls = " ".join(c for c, on in (("pareto", p), ("ref", r.is_reference)) if on)
        trs.append(f'<tr class="{cls}">' + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    machine = meta.get("machine", {})
    mach = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in machine.items())
    met = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in meta.get("metrics", {}).items())
    data_json = json.dumps(points).replace("</", "<\\/")
    files = "".join(f"<li><code>{html.escape(r.path)}</code></li>" for r in rows)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>quantkit eval report</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>
<body>
<h1>quantkit eval</h1>
<p>{len(rows)} model(s) scored on the same {'examples' if classifier else 'token ids'} against <code>{html.escape(os.path.basename(meta.get('reference', '')))}</code>
({html.escape(meta.get('reference_how', ''))}).</p>
<h2>Size against quality</h2>
<div id="chart"></div>
<noscript><p class="note">The chart needs JavaScript; the table below has every number.</p></noscript>
<h2>Results</h2>
<table id="results-table"><thead><tr>{''.join(f'<th>{html.escape(h)}</th>' for h in head)}</tr></thead>
<tbody>{''.join(trs)}</tbody></table>
<p class="note">Bold: on the Pareto front of size against mean KLD. Bits per weight: whole file bytes x 8 / parameters;
linear: the transformer blocks' 2-D weights alone.</p>
<h2>How this was measured</h2>
<pre id="command">{html.escape(meta.get('command', '(Python API)'))}</pre>
<ul>
<li><b>protocol</b>: {html.escape(meta.get('protocol', ''))}</li>
<li><b>reference</b>: <code>{html.escape(meta.get('reference', ''))}</code>, {html.escape(meta.get('reference_runtime', ''))}</li>
<li><b>tokenizer</b>: {html.escape(meta.get('tokenizer', ''))}</li>
<li><b>{'labelled data' if classifier else 'text'}</b>: <code>{html.escape(meta.get('text', ''))}</code></li>
{_ladder_li(ladder)}<li><b>speed and memory</b>: {html.escape(meta.get('speed') or 'not measured (--no-speed)')}</li>
{met}
</ul>
<h3>Files</h3><ul>{files}</ul>
<h2>Machine</h2>
<table id="machine">{mach}</table>
<script type="application/json" id="results">{data_json}</script>
<script>{_JS}</script>
</body></html>
"""


def _ladder_li(ladder: dict | None) -> str:
    if not ladder:
        return ""
    text = f"RTN: {ladder['rtn']}" + (f"; GPTQ: {ladder['gptq']}" if ladder.get("gptq") else "")
    return f"<li><b>ladder</b>: {html.escape(text)}</li>\n"


def _short(name: str) -> str:
    base = os.path.basename(name)
    return base[:-5] if base.endswith(".gguf") else base


def write_report(result: EvalResult, path: str | os.PathLike) -> str:
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(render(result))
    return os.fspath(path)
