"""Ctrl-C and SIGTERM as an exception that ends a run KILLED, and blocks that a signal must not cut short."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM as an exception, so that runs end KILLED and save their checkpoint.

    Once the run is closed it carries ``run_id`` and ``epoch`` (the last completed epoch,
    saved as the checkpoint; None when none had completed) for the message to the user;
    ``finished`` when the signal waited for the run's final logging and the run ended FINISHED.
    """

    def __init__(self, message: str = "interrupted", *, signum: int = signal.SIGINT, run_id: str | None = None,
                 epoch: int | None = None, finished: bool = False) -> None:
        super().__init__(message)
        self.signum, self.run_id, self.epoch, self.finished = int(signum), run_id, epoch, finished


_DEFER = {"depth": 0, "pending": None}  # signals that arrived while deferred (main thread only)


@contextlib.contextmanager
def signals_deferred(*, pending: str = "raise") -> Iterator[None]:
    """Ctrl-C/SIGTERM that arrive inside the block wait for its end; then the signal is raised
    (``pending="raise"``), dropped ("drop": the caller is ending the run anyway) or kept for
    ``raise_pending()`` ("keep"). A second signal while one waits acts at once."""
    _DEFER["depth"] += 1
    try:
        yield
    finally:
        _DEFER["depth"] -= 1
        if _DEFER["depth"] == 0 and pending != "keep":
            if pending == "raise":
                raise_pending()
            _DEFER["pending"] = None


def raise_pending() -> None:
    """Raise ``Interrupted`` now for a signal that arrived while deferred."""
    signum = _DEFER["pending"]
    if signum is not None and _DEFER["depth"] == 0:
        _DEFER["pending"] = None
        raise Interrupted(f"received {signal.Signals(signum).name}", signum=signum)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise ``Interrupted`` in the main thread (or, inside
    ``signals_deferred``, at its end). A signal the parent process ignores stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if _DEFER["depth"] and _DEFER["pending"] is None:
            _DEFER["pending"] = signum
            return
        raise Interrupted(f"received {signal.Signals(signum).name}", signum=signum)

    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
