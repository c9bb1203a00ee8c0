"""Outputs appear under their final name only when complete.

`atomic_output(path)` yields a temporary path in the same directory; on success the file (or
directory) is renamed over `path`; on any exception, KeyboardInterrupt included, the temporary
is removed. A full disk (ENOSPC) becomes a one-line QuantkitError.

A directory output replaces an existing directory only if that one is empty or was written by
quantkit (it holds MARKER): `-o .` or `-o` naming the source model's own folder must never
delete someone's files.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from typing import Iterator

from .errors import QuantkitError

MARKER = ".quantkit-output"     # in every directory quantkit writes: it may be replaced by the next run
_MARKER_TEXT = "written by quantkit; a later quantkit run writing to this directory replaces it whole\n"


def check_writable_dir(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(parent):
        what = "is not a directory" if os.path.exists(parent) else "does not exist"
        raise QuantkitError(f"output directory {what}", parent, "create it first or choose another -o")
    if not os.access(parent, os.W_OK):
        raise QuantkitError("output directory is not writable", parent, "choose another -o")


def disk_full(e: OSError, path: str) -> QuantkitError | None:
    """The one-line error for a full disk (or quota, or file size limit), else None."""
    if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return QuantkitError(f"out of space while writing ({os.strerror(e.errno)}); no partial file was left",
                             path, "free space or write elsewhere")
    return None


def _check_replaceable_dir(final: str) -> None:
    if os.path.exists(final) and not os.path.isdir(final):
        raise QuantkitError("output path is an existing file, and this output is a directory", final,
                            "choose a new directory name for -o")
    if os.path.isdir(final) and os.listdir(final) and not os.path.isfile(os.path.join(final, MARKER)):
        raise QuantkitError("output directory already holds files that quantkit did not write", final,
                            "choose a new -o, or empty that directory first: quantkit replaces its output whole")


def _remove(p: str) -> None:
    if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(p)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, directory: bool = False) -> Iterator[str]:
    final = os.path.abspath(os.fspath(path))
    check_writable_dir(final)
    if not directory and os.path.isdir(final):
        raise QuantkitError("output path is an existing directory", final, "give a file name, e.g. -o model.gguf")
    if directory:
        _check_replaceable_dir(final)
    base = os.path.basename(final)
    tmp = os.path.join(os.path.dirname(final), f".{base}.{uuid.uuid4().hex[:8]}.partial")
    if directory:
        os.mkdir(tmp)
    try:
        yield tmp
        if directory:
            with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
                f.write(_MARKER_TEXT)
    except OSError as e:
        _remove(tmp)
        err = disk_full(e, final)
        if err is not None:
            raise err from None
        raise
    except BaseException:
        _remove(tmp)
        raise
    try:
        if directory and os.path.isdir(final):
            _check_replaceable_dir(final)   # (it may have appeared while we worked)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise
