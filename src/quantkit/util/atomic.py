"""Outputs appear under their final name only when complete.

`atomic_output(path)` yields a temporary path in the same directory; on success the file (or
directory) is renamed over `path`; on any exception, KeyboardInterrupt included, the temporary
is removed. A full disk (ENOSPC, EFBIG, EDQUOT) or any other I/O error, raised as an OSError or
as a library's own error type that carries the system's error (safetensors' SafetensorError
"... (os error 28)", tokenizers' Exception), becomes a one-line QuantkitError.

`check_output(path, inputs, directory)` refuses, before any work, an output that is one of the
inputs (the same file through a symlink, a hard link or another spelling; for a directory
output, one that is, holds or lies inside an input) and an existing output that is not what
will be written: a device node such as /dev/null, a FIFO, a socket, a directory where a file
belongs or a file where a directory belongs. `atomic_output` repeats the kind check, so no
writer ever renames a regular file over a device node.

A directory output replaces an existing directory only if that one is empty or was written by
quantkit (it holds MARKER): `-o .` or `-o` naming the source model's own folder must never
delete someone's files.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
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


_OS_ERROR = re.compile(r"os error (\d+)")
_SPACE_WORDS = {"No space left on device": errno.ENOSPC, "File too large": errno.EFBIG,
                "Disk quota exceeded": errno.EDQUOT}


def io_error(e: BaseException, path: str) -> QuantkitError | None:
    """The one-line error for a write that failed for want of space, whatever raised it (an
    OSError, or a library's own exception whose message carries the system's error: "(os error
    28)", "No space left on device"), or for any other system error a library raised under its
    own type. None otherwise: a plain OSError other than a full disk keeps its file name and is
    the CLI's one line."""
    if isinstance(e, OSError):
        return disk_full(e, path)
    text = str(e)
    m = _OS_ERROR.search(text)
    code = int(m.group(1)) if m else next((c for w, c in _SPACE_WORDS.items() if w in text), None)
    if code is None:
        return None
    full = disk_full(OSError(code, os.strerror(code)), path)
    if full is not None:
        return full
    first = (text.splitlines() or [""])[0][:200]
    return QuantkitError(f"I/O error while writing ({type(e).__name__}: {first}); no partial file was left", path,
                         "check the disk and the output folder, or write elsewhere")


_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISSOCK, "a socket"))


def _check_kind(final: str, directory: bool) -> None:
    """An existing output must be what will be written: a regular file, or a directory."""
    try:
        mode = os.stat(final).st_mode
    except FileNotFoundError:
        return                                   # (a dangling symlink is replaced like a missing file)
    except OSError as e:
        raise QuantkitError(f"cannot check the output path ({e.strerror})", final, "choose another -o") from None
    for test, what in _KINDS:
        if test(mode):
            raise QuantkitError(f"output path is {what}, not a regular file; quantkit will not replace it", final,
                                "give a new file name for -o")
    if not directory and stat.S_ISDIR(mode):
        raise QuantkitError("output path is an existing directory", final, "give a file name, e.g. -o model.gguf")
    if directory and not stat.S_ISDIR(mode):
        raise QuantkitError("output path is an existing file, and this output is a directory", final,
                            "choose a new directory name for -o")


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


# files of a model directory that an output written inside it must not replace
_MODEL_FILES = (".safetensors", ".bin", ".json", ".model", ".pt", ".pth", ".txt")


def check_output(path: str | os.PathLike, inputs=(), directory: bool = False, flag: str = "-o") -> str:
    """Refuse OUTPUT before any work if it is one of `inputs` (files or directories; None entries
    are skipped) or exists and is not what will be written (see the module's docstring).
    Returns the output's absolute path."""
    final = os.path.abspath(os.fspath(path))
    check_writable_dir(final)
    _check_kind(final, directory)
    real_out = os.path.realpath(final)
    for given in inputs:
        if given is None:
            continue
        src = os.fspath(given)
        if not os.path.exists(src):
            continue
        real_in = os.path.realpath(src)
        same = os.path.exists(final) and os.path.samefile(final, src)
        if same or real_out == real_in:
            raise QuantkitError(f"{flag} is the input {src}; quantkit never overwrites its input", final,
                                f"give {flag} a new name")
        if directory and (_inside(real_in, real_out) or (os.path.isdir(real_in) and _inside(real_out, real_in))):
            where = "holds" if _inside(real_in, real_out) else "lies inside"
            raise QuantkitError(f"the output directory {where} the input {src}", final,
                                f"give {flag} a directory apart from the input")
        if (not directory and os.path.isdir(real_in) and _inside(real_out, real_in) and os.path.exists(final)
                and final.lower().endswith(_MODEL_FILES)):
            raise QuantkitError(f"{flag} would replace a file of the input model directory {src}", final,
                                f"give {flag} a new name")
    return final


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
    _check_kind(final, directory)
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
    except (KeyboardInterrupt, SystemExit, QuantkitError):
        _remove(tmp)
        raise
    except BaseException as e:
        _remove(tmp)
        err = io_error(e, final)
        if err is not None:
            raise err from None
        raise
    try:
        _check_kind(final, directory)       # (something may have appeared there while we worked)
        if directory and os.path.isdir(final):
            _check_replaceable_dir(final)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as e:
        _remove(tmp)
        err = io_error(e, final)
        if err is not None:
            raise err from None
        raise
