"""Where a sweep's cells run: one after another in this process (``local``), or as Ray tasks (``ray``).

With Ray, each cell is one task with the CPUs and GPUs it needs, on whichever node of the cluster has
them. The driver (this process) owns the parent run, the progress line and the ETA; each task trains an
ordinary child run that logs straight to the tracking store. A task whose worker dies (SIGKILL, the OOM
killer, a lost node) is retried by Ray and continues the same MLflow run from its last saved epoch: it
finds its run by its Ray task id (the same on every attempt) and resumes it from the per-epoch checkpoint.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable

from .config import ConfigError, TrainConfig
from .tracking import Interrupted, TrackingError

EXECUTORS = ("local", "ray")
TASK_RETRIES = 3  # attempts after the first when a cell's worker dies
TAG_RAY_TASK = "tlexp.ray_task_id"  # the same on every attempt of a task: how a retry finds its run
TAG_RAY_NODE = "tlexp.ray_node_id"  # the Ray node that trained the cell
# The driver's tlexp settings that a worker needs too (a worker's environment is its raylet's).
_FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "TLEXP_CACHE_DIR", "TLEXP_CHECKPOINT_EVERY_S", "TLEXP_HEARTBEAT_EVERY_S",
                  "TLEXP_HEARTBEAT_TIMEOUT_S", "HF_HUB_OFFLINE", "TORCH_HOME")


@dataclass(frozen=True)
class RayOptions:
    """How cells run on Ray. ``address``: None starts a local instance (or uses the one this process has
    already started); "auto" or "HOST:PORT" joins a running cluster."""

    address: str | None = None
    cpus_per_cell: float = 1.0
    gpus_per_cell: float | None = None  # None: 1 when the cluster has GPUs, else 0


class SweepInterrupted(Interrupted):
    """Ctrl-C in a Ray sweep's driver: the running cells were cancelled and ended KILLED."""

    def user_message(self) -> str:
        return str(self)


def parse_executor(value: str) -> str:
    if value not in EXECUTORS:
        raise ConfigError(f"--executor {value!r} is not one of: {', '.join(EXECUTORS)}.")
    return value


