"""SIGTERM and SIGINT during a run (docs/operations.md, "Operating it": "Signals").

While a run goes (``handling()``, around ``run_once``), the first SIGTERM or SIGINT only records a stop
request. The run checks it at its safe points (``check()``: before each phase, between apply batches,
between accounts' exit work; the read phase's wait polls it) and raises ``Terminated`` there, so a
transaction in flight commits or rolls back first and no order is left half-sent. The run is then
recorded (exit 143 / 130), its claims and lock released, the dead-man's switch pinged and the metrics
written, as for any other exit. Reads still in flight on worker threads are abandoned, not waited for.
A main-thread HTTP read that only reads (``interruptible()``) is broken off by the handler itself.

A second signal exits at once (``os._exit``) with one line: the run row is then left unfinished and the
lock's holder dead, which the next run sees and marks (docs/design.md, "Locking").
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from monitor.errors import Terminated

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _State:
    def __init__(self) -> None:
        self.signum: int | None = None
        self.interruptible = 0  # >0: the main thread is in a read the handler may break off


_state = _State()


def requested() -> int | None:
    """The signal a stop was requested by (None: none). Safe from any thread."""
    return _state.signum


def check() -> None:
    """Raise ``Terminated`` if a stop was requested. Call only where nothing is half-done."""
    if _state.signum is not None:
        raise Terminated(_state.signum)


@contextmanager
def interruptible() -> Iterator[None]:
    """A main-thread block that only reads (no transaction, no order): a signal breaks it off at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    check()
    _state.interruptible += 1
    try:
        yield
    finally:
        _state.interruptible = max(0, _state.interruptible - 1)  # the handler zeroes it when it raises


def _handle(signum: int, frame: FrameType | None) -> None:
    if _state.signum is not None:
        # The second signal: the operator insists. One line, and out without recording anything more.
        try:
            os.write(2, f"position-monitor: second signal ({signal.Signals(signum).name}): exiting at once;"
                        " the next run marks this run crashed\n".encode())
        finally:
            os._exit(128 + _state.signum)
    _state.signum = signum
    log.info("%s received: stopping at the next safe point", signal.Signals(signum).name)
    if _state.interruptible > 0:
        _state.interruptible = 0
        raise Terminated(signum)


@contextmanager
def handling() -> Iterator[None]:
    """Install the stop handlers for the block (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state.signum, _state.interruptible = None, 0
    previous = {s: signal.signal(s, _handle) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def exit_now(code: int) -> None:
    """Leave the process with ``code`` without waiting for reads still in flight on worker threads (their
    results are not wanted: the run is already recorded and its lock released)."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        logging.shutdown()
        os._exit(code)
