"""Telling a live run from a dead one: a heartbeat tag that a training process keeps fresh.

A process killed by SIGKILL, the OOM killer or a lost node cannot mark its run KILLED: the run stays
RUNNING. While it lives, a training process writes the unix time to the ``tlexp.heartbeat`` tag at every
epoch and from a daemon thread every ``TLEXP_HEARTBEAT_EVERY_S`` seconds (30). A RUNNING run whose
heartbeat is older than ``TLEXP_HEARTBEAT_TIMEOUT_S`` seconds (120) is taken as dead, and
``tlexp train --resume`` continues it from its last saved epoch (``--force`` skips the wait).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from typing import Any, Iterator

TAG_HEARTBEAT = "tlexp.heartbeat"  # unix time (s) a live process last said it was training the run
TAG_PID = "tlexp.pid"  # "host:pid" of the process training the run (how a test finds a Ray worker)


def heartbeat_every_s() -> float:
    return float(os.environ.get("TLEXP_HEARTBEAT_EVERY_S", "30"))


def heartbeat_timeout_s() -> float:
    return float(os.environ.get("TLEXP_HEARTBEAT_TIMEOUT_S", "120"))


def heartbeat_age_s(run: Any, now: float | None = None) -> float | None:
    """Seconds since the run's last heartbeat; None for a run that never wrote one."""
    value = run.data.tags.get(TAG_HEARTBEAT)
    try:
        return (time.time() if now is None else now) - float(value)
    except (TypeError, ValueError):
        return None


def owner_tags() -> dict[str, str]:
    """The tags that say this process trains the run, now."""
    return {TAG_HEARTBEAT: f"{time.time():.3f}", TAG_PID: f"{socket.gethostname()}:{os.getpid()}"}


@contextlib.contextmanager
def heartbeat(logger: Any) -> Iterator[None]:
    """Keep ``logger``'s run's heartbeat fresh from a daemon thread while the block runs.

    The thread only writes a tag (one small call every 30 s), so a long epoch does not look dead; a
    failed write is skipped (the next one, or the epoch's, follows).
    """
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(heartbeat_every_s()):
            with contextlib.suppress(Exception):
                logger.set_tags({TAG_HEARTBEAT: f"{time.time():.3f}"})

    thread = threading.Thread(target=beat, name="tlexp-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
