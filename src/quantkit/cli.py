"""The `quantkit` command: parse, call the Python API, print.

Each subcommand lives in quantkit/commands/<name>.py with `register(subparsers)`, which adds
its parser and sets `func(args) -> int`. A QuantkitError (or an OSError no check foresaw) becomes
one line on stderr and exit 2; Ctrl-C or SIGTERM exits 130 (outputs are atomic, so nothing
half-written is left).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import __version__
from .util.errors import QuantkitError

# Order is the order shown in --help.
COMMANDS = [
    "inspect",
    "quantize",
    "demo",
    "eval",
    "plan",
    "explain",
    "distill",
]


class _Parser(argparse.ArgumentParser):
    """A usage mistake is one line (what is wrong, where to look), not argparse's usage block."""

    def error(self, message: str):
        from .util.errors import clip       # argparse echoes a bad value whole: keep ~300 characters of it
        self.exit(2, f"{self.prog}: error: {clip(message, 600)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="quantkit",
        description="Fit language models to the hardware you have: inspect, quantize, evaluate, plan.",
    )
    parser.add_argument("--version", action="version", version=f"quantkit {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"quantkit.commands.{name}").register(sub)
    return parser


def _terminate_as_interrupt() -> None:
    """`kill` (SIGTERM) unwinds like Ctrl-C, so temporary outputs are removed on the way out.
    SIGINT gets Python's handler even where the shell started us with it ignored (a background
    job of a non-interactive shell), so `kill -INT` always cleans up too."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    except ValueError:        # not the main thread (an embedding application): leave it alone
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "quiet", False):
        os.environ["QUANTKIT_QUIET"] = "1"
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    _terminate_as_interrupt()
    try:
        return int(args.func(args) or 0)
    except QuantkitError as e:
        print(f"quantkit {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"quantkit {args.command}: interrupted; no partial output was left", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:            # a system error no check foresaw (permissions, a full disk): one line
        where = f"{e.filename}: " if e.filename else ""
        print(f"quantkit {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
