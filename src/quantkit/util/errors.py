"""User-facing errors.

Anything a user can cause (bad path, bad file, bad option) raises `QuantkitError` with one line
that names the file, says what is wrong and what to do. The CLI prints that line and exits
non-zero without a traceback; the Python API lets it propagate.
"""

from __future__ import annotations

import os


class QuantkitError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2

    def __init__(self, message: str, path: str | os.PathLike | None = None, hint: str | None = None):
        self.path = os.fspath(path) if path is not None else None
        self.hint = hint
        parts = []
        if self.path is not None:
            parts.append(f"{self.path}: ")
        parts.append(message)
        if hint:
            parts.append(f" ({hint})")
        super().__init__("".join(parts))


def require_file(path: str | os.PathLike, what: str = "file") -> str:
    p = os.fspath(path)
    if not os.path.exists(p):
        raise QuantkitError(f"no such {what}", p, "check the path")
    return p
