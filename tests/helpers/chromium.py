"""Headless Chromium (Debian's package), to read a page as a person would."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


# Not a skip: `make test` installs Debian's chromium; without it the report is untested, a failure.
needs_chromium = pytest.mark.usefixtures("chromium_present")


def run_chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"
    profile.mkdir(exist_ok=True)
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--no-first-run", "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def rendered_points(html_path: str | Path, tmp_path: Path) -> list[dict[str, str]]:
    """The chart's points in the DOM Chromium built: one dict of attributes per circle.point."""
    proc = run_chromium(tmp_path, "--dump-dom", Path(html_path).resolve().as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]

    class Points(HTMLParser):
        def __init__(self):
            super().__init__()
            self.found: list[dict[str, str]] = []

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "circle" and "point" in (a.get("class") or "").split():
                self.found.append(a)

    p = Points()
    p.feed(proc.stdout)
    return p.found
