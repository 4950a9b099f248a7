"""SIGINT/SIGTERM as a stop request: the first signal is kept, nested listeners share it, and a
wait for the next item is cut short. The whole runs that stop are in test_resume.py."""

import os
import signal
import threading
import time

import pytest

from deit.signals import Interrupted, Stop, StopSignals


def test_the_first_signal_is_kept_and_shared_by_nested_listeners():
    before = signal.getsignal(signal.SIGINT)
    outer = StopSignals()
    try:
        inner = StopSignals()  # a phase inside the run: no handlers of its own
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal does not replace the first
        inner.restore()
        assert outer.requested == signal.SIGINT and inner.requested == signal.SIGINT
        # A listener opened after the signal (the next phase) still sees it.
        later = StopSignals()
        assert later.requested == signal.SIGINT
        later.restore()
    finally:
        outer.restore()
    assert signal.getsignal(signal.SIGINT) is before


def test_a_signal_cuts_a_blocking_wait_short():
    never = threading.Event()

    def blocked():
        yield 1
        never.wait()  # a data worker that will not deliver
        yield 2

    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
    with StopSignals() as stop:
        items = stop.batches(blocked())
        assert next(items) == 1
        start = time.monotonic()
        timer.start()
        with pytest.raises(Stop):
            next(items)
        assert time.monotonic() - start < 2
        assert stop.requested == signal.SIGINT


def test_the_message_names_the_folder_to_resume(tmp_path):
    stop = Interrupted(signal.SIGTERM, "teacher training, epoch 1", step=4, output=tmp_path)
    stop.run_output, stop.resume = tmp_path, None
    assert str(stop) == (
        f"stopped by SIGTERM after step 4 (teacher training, epoch 1); nothing in {tmp_path} is "
        "saved yet: start the run again"
    )
