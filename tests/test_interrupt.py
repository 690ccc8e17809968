"""Ctrl-C during a search, with real signals: the first asks Tune to stop, a second exits."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

SECOND_CTRL_C = """
import os, signal, sys, time
from distmed.search import StopOnCtrlC

asked = []
signal.signal(signal.SIGUSR1, lambda *a: asked.append(1))  # stands in for Tune's own handler
with StopOnCtrlC(on_exit="continue the search with: RESUME") as ctrl_c:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.5)
    print("first:", ctrl_c.interrupted, len(asked), flush=True)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(30)  # a wait that the second Ctrl-C must cut short
print("not reached", flush=True)
"""


@pytest.mark.serial  # a bound on the wall time (the second Ctrl-C cuts the wait short)
def test_first_ctrl_c_asks_tune_to_stop_and_a_second_exits_at_once():
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", SECOND_CTRL_C], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 130, done.stderr
    assert time.monotonic() - started < 20
    assert "first: True 1" in done.stdout and "not reached" not in done.stdout
    assert "Ctrl-C again to exit at once" in done.stderr
    assert "continue the search with: RESUME" in done.stderr
