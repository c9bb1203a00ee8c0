"""Text data files: labelled examples (`label<TAB>text`) and unlabelled sentences, and a seeded
subset of them."""

from __future__ import annotations

from .errors import QuantkitError, require_file


def read_labelled(path: str, labels: list[str] | None = None) -> tuple[list[str], list[str]]:
    """`label<TAB>text` lines (a first line `label<TAB>sentence` is a header). Returns
    (texts, labels); with `labels` given, any other label is an error naming its line."""
    require_file(path, "labels file")
    texts, ys = [], []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = f.read().splitlines()
        except UnicodeDecodeError as e:
            raise QuantkitError(f"not UTF-8 text ({e.reason} at byte {e.start})", path) from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if n == 1 and parts[0].strip().lower() == "label":
            continue
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise QuantkitError(f"line {n}: expected 'label<TAB>text', got {line[:60]!r}", path)
        y = parts[0].strip()
        if labels is not None and y not in labels:
            raise QuantkitError(f"line {n}: unknown label {y!r} (the model's labels are {', '.join(labels)})", path)
        texts.append(parts[1].strip())
        ys.append(y)
    if not texts:
        raise QuantkitError("no examples", path)
    return texts, ys


def read_text(path: str, min_words: int = 5, max_words: int = 64) -> list[str]:
    """Unlabelled sentences: one per non-empty line, headings (`= x =`) skipped, capped."""
    require_file(path, "text file")
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                w = line.split()
                if len(w) >= min_words and not (w[0] == "=" and w[-1] == "="):
                    out.append(" ".join(w[:max_words]))
    except UnicodeDecodeError as e:
        raise QuantkitError(f"not UTF-8 text ({e.reason})", path) from None
    if not out:
        raise QuantkitError(f"no lines of {min_words}+ words", path)
    return out


def sample_indices(n: int, limit: int | None, seed: int) -> list[int]:
    """Sorted indices of a seeded random subset of `limit` of range(n) (all of them without a limit)."""
    import torch
    idx = list(range(n))
    if limit is not None and limit < n:
        g = torch.Generator().manual_seed(seed)
        idx = sorted(torch.randperm(n, generator=g)[:limit].tolist())
    return idx
