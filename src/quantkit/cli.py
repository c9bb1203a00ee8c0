"""The `quantkit` command: parse, call the Python API, print.

Each subcommand lives in quantkit/commands/<name>.py with `register(subparsers)`, which adds
its parser and sets `func(args) -> int`. A QuantkitError (or an OSError no check foresaw) becomes
one line on stderr and exit 2; Ctrl-C or SIGTERM exits 130 (outputs are atomic, so nothing
half-written is left), quietly however often it is pressed.
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
    "imatrix",
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


def _ignore_further_interrupts() -> None:
    """After the first Ctrl-C (or SIGTERM) the run is unwinding: temporaries are being removed
    and, at exit, torch's and the other libraries' exit handlers run. A second Ctrl-C there
    would print a traceback from whichever handler it lands in, or leave a temporary behind, so
    further SIGINT and SIGTERM are ignored until the process ends with 130."""
    import signal
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
    except ValueError:        # not the main thread
        pass


def install_interrupt_handlers() -> None:
    """`kill` (SIGTERM) unwinds like Ctrl-C, so temporary outputs are removed on the way out.
    SIGINT gets this handler even where the shell started us with it ignored (a background
    job of a non-interactive shell), so `kill -INT` always cleans up too. The first signal
    raises KeyboardInterrupt; later ones are ignored (_ignore_further_interrupts)."""
    import signal

    def handler(signum, frame):
        _ignore_further_interrupts()
        raise KeyboardInterrupt

    previous_hook = sys.unraisablehook

    def unraisable(u) -> None:
        # The interrupt landed where Python cannot raise (a weakref callback such as an import
        # lock's, a __del__): printed as "Exception ignored", it would be lost. A timer delivers
        # it again 10 ms later, from ordinary code.
        if isinstance(u.exc_value, KeyboardInterrupt):
            signal.signal(signal.SIGALRM, handler)
            signal.setitimer(signal.ITIMER_REAL, 0.01)
            return
        previous_hook(u)

    try:
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
    except ValueError:        # not the main thread (an embedding application): leave it alone
        return
    sys.unraisablehook = unraisable


def _quiet_libraries() -> None:
    """Quiet means quiet: Hugging Face's own bars too ("Loading weights", "Writing model
    shards"), so stderr holds nothing but quantkit's lines."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


_OUTPUT_DESTS = ("output", "report", "out_dir", "ladder_dir", "checkpoint_dir")


def _refuse_special_inputs(args) -> None:
    """A FIFO, a device or a socket given where a file is read would block the run or feed it
    endless bytes: every path-valued option that names one is refused up front, in one line.
    (Outputs get the same refusal, with their own wording, from util.atomic.check_output.)"""
    import stat
    for dest, value in vars(args).items():
        if dest.startswith("_") or dest in _OUTPUT_DESTS:
            continue
        for v in (value if isinstance(value, list) else [value]):
            if not isinstance(v, str) or not v or "\0" in v:
                continue
            try:
                mode = os.stat(v.removeprefix("torch:")).st_mode
            except (OSError, ValueError):
                continue
            if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
                continue
            kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                    else "a device")
            flag = "MODEL" if dest in ("model", "models") else "--" + dest.replace("_", "-")
            raise QuantkitError(f"{flag} is {kind}, not a regular file; quantkit reads models, texts and configs "
                                "from files", v, "give a regular file: copy the stream to a file first")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "quiet", False):
        os.environ["QUANTKIT_QUIET"] = "1"
    if os.environ.get("QUANTKIT_QUIET", "") not in ("", "0"):
        _quiet_libraries()
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    install_interrupt_handlers()
    try:
        _refuse_special_inputs(args)
        return int(args.func(args) or 0)
    except QuantkitError as e:
        print(f"quantkit {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        _ignore_further_interrupts()
        print(f"quantkit {args.command}: interrupted; no partial output was left", file=sys.stderr, flush=True)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:            # a system error no check foresaw (permissions, a full disk): one line
        where = f"{e.filename}: " if e.filename else ""
        print(f"quantkit {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
