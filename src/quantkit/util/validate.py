"""Typed, ranged checks for values a user gives: flags, config files, config.json.

Each check takes the value as it came (a command-line string, a YAML/JSON scalar) and the name
the user knows it by ("--ctx", "option 'ctx'", "rope_theta"), returns the value converted, or
raises QuantkitError naming it, saying what is wrong and what to give instead. Echoed values are
cut to ECHO_LIMIT characters, so a huge or nested value cannot blow the one-line message up.

`arg(check, ...)` makes any check an argparse `type=`: argparse then prefixes the flag
("argument --ctx: 0 is out of range (give an integer from 8 to 16,777,216)").
"""

from __future__ import annotations

import argparse
import math
import os
import re
import reprlib
from typing import Any, Callable, Iterable

from .errors import QuantkitError, clip

ECHO_LIMIT = 300               # characters of user data any message echoes
MAX_NUMBER_TEXT = 40           # longer numerals are refused before they are parsed
MAX_PATH = 4096                # PATH_MAX on Linux

_INT = re.compile(r"[+-]?\d+")
_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxlist, _repr.maxdict, _repr.maxtuple, _repr.maxset = 3, 8, 8, 8, 8
_repr.maxstring, _repr.maxother, _repr.maxlong = ECHO_LIMIT, ECHO_LIMIT, ECHO_LIMIT


def echo(value: Any, limit: int = ECHO_LIMIT) -> str:
    """A value as a message shows it: strings quoted, anything else by a repr that walks at most
    a few levels and items (never the whole of a huge or self-referencing structure), at most
    `limit` characters, on one line."""
    try:
        text = _repr.repr(value)
    except Exception:                           # a repr that fails: its type is enough
        text = f"<{type(value).__name__}>"
    return clip(text, limit)


