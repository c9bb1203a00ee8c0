"""Outputs appear under their final name only when complete.

`atomic_output(path)` yields a temporary path in the same directory; on success the file (or
directory) is renamed over `path`; on any exception, KeyboardInterrupt included, the temporary
is removed. A full disk (ENOSPC) becomes a one-line QuantkitError.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from typing import Iterator

from .errors import QuantkitError


def check_writable_dir(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(parent):
        what = "is not a directory" if os.path.exists(parent) else "does not exist"
        raise QuantkitError(f"output directory {what}", parent, "create it first or choose another -o")
    if not os.access(parent, os.W_OK):
        raise QuantkitError("output directory is not writable", parent, "choose another -o")


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
    base = os.path.basename(final)
    tmp = os.path.join(os.path.dirname(final), f".{base}.{uuid.uuid4().hex[:8]}.partial")
    if directory:
        os.mkdir(tmp)
    try:
        yield tmp
    except OSError as e:
        _remove(tmp)
        if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise QuantkitError(f"out of space while writing ({os.strerror(e.errno)}); no partial file was left",
                                final, "free space or write elsewhere") from None
        raise
    except BaseException:
        _remove(tmp)
        raise
    if directory and os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
