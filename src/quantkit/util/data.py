"""Where the development data lives: $QUANTKIT_DATA, else ../shared/data beside a checkout."""

from __future__ import annotations

import os


def shared_data_file(relpath: str, env: str | None = None) -> str | None:
    """The path of `relpath` (e.g. "wikitext-2/test.txt") under $QUANTKIT_DATA or the
    shared/data folder next to a development checkout (<repo>/../shared/data); `env` names an
    environment variable that, when set, is the file itself. None when nothing is found."""
    if env and os.environ.get(env):
        return os.environ[env]
    here = os.path.dirname(os.path.abspath(__file__))          # <repo>/src/quantkit/util
    repo = os.path.dirname(os.path.dirname(os.path.dirname(here)))
    for root in (os.environ.get("QUANTKIT_DATA", ""), os.path.join(os.path.dirname(repo), "shared", "data")):
        cand = os.path.join(root, relpath)
        if root and os.path.isfile(cand):
            return cand
    return None
