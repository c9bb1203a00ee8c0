"""The import floors of quantkit, read from the code (DESIGN.md, "A layout that shows the
architecture"): a module imports only from floors below it (function-level imports count), never
from a floor-mate of another package (eval, plan and distill stand side by side), no two modules
import each other through any path, and no name starting with "_" is used outside its module
(src/quantkit, tests and benchmarks alike)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "quantkit"
PKG = "quantkit"

# the floors, lowest first; names on one line are floor-mates. The package's own __init__
# (its version) is the ground under them all.
FLOORS = """
util
codecs
recipe
models
runtimes
quant
eval plan distill
api
cli commands
"""
FLOOR = {name: i for i, line in enumerate(FLOORS.strip().splitlines(), 1) for name in line.split()}
FLOOR[""] = 0


# ------------------------------------------------------------------------------- reading the code
def module_name(path: Path, base: Path, prefix: str) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([prefix, *parts] if prefix else parts)


def src_modules() -> dict[str, Path]:
    return {module_name(p, SRC, PKG): p for p in sorted(SRC.rglob("*.py"))}


MODULES = src_modules()


def is_package(mod: str) -> bool:
    return MODULES.get(mod, Path()).name == "__init__.py"


def resolve_from(node: ast.ImportFrom, me: str) -> str:
    """The absolute module an `from X import ...` names (relative imports resolved against `me`)."""
    if not node.level:
        return node.module or ""
    base = me.split(".") if is_package(me) else me.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(tree: ast.AST, me: str):
    """(target module, name or None, line) for every quantkit import, function-level ones included;
    `from pkg import submodule` targets the submodule."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == PKG or a.name.startswith(PKG + "."):
                    yield a.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            mod = resolve_from(node, me)
            if mod != PKG and not mod.startswith(PKG + "."):
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                yield (sub, None, node.lineno) if sub in MODULES else (mod, a.name, node.lineno)


def floor_of(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def import_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for me, path in MODULES.items():
        for target, _, _ in imports(ast.parse(path.read_text(encoding="utf-8")), me):
            if target != me and target in MODULES and not is_package(target):
                edges[me].add(target)
    return edges


# ------------------------------------------------------------------------------- the rules
def test_every_module_has_a_floor():
    assert {floor_of(m) for m in MODULES} <= set(FLOOR), sorted({floor_of(m) for m in MODULES} - set(FLOOR))


def test_no_upward_or_sideways_import():
    bad = []
    for a, targets in import_edges().items():
        for b in targets:
            fa, fb = floor_of(a), floor_of(b)
            if fa == fb:
                continue
            if FLOOR[fb] > FLOOR[fa]:
                bad.append(f"UP   {a} -> {b}")
            elif FLOOR[fb] == FLOOR[fa]:
                bad.append(f"SIDE {a} -> {b}")
    assert not bad, "imports that climb or go sideways:\n" + "\n".join(sorted(bad))


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components of more than one module (iterative: no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_circles():
    circles = strongly_connected(import_edges())
    assert not circles, "modules that import each other:\n" + "\n".join(" <-> ".join(c) for c in circles)


def private_uses(path: Path, me: str) -> list[str]:
    """`from quantkit.x import _y`, `x._y` on a name bound to a quantkit module, and
    setattr/getattr(x, "_y", ...) of one, in the file at PATH (module `me`; "" for tests and
    benchmarks, whose every use is outside the module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found, bound = [], {}
    for target, name, line in imports(tree, me or "tests.x"):
        if name is not None and name.startswith("_") and not name.startswith("__") and target != me:
            found.append(f"{path.relative_to(ROOT)}:{line}: {target}.{name}")
    for node in ast.walk(tree):              # names bound to quantkit modules
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in MODULES and a.asname:
                    bound[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom):
            mod = resolve_from(node, me or "tests.x")
            for a in node.names:
                if f"{mod}.{a.name}" in MODULES:
                    bound[a.asname or a.name] = f"{mod}.{a.name}"

    def module_of(expr: ast.expr) -> str | None:
        if isinstance(expr, ast.Name):
            return bound.get(expr.id) or (PKG if expr.id == PKG else None)
        if isinstance(expr, ast.Attribute):
            base = module_of(expr.value)
            return f"{base}.{expr.attr}" if base and f"{base}.{expr.attr}" in MODULES else None
        return None

    for node in ast.walk(tree):
        mod, attr = None, None
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            mod, attr = module_of(node.value), node.attr
        elif (isinstance(node, ast.Call) and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
              and isinstance(node.args[1].value, str) and node.args[1].value.startswith("_")
              and not node.args[1].value.startswith("__")
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("setattr", "getattr", "delattr")):
            mod, attr = module_of(node.args[0]), node.args[1].value
        if mod and mod != me:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {mod}.{attr}")
    return found


def test_no_private_name_outside_its_module():
    found = []
    for me, path in MODULES.items():
        found += private_uses(path, me)
    for folder in ("tests", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            found += private_uses(path, "")
    assert not found, "private names used outside their module:\n" + "\n".join(found)


def test_tests_mirror_the_source_and_import_no_other_test():
    """tests/ mirrors src/quantkit (a test folder per package, named like it); shared pieces live
    in tests/helpers or conftest, never in another test module."""
    tests = ROOT / "tests"
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    folders = {p.name for p in tests.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))}
    assert folders - {"helpers"} <= packages, folders - packages
    found = []
    for path in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names
                      if n.split(".")[0].startswith(("test_", "conftest"))]
    assert not found, "test modules importing other test modules:\n" + "\n".join(found)


# ------------------------------------------------------------------------------- the checker itself
def test_checker_sees_what_it_must(tmp_path):
    """The rules above catch what they claim: a function-level upward import, a relative
    `from . import _x`, an attribute on an imported module, monkeypatch.setattr by string."""
    src = ("def f():\n    from ..api import demo\n    from .cache import _marker\n"
           "    from quantkit.distill import trainer\n    trainer._x = 1\n"
           "    monkeypatch.setattr(trainer, '_y', 2)\n")
    p = tmp_path / "mod.py"
    p.write_text(src, encoding="utf-8")
    tree = ast.parse(src)
    got = {(t, n) for t, n, _ in imports(tree, "quantkit.eval.fake")}
    assert ("quantkit.api", "demo") in got and ("quantkit.distill.trainer", None) in got
    assert FLOOR[floor_of("quantkit.api")] > FLOOR[floor_of("quantkit.eval.fake")]
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        uses = private_uses(p, "quantkit.eval.fake")
    finally:
        ROOT = saved
    assert sorted(u.split(": ", 1)[1] for u in uses) == ["quantkit.distill.trainer._x", "quantkit.distill.trainer._y",
                                                         "quantkit.eval.cache._marker"], uses
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# ------------------------------------------------------------------------------- sizes
MAX_FILE_LINES, MAX_FUNCTION_LINES = 600, 80


def test_no_long_files_or_functions():
    """No source file over 600 lines; no function over 80 lines unless a comment on its `def`
    line or the line above says why."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        if len(lines) > MAX_FILE_LINES:
            found.append(f"{path.relative_to(ROOT)}: {len(lines)} lines")
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                said = "#" in lines[node.lineno - 1] or lines[node.lineno - 2].lstrip().startswith("#")
                if n > MAX_FUNCTION_LINES and not said:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.name} is {n} lines")
    assert not found, "\n".join(found)
