"""The only module that writes to MLflow: run lifecycle, params, metrics, artifacts, the model.

A run always ends in a definite state: FINISHED, FAILED (error message as the
``tlexp.error`` tag, traceback as an artifact) or KILLED (Ctrl-C / SIGTERM),
and on FAILED/KILLED the last completed epoch's checkpoint is saved so that
``tlexp train --resume RUN_ID`` can continue the same run.

Under ``mlflow run`` the entry point logs into the run MLflow created
(``MLFLOW_RUN_ID``) instead of starting a second one; its experiment is the one
``mlflow run`` chose, so every run also carries the ``tlexp.experiment`` tag
that ``tlexp compare`` searches for.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import tempfile
import threading
import time
import traceback
from typing import Any, Iterator

TAG_EXPERIMENT = "tlexp.experiment"
TAG_KIND = "tlexp.kind"
TAG_ERROR = "tlexp.error"
CHECKPOINT_ARTIFACT = "checkpoint/last.pt"


class TrackingError(RuntimeError):
    """The tracking store cannot be used. One sentence for the user."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM, delivered as an exception so that runs end KILLED and save their checkpoint."""


def tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def check_store(uri: str | None = None) -> str:
    """Fail fast, before any training, if the tracking store cannot be reached or written."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = uri or mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        folder = os.path.dirname(os.path.abspath(path)) or "."
        if not os.path.isdir(folder):
            raise TrackingError(f"Tracking store {uri!r}: folder {folder!r} does not exist; create it or set "
                                f"MLFLOW_TRACKING_URI to a writable location.")
        target = path if os.path.exists(path) else folder
        if not os.access(target, os.W_OK):
            raise TrackingError(f"Tracking store {uri!r} is not writable; set MLFLOW_TRACKING_URI to a "
                                f"writable location (e.g. sqlite:///$HOME/mlflow.db).")
    try:
        with _schema_lock(uri):
            MlflowClient(uri).search_experiments(max_results=1)
    except Exception as exc:
        raise TrackingError(f"Tracking store {uri!r} is not reachable ({type(exc).__name__}: "
                            f"{_first_line(exc)}); start the server or set MLFLOW_TRACKING_URI.") from exc
    return uri


def _same_number(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return False


@contextlib.contextmanager
def _schema_lock(uri: str) -> Iterator[None]:
    """Serialise first use of a SQLite store across processes.

    MLflow creates and migrates the schema of a fresh SQLite file on first
    use; several ``tlexp train`` processes starting together race on it
    ("table ... already exists", "Online migration expected to match one
    row"). An exclusive lock on the store's folder lets one process create
    the schema while the others wait; afterwards the lock costs nothing.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no flock, no lock
        yield
        return
    if not uri.startswith("sqlite:///"):
        yield
        return
    folder = os.path.dirname(os.path.abspath(uri[len("sqlite:///"):])) or "."
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""


def experiment_id(name: str) -> str:
    """Id of experiment ``name``, created if missing (race-safe for concurrent processes)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # another process created it first
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


class RunLogger:
    """What a training run writes, bound to one run id."""

    def __init__(self, run_id: str, *, start_step: int = 0) -> None:
        from mlflow.tracking import MlflowClient

        self.run_id = run_id
        self.client = MlflowClient()
        self._checkpoint: dict[str, Any] | None = None
        self.start_step = start_step

    # -- params, tags, metrics -------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        """Log params in batches. Keys the run already has (``mlflow run`` logs the MLproject's
        parameters as given, e.g. image_size=auto) are kept; where tlexp resolved a different
        value it is logged as ``<key>_resolved`` (MLflow forbids changing a param)."""
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        values = {}
        for key, value in params.items():
            value = str(value)[:6000]
            if key not in existing:
                values[key] = value
            elif existing[key] != value and not _same_number(existing[key], value):
                values[f"{key}_resolved"] = value
        items = [Param(k, v) for k, v in values.items()]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], *, step: int, synchronous: bool = False) -> None:
        """All metrics of one step in one batched call, by default queued off the training thread."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch, synchronous=synchronous)

    # -- artifacts -----------------------------------------------------------
    def log_text(self, text: str, path: str) -> None:
        self.client.log_text(self.run_id, text, path)

    def log_dict(self, data: Any, path: str) -> None:
        self.client.log_dict(self.run_id, data, path)

    def log_figure(self, figure: Any, path: str) -> None:
        self.client.log_figure(self.run_id, figure, path)

    def log_file(self, local_path: str, artifact_dir: str | None = None) -> None:
        self.client.log_artifact(self.run_id, local_path, artifact_dir)

    def log_model(self, model: Any, *, input_example: Any, class_names: list[str]) -> None:
        """Log the model (MLflow's default format) with a signature inferred from ``input_example``."""
        import mlflow

        with _active(self.run_id):
            # Explicit requirements: MLflow's inference re-imports the model in a subprocess (~10 s a run).
            mlflow.pytorch.log_model(model, name="model", input_example=input_example,
                                     pip_requirements=_model_requirements(), metadata={"class_names": class_names})

    # -- checkpoints ---------------------------------------------------------
    def keep_checkpoint(self, state: dict[str, Any]) -> None:
        """Remember the last completed epoch's state; it is written only if the run does not finish."""
        self._checkpoint = state

    def save_checkpoint(self) -> bool:
        if self._checkpoint is None:
            return False
        import torch

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, os.path.basename(CHECKPOINT_ARTIFACT))
            torch.save(self._checkpoint, path)
            self.client.log_artifact(self.run_id, path, os.path.dirname(CHECKPOINT_ARTIFACT))
        return True


