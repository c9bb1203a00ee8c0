"""`quantkit eval`'s disk cache: where it lives, the memoised model digests that key it, and its
size cap, oldest first.

What it holds (under $QUANTKIT_CACHE/eval, default ~/.cache/quantkit/eval): the reference's
log-probabilities, one .npy per chunk keyed by model hash + runtime + token ids (255 x 262144 x 4 B
= 267 MB a chunk for Gemma-3 at n_ctx 512, so 2.1 GB for the default 8 chunks), and the F32
dequantizations made as default references (refs/, 1.08 GB for Gemma-3-270M). Both are re-made
on demand, so they are pruned: after every run, files are deleted least recently used first
until the total is at most the cap. A run touches the files it uses, so its own files go last.

The cap: `quantkit eval --cache-max SIZE`, else $QUANTKIT_EVAL_CACHE_MAX, else 4 GiB (two
default-sized Gemma-3 runs plus a reference). SIZE is bytes or a number with K, M, G or T
(powers of 1024, an optional trailing B or iB); 0 keeps nothing (the same as --no-cache).
Files being written (atomic_output's hidden .partial names) are never counted or deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

from ..util.atomic import atomic_output
from ..util.errors import QuantkitError

ENV = "QUANTKIT_EVAL_CACHE_MAX"
DEFAULT_MAX_BYTES = 4 << 30
PRUNED_DIRS = ("logprobs", "refs")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def cache_root() -> str:
    """$QUANTKIT_CACHE/eval (default ~/.cache/quantkit/eval), made if missing."""
    from ..models.bundled import cache_dir
    d = os.path.join(cache_dir(), "eval")
    os.makedirs(d, exist_ok=True)
    return d


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def model_digest(path: str) -> str:
    """SHA-256 of a model file (or of a directory's files), memoised by path, size and mtime so
    a 1 GB reference is hashed once, not on every run."""
    path = os.path.realpath(path)
    files = ([os.path.join(path, n) for n in sorted(os.listdir(path)) if os.path.isfile(os.path.join(path, n))]
             if os.path.isdir(path) else [path])
    memo_path = os.path.join(cache_root(), "digests.json")
    try:
        with open(memo_path) as f:
            memo = json.load(f)
    except (OSError, ValueError):
        memo = {}
    h = hashlib.sha256()
    changed = False
    digests = []
    for p in files:
        st = os.stat(p)
        key = f"{p}:{st.st_size}:{st.st_mtime_ns}"
        if key not in memo:
            memo[key] = sha256_file(p)
            changed = True
        digests.append(memo[key])
        h.update(os.path.basename(p).encode() + b"\0" + memo[key].encode())
    if changed:
        try:
            with atomic_output(memo_path) as tmp, open(tmp, "w") as f:
                json.dump(memo, f)
        except (OSError, QuantkitError):
            pass  # a read-only cache only costs re-hashing
    return h.hexdigest() if os.path.isdir(path) else digests[0]


def parse_size(text: str, where: str = "cache size") -> int:
    """'4G', '500M', '1.5GiB', '123' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]?)(?:I?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise QuantkitError(f"{where} {text!r}: give bytes or a number with K, M, G or T (e.g. 4G, 500M, 0)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def max_bytes(option: int | str | None = None) -> int:
    """The cap in force: the option, else $QUANTKIT_EVAL_CACHE_MAX, else DEFAULT_MAX_BYTES."""
    if option is not None:
        return option if isinstance(option, int) else parse_size(option, "--cache-max")
    env = os.environ.get(ENV)
    if env:
        return parse_size(env, f"${ENV}")
    return DEFAULT_MAX_BYTES


def cached_files(root: str) -> list[tuple[float, int, str]]:
    """(last use, bytes, path) of every prunable file under root, oldest first."""
    out = []
    for sub in PRUNED_DIRS:
        for dirpath, _dirs, names in os.walk(os.path.join(root, sub)):
            for n in names:
                if n.startswith("."):
                    continue  # a file another run is writing
                p = os.path.join(dirpath, n)
                try:
                    st = os.stat(p)
                except FileNotFoundError:
                    continue
                used = st.st_mtime
                try:
                    used = max(used, os.stat(_marker(p)).st_mtime)
                except OSError:
                    pass
                out.append((used, st.st_size, p))
    out.sort()
    return out


def _marker(path: str) -> str:
    return os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".used")


def touch(path: str, keep_mtime: bool = False) -> None:
    """Mark a cached file as just used: its modification time, or (keep_mtime: a model file,
    whose mtime keys the memoised SHA-256) a hidden marker file's beside it."""
    try:
        if keep_mtime:
            with open(_marker(path), "a"):
                pass
            os.utime(_marker(path))
        else:
            os.utime(path)
    except OSError:
        pass


def prune(root: str, limit: int) -> dict[str, int]:
    """Delete the least recently used files until at most `limit` bytes remain. Returns the
    bytes and files removed and the bytes kept."""
    files = cached_files(root)
    total = sum(s for _, s, _ in files)
    removed = n = 0
    for _, size, p in files:
        if total - removed <= limit:
            break
        try:
            os.remove(p)
        except FileNotFoundError:
            continue
        except OSError:
            continue  # read-only cache: leave it
        removed += size
        n += 1
        try:
            os.remove(_marker(p))
        except OSError:
            pass
        d = os.path.dirname(p)
        if os.path.basename(os.path.dirname(d)) == "refs":
            try:
                os.rmdir(d)  # refs/<digest>/ now empty
            except OSError:
                pass
    return {"removed_bytes": removed, "removed_files": n, "kept_bytes": total - removed, "limit_bytes": limit}
