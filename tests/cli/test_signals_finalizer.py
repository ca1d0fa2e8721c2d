"""A start-up signal that lands inside a finalizer, where Python drops exceptions, still stops the command."""

from __future__ import annotations

import gc
import os
import signal
import time

import pytest

from fastpeft import cli


def test_a_signal_landing_in_a_finalizer_is_delivered_again():
    class Dies:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGTERM)  # delivered while this finalizer runs
            time.sleep(0.05)

    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL), signal.signal(signal.SIGALRM, signal.SIG_DFL)
    try:
        with pytest.raises(cli._Stopped) as info, cli._signals_unwind() as received:
            obj = Dies()
            del obj
            gc.collect()
            time.sleep(1.0)  # the re-delivery raises here, outside the finalizer
        assert received == [signal.SIGTERM] and info.value.signum == signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGALRM, previous[1])
