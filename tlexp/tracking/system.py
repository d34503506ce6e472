"""System metrics of a training run (CPU, memory, disk, network; GPU utilisation and memory where
MLflow can read a GPU) through MLflow's own ``SystemMetricsMonitor``.

MLflow samples on a background thread and logs ``system/...`` metrics every ``SAMPLING_INTERVAL_S``
seconds (``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` overrides it); a run shorter than one interval logs
none. The thread is stopped, and its last samples written, before the run is marked FINISHED, FAILED or
KILLED.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

SAMPLING_INTERVAL_S = 10.0  # one sample (and one small metrics batch) per 10 s: far below 1% of a run's time

log = logging.getLogger(__name__)


@contextlib.contextmanager
def system_metrics(run_id: str, *, enabled: bool = True, resumed: bool = False) -> Iterator[None]:
    """Log system metrics into run ``run_id`` while the block runs; a resumed run continues its steps."""
    if not enabled:
        yield
        return
    quiet = logging.getLogger("mlflow.system_metrics")
    if quiet.level == logging.NOTSET:  # its INFO lines (started, stopping, no GPU) would break the CLI's output
        quiet.setLevel(logging.WARNING)
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=SAMPLING_INTERVAL_S, resume_logging=resumed)
    except ImportError as exc:  # psutil (a dependency of tlexp) missing in an unusual install: train anyway
        log.warning("System metrics are off: %s (pip install psutil).", exc)
        yield
        return
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()  # stops and joins the sampling thread, then writes what it sampled
