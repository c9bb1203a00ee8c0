"""Running the CLI as a user would: one-line errors, interrupts, nothing left behind."""

import os
import signal
import subprocess
import sys
import time

from quantkit.cli import main


def run_cli(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, err


def assert_one_line(err: str, *needles: str):
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def interrupt_mid_run(args, watch, sig: str = "SIGINT", settle: float = 0.0, signals: int = 1) -> None:
    """`quantkit ARGS` in a child process, interrupted by `sig` once something appears in the
    folder `watch` (and `settle` seconds more): exit 130, an "interrupted" line and no
    traceback, and nothing left in `watch`. signals > 1: the first signal, then the others
    every 5 ms while the child cleans up and exits (an impatient user pressing Ctrl-C again)."""
    p = subprocess.Popen([sys.executable, "-c", f"import sys; from quantkit.cli import main; sys.exit(main({args!r}))"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not os.listdir(watch):
        time.sleep(0.02)
    assert os.listdir(watch), "the run never started writing"
    time.sleep(settle)
    p.send_signal(getattr(signal, sig))
    for _ in range(signals - 1):
        time.sleep(0.005)
        p.send_signal(getattr(signal, sig))     # (a no-op once the child has exited)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err and "Exception ignored" not in err, err
    assert os.listdir(watch) == []


def no_partial(d):
    return [f for f in os.listdir(d) if "partial" in f or f.endswith(".gguf")] == []
