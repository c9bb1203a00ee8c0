"""`quantkit eval --sweep sweep.yaml`: a grid of models x recipes x texts, one section (an
EvalResult, as `quantkit eval MODEL --ladder RECIPES --text TEXT` gives it) per model and text.

The file (YAML or JSON; paths relative to the file):

    models: [a.gguf, llama-dir/]        # the sources; each is scored with its rungs
    recipes: [q8_0, q4_0, q4_0+gptq]     # ladder rungs, in the recipe grammar (quantkit.recipe)
    texts: [wikitext-test.txt]           # optional; default: eval's default text

A file that does not parse, a key that is not one of these, a model or text that does not exist
or a recipe that is not a GGUF rung is refused in one line naming the entry.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from typing import Any

from ..util.atomic import atomic_output
from ..util.errors import QuantkitError
from .results import EvalResult

KEYS = ("models", "recipes", "texts")


@dataclass
class Sweep:
    path: str
    models: list[str]
    recipes: list[str]
    texts: list[str | None]


@dataclass
class SweepResult:
    sections: list[EvalResult]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"meta": self.meta, "sections": [s.to_dict() for s in self.sections]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_json_default)


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(type(o).__name__)


def _entries(data: dict, key: str, path: str, required: bool) -> list:
    v = data.get(key)
    if v is None:
        if required:
            raise QuantkitError(f"the sweep lists no {key}", path, f"add `{key}: [...]`")
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v):
        raise QuantkitError(f"{key}: give a list of strings", path)
    return v


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Read and check a sweep file (see the module docstring)."""
    import yaml
    from .ladder import ladder_types
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read()
    except OSError as e:
        raise QuantkitError(f"cannot read the sweep file ({e.strerror})", path) from None
    try:
        data = json.loads(raw) if path.endswith(".json") else yaml.safe_load(raw)
    except (ValueError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QuantkitError(f"the sweep file does not parse ({first})", path) from None
    if not isinstance(data, dict):
        raise QuantkitError("the sweep file is not a mapping of models, recipes and texts", path)
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise QuantkitError(f"unknown sweep key(s): {', '.join(map(str, unknown))}", path,
                            "use " + ", ".join(KEYS))
    base = os.path.dirname(os.path.abspath(path))
    models = []
    for i, m in enumerate(_entries(data, "models", path, True)):
        p = m if os.path.isabs(m) else os.path.join(base, m)
        if not os.path.exists(p):
            raise QuantkitError(f"models[{i}] {m!r}: no such file or directory", path)
        models.append(os.path.abspath(p))
    recipes = []
    for i, r in enumerate(_entries(data, "recipes", path, True)):
        try:
            recipes += [x for x in ladder_types([r]) if x not in recipes]
        except QuantkitError as e:
            raise QuantkitError(f"recipes[{i}] {r!r}: {e}", path) from None
    texts: list[str | None] = []
    for i, t in enumerate(_entries(data, "texts", path, False)):
        p = t if os.path.isabs(t) else os.path.join(base, t)
        if not os.path.isfile(p):
            raise QuantkitError(f"texts[{i}] {t!r}: no such file", path)
        texts.append(os.path.abspath(p))
    return Sweep(os.path.abspath(path), models, recipes, texts or [None])


def write_sweep_report(result: SweepResult, path: str | os.PathLike) -> str:
    """One self-contained page: a section per model and text, each the report a local eval of
    that ladder writes (embedded whole, so its chart and table work as they do alone)."""
    from .report import render
    parts = []
    for s in result.sections:
        title = f"{os.path.basename(s.meta.get('ladder_source') or s.rows[0].path)} on " \
                f"{os.path.basename(s.meta.get('text', ''))}"
        parts.append(f'<section class="sweep-model"><h2>{html.escape(title)}</h2>'
                     f'<iframe style="width:100%;height:1400px;border:0" srcdoc="{html.escape(render(s))}"></iframe>'
                     f'</section>')
    cmd = html.escape(str(result.meta.get("command", "")))
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>quantkit sweep</title>"
            "<style>body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1250px}</style></head><body>"
            f"<h1>quantkit sweep: {len(result.sections)} section(s)</h1><p><code>{cmd}</code></p>"
            + "".join(parts) + "</body></html>")
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    return os.path.abspath(os.fspath(path))
