"""Ctrl-C and SIGTERM stop training cleanly: at the end of the current step, after a checkpoint.

While the training loop runs, the first SIGINT or SIGTERM only sets a flag; the loop finishes its step, saves a
checkpoint of it and raises `Interrupted`, which the CLI turns into one line with the exact resume command and
exit status 128 + signal (130, 143). A second signal, or one that arrives outside the loop (while a model
loads), interrupts at once; every file LAD writes is atomic, so the run folder stays consistent either way.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):  # like KeyboardInterrupt: no library `except Exception` swallows it
    """Training stopped on a signal; `checkpoint` holds every finished step (None: stopped before training)."""

    def __init__(self, signum: int, step: int | None = None, checkpoint=None):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class StopRequest:
    """Receives the signals: `deferred` (inside the loop) records them, otherwise they interrupt at once."""

    def __init__(self):
        self.signum: int | None = None
        self.deferred = False

    def __call__(self, signum, frame) -> None:
        if self.deferred and self.signum is None:
            self.signum = signum
            return
        raise Interrupted(signum)

    @contextmanager
    def deferring(self):
        self.deferred = True
        try:
            yield self
        finally:
            self.deferred = False


@contextmanager
def stop_signals():
    """Install a StopRequest for SIGINT and SIGTERM (main thread only), restoring the old handlers after."""
    request = StopRequest()
    try:
        old = {s: signal.signal(s, request) for s in SIGNALS}
    except ValueError:  # not the main thread (a notebook worker): leave the signals alone
        old = {}
    try:
        yield request
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
