"""`quantkit eval --report out.html`: one self-contained page (no network, no dependency).

The table of every model, a chart of file size against mean KL divergence with the Pareto front
(no other model is both smaller and closer to the reference) marked, and the exact command,
protocol and machine. The chart is an SVG drawn by inline JavaScript from the results embedded as
JSON, so the page needs nothing but a browser. Points carry class="point" and data-model (the
headless-Chromium tests count them), labels class="label" and data-model, and rect.plot-area
spans the size axis. The table wraps long names and headers so that it fits a 1280-pixel window.
"""

from __future__ import annotations

import html
import json
import math
import os
from typing import Any

from ..util.atomic import atomic_output
from .metrics import pareto_front
from .results import ClassifierRow, EvalResult, ModelRow, ScoredRow

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em}
.table-wrap{max-width:100%;overflow-x:auto}
table{border-collapse:collapse;font-size:.8em}#results-table{width:100%}
th,td{padding:.3em .4em;border-bottom:1px solid #ddd;text-align:right;vertical-align:top}
th{background:#f4f4f4;font-weight:600;vertical-align:bottom}
td:first-child,th:first-child{text-align:left}#results-table td:first-child{min-width:8em;overflow-wrap:anywhere}
tr.pareto td:first-child{font-weight:600}tr.ref td{background:#f7fbff}
#machine td{text-align:left;overflow-wrap:anywhere}
code,pre{background:#f6f6f6;padding:.15em .3em;border-radius:3px;overflow-wrap:anywhere}
pre{padding:.6em;white-space:pre-wrap}
.note{color:#666;font-size:.85em}#chart{max-width:100%}#chart svg{display:block;background:#fff}
"""

# The chart, drawn from the JSON in #results. Size runs linearly over the quantized files only; a
# reference outside that span sits in a strip of its own beside the axis (its size written under
# it), so it cannot squeeze the others into a corner. Mean KL divergence runs on a log axis
# (decades, with 2 and 5 labelled when three decades or fewer are shown); a KL divergence of 0
# (the reference) sits on a row of its own below it; the axis spans at most six decades, and a
# value below them sits on its floor, its label saying so. Labels are placed greedily: beside,
# above or below their point, else moved up or down with a leader line, clear of other labels and
# points where there is room, always inside the plot.
_JS = r"""
(function(){
  const data = JSON.parse(document.getElementById('results').textContent);
  const host = document.getElementById('chart');
  const ns = 'http://www.w3.org/2000/svg';
  const el = (name, attrs, text) => { const e = document.createElementNS(ns, name);
    for (const k in attrs) e.setAttribute(k, attrs[k]); if (text !== undefined) e.textContent = text; return e; };
  const fmtKl = v => (v >= 1e-3 && v < 1e4) ? String(+v.toPrecision(1)) : v.toExponential(0);
  const fmtMb = v => v.toLocaleString('en-US', {maximumFractionDigits: v < 10 ? 1 : 0});
  const RED = '#d62728', BLUE = '#1f77b4';

  function niceTicks(lo, hi, n) {
    const raw = (hi - lo) / Math.max(n, 1), p = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map(m => m * p).find(s => s >= raw);
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi; v += step) out.push(+v.toPrecision(12));
    return out;
  }

  const colorOf = d => d.color || RED;
  const seriesItems = () => { const seen = new Map();
    for (const d of data) if (d.series && !seen.has(d.series)) seen.set(d.series, d.color || RED);
    return Array.from(seen, ([name, c]) => [{fill: c, stroke: c}, name]); };

  function legend(svg, W, L) {
    const items = [...seriesItems(),
                   [{fill: RED, stroke: RED}, 'Pareto front: nothing smaller is closer to the reference'],
                   ...(data.some(d => !d.pareto) ? [[{fill: '#fff', stroke: RED}, 'dominated']] : []),
                   ...(data.some(d => d.ref) ? [[{fill: RED, stroke: BLUE}, 'reference']] : [])];
    let x = L, y = 14;
    for (const [style, text] of items) {
      const t = el('text', {'font-size': 12, fill: '#444', class: 'legend'}, text);
      svg.appendChild(t);
      const w = t.getBBox().width + 40;
      if (x > L && x + w > W) { x = L; y += 18; }
      svg.appendChild(el('circle', Object.assign({cx: x + 6, cy: y, r: 5, 'stroke-width': 2}, style)));
      t.setAttribute('x', x + 16); t.setAttribute('y', y + 4);
      x += w;
    }
    return y + 16;
  }

  function scales(W, H, L, R, T, B) {
    const quant = data.filter(d => !d.ref), span = quant.length ? quant : data;
    const smin = Math.min(...span.map(d => d.size_mb)), smax = Math.max(...span.map(d => d.size_mb));
    const pad = (smax - smin) * 0.06 || smax * 0.1 || 1, lo = smin - pad, hi = smax + pad;
    const side = d => (!d.ref || !quant.length) ? 0 : d.size_mb > hi ? 1 : d.size_mb < lo ? -1 : 0;
    const strip = 110, ls = data.some(d => side(d) < 0) ? strip : 0, rs = data.some(d => side(d) > 0) ? strip : 0;
    const px0 = L + ls, px1 = W - R - rs;
    const pos = data.map(d => d.kld).filter(v => v > 0);
    let e1 = pos.length ? Math.ceil(Math.log10(Math.max(...pos)) - 1e-9) : -1;
    let e0 = pos.length ? Math.floor(Math.log10(Math.min(...pos)) + 1e-9) : -3;
    if (e1 - e0 < 1) e0 = e1 - 1;
    if (e1 - e0 > 6) e0 = e1 - 6;
    const zero = data.some(d => !(d.kld > 0)), logBottom = H - B - (zero ? 36 : 0);
    const Y = v => v > 0 ? logBottom - 10 - (Math.max(Math.log10(v), e0) - e0) / (e1 - e0) * (logBottom - T - 20)
                         : H - B - 14;
    const X = v => px0 + (v - lo) / (hi - lo) * (px1 - px0);
    const stripX = {};
    for (const s of [-1, 1]) {
      const inStrip = data.filter(d => side(d) === s).sort((a, b) => a.size_mb - b.size_mb);
      const x0 = s < 0 ? L : px1;
      inStrip.forEach((d, i) => { stripX[d.name] = x0 + strip * (i + 1) / (inStrip.length + 1); });
    }
    const x = d => d.name in stripX ? stripX[d.name] : X(d.size_mb);
    return {lo, hi, px0, px1, ls, rs, e0, e1, zero, logBottom, X, Y, x, side};
  }

  function axes(svg, s, W, H, L, R, T, B) {
    svg.appendChild(el('rect', {x: s.px0, y: T, width: s.px1 - s.px0, height: H - B - T, fill: '#fff', class: 'plot-area'}));
    const strips = [];
    if (s.ls) strips.push(L); if (s.rs) strips.push(s.px1);
    for (const x0 of strips) {
      svg.appendChild(el('rect', {x: x0, y: T, width: 110, height: H - B - T, fill: '#f3f8fd', class: 'ref-strip'}));
      svg.appendChild(el('text', {x: x0 + 55, y: T + 14, 'text-anchor': 'middle', 'font-size': 11, fill: BLUE,
                                  stroke: '#f3f8fd', 'stroke-width': 4, 'paint-order': 'stroke', class: 'strip-caption'}, 'reference,'));
      svg.appendChild(el('text', {x: x0 + 55, y: T + 27, 'text-anchor': 'middle', 'font-size': 11, fill: BLUE,
                                  stroke: '#f3f8fd', 'stroke-width': 4, 'paint-order': 'stroke', class: 'strip-caption'}, 'off the size scale'));
    }
    const label = decades => decades <= 3 ? [1, 2, 5] : [1];
    for (let e = s.e0; e <= s.e1; e++) for (let m = 1; m <= 9; m++) {
      const v = m * Math.pow(10, e); if (e === s.e1 && m > 1) break;
      const y = s.Y(v);
      svg.appendChild(el('line', {x1: L, x2: W - R, y1: y, y2: y, stroke: m === 1 ? '#ddd' : '#f1f1f1'}));
      if (label(s.e1 - s.e0).includes(m))
        svg.appendChild(el('text', {x: L - 6, y: y + 4, 'text-anchor': 'end', 'font-size': m === 1 ? 11 : 10,
                                    fill: m === 1 ? '#222' : '#777', class: 'tick'}, fmtKl(v)));
    }
    if (s.zero) {
      const y = s.Y(0), yb = s.logBottom;
      svg.appendChild(el('line', {x1: L, x2: W - R, y1: y, y2: y, stroke: '#ddd'}));
      svg.appendChild(el('text', {x: L - 6, y: y + 4, 'text-anchor': 'end', 'font-size': 11, class: 'tick'}, '0'));
      for (const d of [-3, 3]) svg.appendChild(el('line', {x1: L - 5, x2: L + 5, y1: yb + d + 3, y2: yb + d - 3, stroke: '#888'}));
    }
    const n = Math.max(2, Math.floor((s.px1 - s.px0) / 90));
    for (const v of niceTicks(s.lo, s.hi, n)) {
      const x = s.X(v);
      if ((s.rs && x > s.px1 - 20) || (s.ls && x < s.px0 + 20)) continue;  // clear of the break mark
      svg.appendChild(el('line', {x1: x, x2: x, y1: T, y2: H - B, stroke: '#f1f1f1'}));
      svg.appendChild(el('line', {x1: x, x2: x, y1: H - B, y2: H - B + 4, stroke: '#888'}));
      svg.appendChild(el('text', {x, y: H - B + 17, 'text-anchor': 'middle', 'font-size': 11, class: 'tick'}, fmtMb(v)));
    }
    for (const d of data) if (s.side(d)) {
      const x = s.x(d);
      svg.appendChild(el('line', {x1: x, x2: x, y1: H - B, y2: H - B + 4, stroke: BLUE}));
      svg.appendChild(el('text', {x, y: H - B + 17, 'text-anchor': 'middle', 'font-size': 11, fill: BLUE, class: 'tick'},
                         fmtMb(d.size_mb)));
    }
    svg.appendChild(el('line', {x1: L, x2: W - R, y1: H - B, y2: H - B, stroke: '#888'}));
    svg.appendChild(el('line', {x1: L, x2: L, y1: T, y2: H - B, stroke: '#888'}));
    for (const x of [s.ls ? s.px0 : null, s.rs ? s.px1 : null]) if (x !== null) {
      svg.appendChild(el('line', {x1: x, x2: x, y1: T, y2: H - B, stroke: '#cfe0f0'}));
      for (const d of [-3, 3]) svg.appendChild(el('line', {x1: x + d - 3, x2: x + d + 3, y1: H - B + 5, y2: H - B - 5, stroke: '#888'}));
    }
    svg.appendChild(el('text', {x: (s.px0 + s.px1) / 2, y: H - 14, 'text-anchor': 'middle', 'font-size': 13},
                       'file size (MB)'));
    svg.appendChild(el('text', {x: 16, y: (T + H - B) / 2, 'text-anchor': 'middle', 'font-size': 13,
                                transform: `rotate(-90 16 ${(T + H - B) / 2})`}, 'mean KL divergence to the reference (log)'));
  }

  function placeLabels(svg, layer, pts, bounds, lines, floor) {
    const hit = (a, b) => a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h;
    const overlap = (a, b) => Math.max(0, Math.min(a.x + a.w, b.x + b.w) - Math.max(a.x, b.x)) *
                              Math.max(0, Math.min(a.y + a.h, b.y + b.h) - Math.max(a.y, b.y));
    const clamp = c => Object.assign(c, {x: Math.min(Math.max(c.x, bounds.x), bounds.x + bounds.w - c.w),
                                         y: Math.min(Math.max(c.y, bounds.y), bounds.y + bounds.h - c.h)});
    const crosses = (s, b) => {  // does segment s = [x1, y1, x2, y2] pass through box b (Liang-Barsky)
      let t0 = 0, t1 = 1; const dx = s[2] - s[0], dy = s[3] - s[1];
      for (const [p, q] of [[-dx, s[0] - b.x], [dx, b.x + b.w - s[0]], [-dy, s[1] - b.y], [dy, b.y + b.h - s[1]]]) {
        if (p === 0) { if (q <= 0) return false; continue; }
        const r = q / p; if (p < 0) t0 = Math.max(t0, r); else t1 = Math.min(t1, r);
        if (t0 >= t1) return false;
      }
      return true; };
    // hard: points, placed labels, captions; soft: the neighbourhood of other points (a label there reads as theirs)
    const hard = pts.map(p => ({x: p.x - 7, y: p.y - 7, w: 14, h: 14})), leaders = [];
    for (const t of svg.querySelectorAll('.strip-caption')) { const b = t.getBBox(); hard.push({x: b.x, y: b.y, w: b.width, h: b.height}); }
    const order = pts.slice().sort((a, b) => (b.d.ref - a.d.ref) || (a.x - b.x));
    for (const p of order) {
      const t = el('text', {'font-size': 11, class: 'label', 'data-model': p.d.name, fill: p.d.ref ? BLUE : '#222',
                            stroke: '#fff', 'stroke-width': 3, 'stroke-linejoin': 'round', 'paint-order': 'stroke'},
                 p.d.label + (p.d.kld > 0 && p.d.kld < floor ? ` (KL < ${fmtKl(floor)})` : ''));
      layer.appendChild(t);
      const bb = t.getBBox(), w = bb.width + 2, h = bb.height, r = 10;
      const near = [[p.x + r, p.y - h / 2], [p.x - r - w, p.y - h / 2], [p.x - w / 2, p.y - r - h], [p.x - w / 2, p.y + r],
                    [p.x + 4, p.y - r - h], [p.x + 4, p.y + r], [p.x - 4 - w, p.y - r - h], [p.x - 4 - w, p.y + r]];
      const cands = near.map(([x, y]) => clamp({x, y, w, h}));
      for (let k = 1; k <= 16; k++) for (const sg of [-1, 1]) for (const x of [p.x + r, p.x - r - w, p.x - w / 2])
        cands.push(clamp({x, y: p.y - h / 2 + sg * k * (h + 4), w, h}));
      const others = pts.filter(q => q !== p).map(q => ({x: q.x - 16, y: q.y - 16, w: 32, h: 32}));
      const leader = c => { const qx = Math.min(Math.max(p.x, c.x), c.x + c.w), qy = Math.min(Math.max(p.y, c.y), c.y + c.h);
                            const dist = Math.hypot(qx - p.x, qy - p.y);
                            return dist > 13 ? [p.x + (qx - p.x) * 7 / dist, p.y + (qy - p.y) * 7 / dist, qx, qy] : null; };
      let best = null, cost = Infinity;
      for (const c of cands) {
        const pad = {x: c.x - 2, y: c.y - 2, w: c.w + 4, h: c.h + 4}, seg = leader(c);
        let cc = hard.reduce((acc, o) => acc + (hit(pad, o) ? 1000 + overlap(pad, o) : 0), 0);
        cc += others.reduce((acc, o) => acc + overlap(pad, o) / 4, 0);
        cc += leaders.filter(s => crosses(s, pad)).length * 500 + lines.filter(s => crosses(s, pad)).length * 30;
        if (seg) cc += 20 + hard.slice(pts.length).filter(b => crosses(seg, b)).length * 500 + Math.hypot(seg[2] - p.x, seg[3] - p.y) / 4;
        if (cc < cost) { cost = cc; best = c; }
        if (cc === 0) break;
      }
      t.setAttribute('x', best.x + 1 - bb.x); t.setAttribute('y', best.y - bb.y);
      hard.push(best);
      const seg = leader(best);
      if (seg) { leaders.push(seg); svg.insertBefore(el('line', {x1: seg[0], y1: seg[1], x2: seg[2], y2: seg[3], stroke: '#999', class: 'leader'}), layer); }
    }
  }

  function draw() {
    host.textContent = '';
    const W = Math.max(480, Math.min(1100, host.clientWidth || 900)), L = 76, R = 16, B = 50;
    const svg = el('svg', {width: W, role: 'img', 'aria-label': 'file size against mean KL divergence (log scale)'});
    host.appendChild(svg);
    const T = legend(svg, W - R, L), H = T + 430;
    svg.setAttribute('height', H); svg.setAttribute('viewBox', `0 0 ${W} ${H}`);
    const s = scales(W, H, L, R, T, B);
    axes(svg, s, W, H, L, R, T, B);
    const front = data.filter(d => d.pareto).sort((a, b) => a.size_mb - b.size_mb), steps = [];
    front.forEach((d, i) => { if (i) steps.push([s.x(front[i - 1]), s.Y(front[i - 1].kld), s.x(d), s.Y(front[i - 1].kld)],
                                                [s.x(d), s.Y(front[i - 1].kld), s.x(d), s.Y(d.kld)]); });
    if (steps.length) svg.appendChild(el('polyline', {points: [steps[0].slice(0, 2), ...steps.map(q => q.slice(2))].join(' '),
                                                      fill: 'none', stroke: RED, 'stroke-width': 1.5,
                                                      'stroke-dasharray': '5,3', class: 'pareto-line'}));
    const pts = data.map(d => ({d, x: s.x(d), y: s.Y(d.kld)}));
    const labels = el('g', {class: 'labels'});
    for (const p of pts) {
      const d = p.d, c = el('circle', {cx: p.x, cy: p.y, r: 6, class: 'point' + (d.pareto ? ' pareto' : ''),
                                       'data-model': d.name, fill: d.pareto ? colorOf(d) : '#fff',
                                       stroke: d.ref ? BLUE : colorOf(d), 'stroke-width': 2});
      c.appendChild(el('title', {}, `${d.name}: ${d.size_mb.toFixed(1)} MB, KLD ${d.kld.toPrecision(3)}, ${d.quality}`));
      svg.appendChild(c);
    }
    svg.appendChild(labels);
    placeLabels(svg, labels, pts, {x: L + 3, y: T + 3, w: W - R - L - 6, h: H - B - T - 6}, steps, Math.pow(10, s.e0));
  }

  draw();
  let width = host.clientWidth;
  window.addEventListener('resize', () => { if (host.clientWidth !== width) { width = host.clientWidth; draw(); } });
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
                    f"{100 * r.accuracy:.2f} ±\u00a0{100 * r.accuracy_stderr:.2f}\u00a0%",
                    f"{100 * r.top1_agreement:.2f}\u00a0%", f"{r.kld_mean:.6f}", f"{r.kld_median:.6f}",
                    f"{r.kld_p99:.5f}", f"{100 * r.delta_p_mean:+.3f}\u00a0%", _fmt(sp.get("load_s"), ".2f"),
                    _fmt(sp.get("latency_ms"), ".2f"), _fmt(sp.get("sent_s"), ".1f"), rss])
    return head, out


def _plottable(point: dict) -> bool:
    return all(isinstance(point[k], (int, float)) and math.isfinite(point[k]) for k in ("size_mb", "kld"))


def _finite_or_null(obj):
    """`obj` with every NaN or infinite float replaced by None (JSON null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    return obj


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
                 _fmt(r.bits_per_weight_linear, ".3f"), f"{r.ppl:.4f} ±\u00a0{r.ppl_stderr:.4f}",
                 f"{r.kld_mean:.6f}", f"{r.kld_median:.6f}", f"{r.kld_p99:.5f}",
                 f"{100 * r.top1_agreement:.2f}\u00a0%", f"{100 * r.delta_p_mean:+.3f}\u00a0%",
                 _fmt(sp.get("load_s"), ".2f"), _fmt(sp.get("pp_tok_s"), ".1f"), _fmt(sp.get("tg_tok_s"), ".1f"),
                 llama, rss]
        cells_of.append(cells)
    if classifier:
        head, cells_of = _classifier_table(rows, front, meta.get("task", "task"))
    trs = []
    for r, p, cells in zip(rows, front, cells_of):
        cls = " ".join(c for c, on in (("pareto", p), ("ref", r.is_reference)) if on)
        trs.append(f'<tr class="{cls}">' + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    ths = "".join(f"<th>{html.escape(h).replace('/', '/<wbr>')}</th>" for h in head)  # headers may wrap after a slash
    machine = meta.get("machine", {})
    mach = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in machine.items())
    met = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in meta.get("metrics", {}).items())
    # a row whose size or KL divergence is not a finite number has no place on the chart (its table
    # row says "nan"); JSON has no NaN (the browser's JSON.parse rejects Python's bare NaN), so none is written
    points = [_finite_or_null(p) for p in points if _plottable(p)]
    data_json = json.dumps(points, allow_nan=False).replace("</", "<\\/")
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
<div class="table-wrap"><table id="results-table"><thead><tr>{ths}</tr></thead>
<tbody>{''.join(trs)}</tbody></table></div>
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


SERIES_COLORS = ("#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#e377c2", "#7f7f7f")


def render_series(series: dict[str, list[dict]], meta: dict) -> str:
    """A size-against-KL page for several families of files (e.g. budgeted files, GPTQ stock
    mixes, llama.cpp's imatrix and RTN mixes), each a colour in the legend, the Pareto front over
    all of them marked as in `render`. series: name -> [{"name", "bytes", "kld"}, ...]; meta:
    "title", "text", "command", "machine" (a dict), "note"."""
    rows = [(s, p) for s, pts in series.items() for p in pts]
    front = pareto_front([(p["bytes"], p["kld"]) for _, p in rows])
    colour = {s: SERIES_COLORS[i % len(SERIES_COLORS)] for i, s in enumerate(series)}
    points = [_finite_or_null({"name": f"{s}: {p['name']}", "label": p["name"], "size_mb": p["bytes"] / 1e6,
                               "kld": p["kld"], "quality": s, "pareto": bool(f), "ref": False, "series": s,
                               "color": colour[s]}) for (s, p), f in zip(rows, front)]
    points = [p for p in points if _plottable(p)]
    data_json = json.dumps(points, allow_nan=False).replace("</", "<\\/")
    trs = "".join(f'<tr class="{"pareto" if f else ""}"><td>{html.escape(s)}</td><td>{html.escape(p["name"])}</td>'
                  f'<td>{p["bytes"]:,}</td><td>{_fmt(p["kld"], ".5f")}</td></tr>' for (s, p), f in zip(rows, front))
    mach = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                   for k, v in meta.get("machine", {}).items())
    title = html.escape(meta.get("title", "size against KL divergence"))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>
<body>
<h1>{title}</h1>
<p>Mean KL divergence to the reference on <code>{html.escape(meta.get('text', ''))}</code> against file size.</p>
<div id="chart"></div>
<noscript><p class="note">The chart needs JavaScript; the table below has every number.</p></noscript>
<div class="table-wrap"><table id="results-table"><thead><tr><th>family</th><th>file</th><th>bytes</th>
<th>KLD mean</th></tr></thead><tbody>{trs}</tbody></table></div>
<p class="note">Bold: on the Pareto front over every family. {html.escape(meta.get('note', ''))}</p>
<pre id="command">{html.escape(meta.get('command', ''))}</pre>
<table id="machine">{mach}</table>
<script type="application/json" id="results">{data_json}</script>
<script>{_JS}</script>
</body></html>
"""


def write_series_report(series: dict[str, list[dict]], meta: dict, path: str | os.PathLike) -> str:
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(render_series(series, meta))
    return os.fspath(path)