def _model_requirements() -> list[str]:
    """What loading the logged model needs, pinned to the versions that trained it."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in ("torch", "torchvision", "timm", "numpy", "cloudpickle", "mlflow"):
        with contextlib.suppress(PackageNotFoundError):
            out.append(f"{dist}=={version(dist).split('+')[0]}")
    return out


@contextlib.contextmanager
def _active(run_id: str) -> Iterator[None]:
    """Make ``run_id`` the fluent API's active run for a call that needs one, without ending it."""
    import mlflow

    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield
        return
    mlflow.start_run(run_id=run_id, nested=active is not None)
    try:
        yield
    finally:
        # end_run would mark the run FINISHED; pop it from the fluent stack instead.
        from mlflow.tracking import fluent

        fluent._active_run_stack.get().pop()  # type: ignore[attr-defined]


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Interrupted`` (like Ctrl-C) in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(f"received signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def training_run(*, experiment: str, run_name: str, tags: dict[str, str], parent_run_id: str | None = None,
                 resume_run_id: str | None = None, start_step: int = 0) -> Iterator[RunLogger]:
    """Open (or attach to, or resume) a run, and always close it FINISHED, FAILED or KILLED."""
    from mlflow.entities import RunStatus
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    env_run = os.environ.get("MLFLOW_RUN_ID")
    all_tags = {TAG_EXPERIMENT: experiment, TAG_KIND: "train", **tags}
    if resume_run_id is not None:
        run_id = resume_run_id
        client.update_run(run_id, status="RUNNING")
    elif parent_run_id is None and env_run:
        # `mlflow run` created this run (in the experiment it chose); log into it.
        run_id = env_run
        client.update_run(run_id, status="RUNNING", name=run_name)
    else:
        if parent_run_id is not None:
            exp_id = client.get_run(parent_run_id).info.experiment_id
            all_tags["mlflow.parentRunId"] = parent_run_id
        else:
            exp_id = experiment_id(experiment)
        run_id = client.create_run(exp_id, run_name=run_name, tags=all_tags).info.run_id
    logger = RunLogger(run_id, start_step=start_step)
    logger.set_tags(all_tags)
    status = RunStatus.to_string(RunStatus.FINISHED)
    try:
        with sigterm_as_interrupt():
            yield logger
    except KeyboardInterrupt:
        status = RunStatus.to_string(RunStatus.KILLED)
        _close_abnormally(logger, status, "interrupted (Ctrl-C or SIGTERM)", None)
        raise
    except BaseException as exc:
        status = RunStatus.to_string(RunStatus.FAILED)
        _close_abnormally(logger, status, f"{type(exc).__name__}: {_first_line(exc)}", traceback.format_exc())
        raise
    finally:
        _finish(client, run_id, status)


def _close_abnormally(logger: RunLogger, status: str, message: str, trace: str | None) -> None:
    # Best effort: a broken store must not hide the original error.
    with contextlib.suppress(Exception):
        logger.set_tags({TAG_ERROR: message[:5000]})
    if trace:
        with contextlib.suppress(Exception):
            logger.log_text(trace, "error/traceback.txt")
    with contextlib.suppress(Exception):
        logger.save_checkpoint()


def _finish(client: Any, run_id: str, status: str) -> None:
    import mlflow

    with contextlib.suppress(Exception):
        mlflow.flush_async_logging()
    client.set_terminated(run_id, status=status)


def run_exists(run_id: str) -> Any:
    """The MLflow run ``run_id`` or a TrackingError that says it was not found."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient().get_run(run_id)
    except MlflowException as exc:
        raise TrackingError(f"Run {run_id!r} was not found in the tracking store {tracking_uri()!r}; "
                            f"pass the id of a tlexp run (see `mlflow ui` or `tlexp compare`).") from exc


def load_checkpoint(run_id: str) -> dict[str, Any]:
    """Download and load the checkpoint a KILLED/FAILED run saved."""
    import torch
    from mlflow.artifacts import download_artifacts

    try:
        path = download_artifacts(run_id=run_id, artifact_path=CHECKPOINT_ARTIFACT)
    except Exception as exc:
        raise TrackingError(f"Run {run_id} has no checkpoint to resume from ({CHECKPOINT_ARTIFACT}); only runs "
                            f"that were interrupted or failed after at least one epoch can be resumed.") from exc
    # The checkpoint holds tensors, numbers and strings only (RNG states are tensors).
    return torch.load(path, map_location="cpu", weights_only=True)


def to_json(data: Any) -> str:
    buf = io.StringIO()
    json.dump(data, buf, indent=2, default=str)
    return buf.getvalue()
