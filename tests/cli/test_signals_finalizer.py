"""A start-up signal that lands inside a finalizer, where Python drops exceptions, still stops the command."""

from __future__ import annotations

import subprocess
import sys

_CHILD = """
import gc, os, signal, sys, time
from fastpeft.app import cli

class Dies:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)  # delivered while this finalizer runs
        time.sleep(0.05)

try:
    with cli._signals_unwind() as received:
        obj = Dies()
        del obj
        gc.collect()
        time.sleep(2.0)  # the re-delivery raises here, outside the finalizer
except cli._Stopped as e:
    print("stopped", e.signum, received)
    sys.exit(0)
print("not stopped")
sys.exit(1)
"""


def test_a_signal_landing_in_a_finalizer_is_delivered_again():
    # a fresh interpreter: default signal dispositions, nothing left by other tests
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.split()[:2] == ["stopped", "15"], (out.stdout, out.stderr[-2000:])
