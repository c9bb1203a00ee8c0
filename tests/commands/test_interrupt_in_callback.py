"""Ctrl-C that arrives while Python runs a callback it cannot raise from (a weakref callback such
as an import lock's, a __del__) is delivered again from ordinary code: never printed as
"Exception ignored" and lost, so the run still unwinds and removes its temporaries."""

import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[2] / "src")

SNIPPET = """
import os, signal, sys, time, weakref
sys.path.insert(0, %r)
from quantkit import cli
cli.install_interrupt_handlers()
class A: pass
a = A()
def cb(_):
    os.kill(os.getpid(), signal.SIGINT)      # the signal arrives while the callback runs
    for _ in range(1000): pass
r = weakref.ref(a, cb)
try:
    del a
    t0 = time.time()
    while time.time() - t0 < 5: pass
    print("lost")
except KeyboardInterrupt:
    print("delivered")
""" % SRC


def test_interrupt_inside_a_callback_is_delivered_again():
    p = subprocess.run([sys.executable, "-c", SNIPPET], capture_output=True, text=True, timeout=60)
    assert p.stdout.strip() == "delivered", (p.stdout, p.stderr)
    assert "Exception ignored" not in p.stderr and "Traceback" not in p.stderr, p.stderr
