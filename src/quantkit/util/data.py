"""The data shipped inside the package (quantkit/data, see its README for sources and licenses)."""

from __future__ import annotations

import os

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


def data_file(relpath: str, env: str | None = None) -> str:
    """The path of a shipped file, e.g. data_file("wikitext-2/test.txt"); `env` names an
    environment variable that, when set, is used instead (a user's own default)."""
    if env and os.environ.get(env):
        return os.environ[env]
    return os.path.join(DATA_DIR, *relpath.split("/"))
