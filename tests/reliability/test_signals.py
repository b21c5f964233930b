"""A second Ctrl-C stops at once: the first only asks the loop to stop after the current step.

The whole-run signal tests (test_runs.py) show the first signal's save and exit code; this pins
what a user does next when the save seems slow, without a process of its own: the handler is
called as the operating system would call it, through ``signal.raise_signal``.
"""

from __future__ import annotations

import signal

import pytest

from cnntrain.train.signals import StopRequest


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler (KeyboardInterrupt) beneath the one under test, whatever the runner set."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_the_first_ctrl_c_asks_to_stop_and_the_second_stops_at_once(python_sigint):
    with StopRequest() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.signum == signal.SIGINT  # recorded: the loop finishes its step, saves, exits 130
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back as it was


def test_under_torchrun_a_second_signal_does_not_cut_the_save_short(python_sigint):
    """torchrun forwards Ctrl-C and then sends its own SIGTERM: neither may interrupt the save."""
    with StopRequest(escalate=False) as stop:
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGINT)
        assert stop.signum == signal.SIGINT