def connect(options: RayOptions) -> Any:
    """Import Ray and join (or start) the cluster; one line when Ray is missing or unreachable."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray, which is not installed; install it with "
                          "`pip install 'tlexp[ray]'` (or `pip install 'ray>=2.9'`).") from None
    if ray.is_initialized():
        return ray
    # ray.init installs its own SIGTERM handler in the driver; tlexp's (SIGTERM ends runs KILLED with a
    # checkpoint, like Ctrl-C) must stay in charge, so the handlers are put back.
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        ray.init(address=options.address, include_dashboard=False, log_to_driver=False,
                 configure_logging=True, logging_level="WARNING")
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        where = options.address or "a local instance"
        raise ConfigError(f"--ray-address {where!r}: cannot connect to Ray ({str(exc).splitlines()[0][:160]}); "
                          f"start the cluster with `ray start --head` or leave --ray-address out.") from None
    return ray


def check_reachable_store(ray: Any, uri: str) -> None:
    """A store every node can reach: a local SQLite file or folder only works while every node is this machine."""
    if uri.startswith(("http:", "https:", "databricks")) or (
            "://" in uri and not uri.startswith(("sqlite:", "file:"))):
        return  # a server or a database server
    local = {"127.0.0.1", "localhost", socket.gethostname()}
    try:
        local.add(ray.util.get_node_ip_address())
    except Exception:  # noqa: BLE001 - without it only loopback addresses count as this machine
        pass
    remote = sorted({n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")} - local)
    if remote:
        raise TrackingError(f"Tracking store {uri!r} is a file on this machine, but the Ray cluster has nodes on "
                            f"other machines ({', '.join(remote)}) that cannot write to it; set "
                            f"MLFLOW_TRACKING_URI to a server every node reaches (e.g. http://HEAD:5000).")


def run_cells_on_ray(todo: list[Any], *, options: RayOptions, parent_run_id: str, sweep_id: str,
                     on_done: Callable[[Any, float | None], None] | None = None,
                     estimate: Callable[[list[Any], list[Any]], float | None] | None = None) -> None:
    """Train ``todo`` (``sweep.Cell``s) as Ray tasks; each cell's status, run id and seconds are set as its
    task ends, then ``on_done(cell, seconds_left)`` reports it. Ctrl-C cancels the running tasks (their runs
    end KILLED with a checkpoint) and raises ``SweepInterrupted``."""
    from .tracking import tracking_uri

    ray = connect(options)
    uri = _absolute_uri(tracking_uri())
    check_reachable_store(ray, uri)
    gpus = options.gpus_per_cell
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    task = ray.remote(_train_cell).options(num_cpus=options.cpus_per_cell, num_gpus=gpus,
                                           max_retries=TASK_RETRIES, retry_exceptions=False)
    env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    env["MLFLOW_TRACKING_URI"] = uri
    threads = max(1, int(options.cpus_per_cell))
    # How many cells run at once (what the cluster's CPUs and GPUs allow): the ETA spreads the rest over them.
    resources = ray.cluster_resources()
    slots = int(resources.get("CPU", 1) // max(options.cpus_per_cell, 1e-9))
    if gpus:
        slots = min(slots, int(resources.get("GPU", 0) // gpus))
    slots = max(1, slots)

    pending = {task.remote(cell.config, parent_run_id=parent_run_id, sweep_id=sweep_id, cell_id=cell.cell_id,
                           env=env, cwd=os.getcwd(), torch_threads=threads): cell for cell in todo}
    for cell in todo:
        cell.status = "RUNNING"
    done: list[Any] = []
    try:
        while pending:
            # A timeout, so that Ctrl-C reaches this loop within a second however long a cell takes.
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            if not ready:
                continue
            cell = pending.pop(ready[0])
            _collect(ray, ready[0], cell)
            done.append(cell)
            if on_done is not None:
                left = estimate(done, list(pending.values())) if estimate is not None and pending else None
                on_done(cell, None if left is None else left / min(slots, len(pending)))
    except KeyboardInterrupt:
        _cancel(ray, pending)
        raise SweepInterrupted(f"Interrupted: {len(pending)} running cell(s) were cancelled and their runs marked "
                               f"KILLED (each keeps its last epoch's checkpoint); the sweep's parent run "
                               f"{parent_run_id} is KILLED. Re-run the same `tlexp sweep` command to train only "
                               f"the cells that are not FINISHED.", run_id=parent_run_id) from None


def _collect(ray: Any, ref: Any, cell: Any) -> None:
    from ray.exceptions import RayError

    try:
        result = ray.get(ref)
        cell.run_id, cell.status, cell.seconds = result["run_id"], result["status"], result["seconds"]
        cell.error = result.get("error")
    except RayError as exc:  # the task's worker died more often than it is retried
        cell.status, cell.error = "FAILED", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def _cancel(ray: Any, pending: dict[Any, Any]) -> None:
    """Cancel the tasks (KeyboardInterrupt inside each ends its run KILLED) and wait until they have."""
    for ref in pending:
        ray.cancel(ref)
    for ref, cell in pending.items():
        try:
            ray.get(ref, timeout=120)
        except Exception:  # noqa: BLE001 - TaskCancelledError is the expected outcome
            pass
        cell.status = "KILLED"


def _absolute_uri(uri: str) -> str:
    """A relative SQLite path means the driver's folder; a worker starts elsewhere."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    return uri


def _train_cell(config: TrainConfig, *, parent_run_id: str, sweep_id: str, cell_id: str, env: dict[str, str],
                cwd: str, torch_threads: int) -> dict[str, Any]:
    """One cell, in a Ray worker: a new child run, or, when this task ran before and its worker died,
    the run that attempt left (found by the task id), resumed from its last saved epoch."""
    import mlflow
    import ray
    import torch

    from . import tracking
    from .experiment import train

    os.environ.update(env)
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    if os.path.isdir(cwd):  # relative --data paths and cache folders mean the driver's folder
        os.chdir(cwd)
    torch.set_num_threads(torch_threads)
    task_id = ray.get_runtime_context().get_task_id()
    tags = {tracking.TAG_SWEEP: sweep_id, tracking.TAG_CELL: cell_id, TAG_RAY_TASK: task_id}
    t0 = time.perf_counter()
    earlier = tracking.attempt_runs(tags)
    tags[TAG_RAY_NODE] = ray.get_runtime_context().get_node_id()  # where it ran (not part of its identity)
    resume = None
    for run in earlier:  # Ray retries a task only once its worker is gone: that attempt's run is dead
        if run.info.status == "RUNNING":
            if tracking.has_checkpoint(run.info.run_id):
                resume = run.info.run_id
            else:
                tracking.end_dead_run(run.info.run_id, "its Ray worker died before its first epoch ended")
    try:
        if resume is not None:
            summary = train(TrainConfig(), resume_run_id=resume, force=True)
        else:
            summary = train(config, parent_run_id=parent_run_id, extra_tags=tags)
    except KeyboardInterrupt:  # ray.cancel: the run ended KILLED; the driver knows
        raise
    except Exception as exc:  # noqa: BLE001 - the child run is FAILED with its traceback; the sweep goes on
        return {"run_id": getattr(exc, "tlexp_run_id", None), "status": "FAILED",
                "seconds": time.perf_counter() - t0, "error": f"{type(exc).__name__}: {exc}"}
    return {"run_id": summary.run_id, "status": "FINISHED", "seconds": time.perf_counter() - t0}