def kind(value: Any) -> str:
    """What a value is, in words: "a list", "a string", "true"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "a mapping",
            tuple: "a list"}.get(type(value), f"a {type(value).__name__}")


def fail(name: str, value: Any, problem: str, hint: str | None = None, path: str | None = None):
    """Raise the one-line error for `name` = `value`: "NAME VALUE PROBLEM (HINT)" ("NAME PROBLEM"
    for a value of None: absent, or JSON/YAML null)."""
    subject = name if (name and value is None) else f"{name} {echo(value)}" if name else echo(value)
    err = QuantkitError(f"{subject} {problem}", path, hint)
    err.problem = problem
    raise err


def _range_hint(lo, hi, what: str) -> str:
    f = (lambda x: f"{x:,}") if what == "an integer" else (lambda x: f"{x:g}")
    if lo is not None and hi is not None:
        return f"give {what} from {f(lo)} to {f(hi)}"
    if lo is not None:
        return f"give {what} of at least {f(lo)}"
    if hi is not None:
        return f"give {what} of at most {f(hi)}"
    return f"give {what}"


def as_int(value: Any, name: str = "", lo: int | None = None, hi: int | None = None, *,
           path: str | None = None, hint: str | None = None) -> int:
    """An integer in [lo, hi]: an int, a whole finite float (128.0) or a decimal numeral of at
    most MAX_NUMBER_TEXT characters; never true/false."""
    hint = hint or _range_hint(lo, hi, "an integer")
    if isinstance(value, bool):
        fail(name, value, "is not an integer", hint, path)
    if isinstance(value, int):
        n = value
    elif isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            fail(name, value, "is not a whole number", hint, path)
        n = int(value)
    elif isinstance(value, str):
        s = value.strip()
        if len(s) > MAX_NUMBER_TEXT:
            fail(name, value, f"is too long for a number ({len(s):,} characters)", hint, path)
        if not _INT.fullmatch(s):
            fail(name, value, "is not an integer", hint, path)
        n = int(s)
    else:
        fail(name, value, f"is {kind(value)}, not an integer", hint, path)
    if (lo is not None and n < lo) or (hi is not None and n > hi):
        fail(name, n, "is out of range", hint, path)
    return n


def positive_int(value: Any, name: str = "", hi: int | None = None, **kw) -> int:
    return as_int(value, name, 1, hi, **kw)


def as_float(value: Any, name: str = "", lo: float | None = None, hi: float | None = None, *,
             lo_open: bool = False, path: str | None = None, hint: str | None = None) -> float:
    """A finite number in [lo, hi] ((lo, hi] with lo_open): an int, a float or a numeral; never
    true/false, NaN or infinity."""
    what = "a number above" if lo_open else "a number"
    hint = hint or (f"give a number above {lo:g}" + (f" and at most {hi:g}" if hi is not None else "")
                    if lo_open else _range_hint(lo, hi, what))
    if isinstance(value, bool):
        fail(name, value, "is not a number", hint, path)
    if isinstance(value, (int, float)):
        try:
            x = float(value)
        except OverflowError:
            fail(name, value, "is too large", hint, path)
    elif isinstance(value, str):
        s = value.strip()
        if len(s) > MAX_NUMBER_TEXT:
            fail(name, value, f"is too long for a number ({len(s):,} characters)", hint, path)
        try:
            x = float(s)
        except ValueError:
            fail(name, value, "is not a number", hint, path)
    else:
        fail(name, value, f"is {kind(value)}, not a number", hint, path)
    if not math.isfinite(x):
        fail(name, value, "is not a finite number", hint, path)
    if (lo is not None and (x <= lo if lo_open else x < lo)) or (hi is not None and x > hi):
        fail(name, x, "is out of range", hint, path)
    return x


def positive_float(value: Any, name: str = "", hi: float | None = None, **kw) -> float:
    return as_float(value, name, 0.0, hi, lo_open=True, **kw)


def fraction(value: Any, name: str = "", **kw) -> float:
    """A number from 0 to 1."""
    return as_float(value, name, 0.0, 1.0, hint=kw.pop("hint", None) or "give a fraction from 0 to 1", **kw)


def one_of(value: Any, name: str = "", choices: Iterable[Any] = (), *, path: str | None = None) -> Any:
    """One of `choices` (strings compared as given)."""
    choices = list(choices)
    if isinstance(value, bool) or not any(value == c and type(value) is type(c) for c in choices):
        fail(name, value, "is not one of the choices", "one of: " + ", ".join(map(str, choices)), path)
    return value


def as_str(value: Any, name: str = "", *, max_len: int = MAX_PATH, empty: bool = False,
           path: str | None = None, hint: str | None = None) -> str:
    """A string of at most `max_len` characters (and not empty unless `empty`), no NUL byte."""
    if not isinstance(value, str):
        fail(name, value, f"is {kind(value)}, not a string", hint or "give a string", path)
    if len(value) > max_len:
        fail(name, value, f"is too long ({len(value):,} characters, at most {max_len:,})", hint, path)
    if not empty and not value.strip():
        fail(name, value, "is empty", hint, path)
    if "\0" in value:
        fail(name, value, "holds a NUL character", hint, path)
    return value


def as_path(value: Any, name: str = "", *, exists: str | None = None, path: str | None = None) -> str:
    """A path string; `exists`: "any" (file or directory), "file" or "dir" must be there."""
    p = os.fspath(value) if isinstance(value, os.PathLike) else value
    p = as_str(p, name, max_len=MAX_PATH, path=path, hint="give a file or directory path")
    if exists is None:
        return p
    if not os.path.exists(p):
        fail(name, p, "does not exist", "check the path", path)
    if exists == "file" and not os.path.isfile(p):
        fail(name, p, "is not a file", "give a file, not a directory", path)
    if exists == "dir" and not os.path.isdir(p):
        fail(name, p, "is not a directory", "give a directory", path)
    return p


def arg(check: Callable[..., Any], *args: Any, **kw: Any) -> Callable[[str], Any]:
    """`check` as an argparse type: argparse names the flag, this says what is wrong and what to
    give. `args`/`kw` follow the check's value and name (as_int: lo, hi; one_of: choices)."""
    def parse(text):
        try:
            return check(text, "", *args, **kw)
        except QuantkitError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = check.__name__
    parse.check = lambda value: check(value, "", *args, **kw)     # for values from a config file
    return parse


def int_arg(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer in [lo, hi]."""
    return arg(as_int, lo, hi)


def float_arg(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Callable[[str], float]:
    """argparse type: a finite number in [lo, hi] ((lo, hi] with lo_open)."""
    return arg(as_float, lo, hi, lo_open=lo_open)


def str_arg(max_len: int = MAX_PATH, empty: bool = False) -> Callable[[str], str]:
    """argparse type: a string of at most `max_len` characters (non-empty unless `empty`)."""
    return arg(as_str, max_len=max_len, empty=empty)


def count_values(obj: Any, limit: int) -> int:
    """How many values a loaded YAML/JSON document holds once its aliases are expanded, counting
    up to `limit + 1` at most (so a billion-laughs document costs `limit` steps, not billions)."""
    n, stack = 0, [obj]
    while stack:
        x = stack.pop()
        n += 1
        if n > limit:
            return n
        if isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return n


__all__ = ["ECHO_LIMIT", "echo", "kind", "fail", "as_int", "positive_int", "as_float", "positive_float", "fraction",
           "one_of", "as_str", "as_path", "arg", "int_arg", "float_arg", "str_arg", "count_values"]
