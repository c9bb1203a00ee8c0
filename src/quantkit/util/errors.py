"""User-facing errors.

Anything a user can cause (bad path, bad file, bad option) raises `QuantkitError` with one line
that names the file, says what is wrong and what to do. The CLI prints that line and exits
non-zero without a traceback; the Python API lets it propagate.

The line stays a line: line breaks and other control characters in it are escaped, a path is
cut to PATH_LIMIT characters, the message and hint to MESSAGE_LIMIT (with an ellipsis), so no
echoed value, however long, makes it explode.
"""

from __future__ import annotations

import os

PATH_LIMIT = 300        # characters of a path an error shows
MESSAGE_LIMIT = 1000    # characters of its message (fixed words plus at most ~300 of echoed data)

_CONTROL = {i: f"\\x{i:02x}" for i in range(32)} | {10: "\\n", 13: "\\r", 9: "\\t", 127: "\\x7f"}


def clip(text: str, limit: int) -> str:
    """`text` on one line (control characters escaped), at most `limit` characters: a longer one
    keeps its start and its last few characters around an ellipsis."""
    text = str(text).translate(_CONTROL)
    if len(text) <= limit:
        return text
    tail = min(20, limit // 4)
    return text[: limit - tail - 1] + "…" + text[len(text) - tail:]


class QuantkitError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2
    problem: str | None = None      # set by util.validate: what is wrong with the value, without its name

    def __init__(self, message: str, path: str | os.PathLike | None = None, hint: str | None = None):
        if path is not None:
            try:
                path = os.fspath(path)
            except TypeError:            # not a path at all (a value from a config file): show it
                path = repr(path)
        self.path = path
        self.hint = hint
        parts = []
        if self.path is not None:
            parts.append(f"{clip(self.path, PATH_LIMIT)}: ")
        parts.append(clip(message, MESSAGE_LIMIT))
        if hint:
            parts.append(f" ({clip(hint, MESSAGE_LIMIT)})")
        super().__init__("".join(parts))


def require_file(path: str | os.PathLike, what: str = "file") -> str:
    p = os.fspath(path)
    if not os.path.exists(p):
        raise QuantkitError(f"no such {what}", p, "check the path")
    return p
