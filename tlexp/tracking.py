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
TAG_SWEEP = "tlexp.sweep_id"
TAG_CELL = "tlexp.cell_id"
CHECKPOINT_ARTIFACT = "checkpoint/last.pt"


class TrackingError(RuntimeError):
    """The tracking store cannot be used. One sentence for the user."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM as an exception, so that runs end KILLED and save their checkpoint.

    Once the run is closed it carries ``run_id`` and ``epoch`` (the last completed epoch,
    saved as the checkpoint; None when none had completed) for the message to the user.
    """

    def __init__(self, message: str = "interrupted", *, signum: int = signal.SIGINT, run_id: str | None = None,
                 epoch: int | None = None) -> None:
        super().__init__(message)
        self.signum, self.run_id, self.epoch = int(signum), run_id, epoch


def tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def check_store(uri: str | None = None, *, experiment: str | None = None) -> str:
    """Fail fast, before any training, if the tracking store cannot be reached or written.

    With ``experiment``, a local artifact folder the run would write to is checked too.
    """
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
        # A server that is down must fail in seconds: MLflow's default retries take minutes.
        with _schema_lock(uri), _quick_http():
            client = MlflowClient(uri)
            client.search_experiments(max_results=1)
            found = client.get_experiment_by_name(experiment) if experiment else None
    except Exception as exc:
        hint = ("set MLFLOW_TRACKING_URI to a writable location (e.g. sqlite:///$HOME/mlflow.db)"
                if uri.startswith("sqlite:") else "start the server or set MLFLOW_TRACKING_URI")
        raise TrackingError(f"Tracking store {uri!r} is not reachable ({type(exc).__name__}: "
                            f"{_first_line(exc)}); {hint}.") from exc
    if found is not None and found.lifecycle_stage != "active":
        raise TrackingError(f"Experiment {experiment!r} is deleted in {uri!r}; restore it (`mlflow experiments "
                            f"restore --experiment-id {found.experiment_id}`) or pass another --experiment.")
    if experiment:
        _check_artifact_folder(found.artifact_location if found is not None else _default_artifact_root(uri),
                               experiment)
    return uri


@contextlib.contextmanager
def _quick_http() -> Iterator[None]:
    """At most one retry and a 10 s timeout for MLflow's HTTP requests inside the block."""
    settings = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update({k: v for k, v in settings.items() if saved[k] is None})  # the user's own values win
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)


def _default_artifact_root(uri: str) -> str | None:
    """Where a new experiment's artifacts go: MLflow's default for a database store is ./mlruns."""
    if uri.startswith(("http:", "https:", "databricks")):
        return None  # the server decides
    if uri.startswith("file:") or "://" not in uri:
        return uri  # a file store keeps artifacts inside itself
    return os.path.abspath("mlruns")


def _check_artifact_folder(location: str | None, experiment: str) -> None:
    """A local artifact folder must be (or be creatable as) a writable folder."""
    from urllib.parse import urlparse

    if not location:
        return
    parsed = urlparse(location)
    if parsed.scheme not in ("", "file") and not (len(parsed.scheme) == 1 and os.name == "nt"):
        return  # s3:, mlflow-artifacts:, ...: only the server or the cloud can tell
    path = parsed.path if parsed.scheme == "file" else location
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise TrackingError(f"Artifacts of experiment {experiment!r} go to {path!r}, but {probe!r} is not a "
                            f"writable folder; make it writable, run from a writable folder, or use another "
                            f"--experiment or MLFLOW_TRACKING_URI.")


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


def retry_locked(fn: Any, *args: Any, attempts: int = 8, **kwargs: Any) -> Any:
    """Call ``fn``, retrying with backoff while SQLite answers 'database is locked'.

    Several processes writing one SQLite file queue for its single write lock; a
    transaction that timed out waiting did not commit, so calling again is safe.
    """
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if "database is locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(min(5.0, 0.1 * 2 ** attempt))


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
        return retry_locked(client.create_experiment, name)
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
        self._queued: list[tuple[Any, list[Any]]] = []  # (RunOperations, metrics) not yet confirmed written

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
            retry_locked(self.client.log_batch, self.run_id, params=items[i:i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        retry_locked(self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], *, step: int, synchronous: bool = False) -> None:
        """All metrics of one step in one batched call, by default queued off the training thread."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if synchronous:
            retry_locked(self.client.log_batch, self.run_id, metrics=batch, synchronous=True)
        else:
            self._queued.append((self.client.log_batch(self.run_id, metrics=batch, synchronous=False), batch))

    def flush(self) -> None:
        """Wait for the queued metrics. MLflow's background writer only logs its failures (e.g. SQLite's
        'database is locked' with several processes on one file), so a failed batch is written again here."""
        queued, self._queued = self._queued, []
        for operations, batch in queued:
            try:
                if operations is not None:
                    operations.wait()
            except Exception:
                retry_locked(self.client.log_batch, self.run_id, metrics=batch, synchronous=True)

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
    def atomic(self) -> contextlib.AbstractContextManager:
        """An epoch's metrics and checkpoint as one step: Ctrl-C/SIGTERM inside waits for the block's end,
        so a resumed run neither repeats nor skips an epoch."""
        return signals_deferred()

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


@contextlib.contextmanager
def training_run(*, experiment: str, run_name: str, tags: dict[str, str], parent_run_id: str | None = None,
                 resume_run_id: str | None = None, start_step: int = 0) -> Iterator[RunLogger]:
    """Open (or attach to, or resume) a run, and always close it FINISHED, FAILED or KILLED."""
    with sigterm_as_interrupt():
        with _opened_run(experiment=experiment, run_name=run_name, tags=tags, parent_run_id=parent_run_id,
                         resume_run_id=resume_run_id, start_step=start_step) as logger:
            yield logger


@contextlib.contextmanager
def _opened_run(*, experiment: str, run_name: str, tags: dict[str, str], parent_run_id: str | None,
                resume_run_id: str | None, start_step: int) -> Iterator[RunLogger]:
    from mlflow.entities import RunStatus
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    env_run = os.environ.get("MLFLOW_RUN_ID")
    all_tags = {TAG_EXPERIMENT: experiment, TAG_KIND: "train", **tags}
    # A signal while the run is created waits for the try below: the run is never left RUNNING.
    with signals_deferred(pending="keep"):
        if resume_run_id is not None:
            run_id = resume_run_id
            client.update_run(run_id, status="RUNNING")
            with contextlib.suppress(Exception):  # the interruption is over; its message would mislead
                client.delete_tag(run_id, TAG_ERROR)
            all_tags["tlexp.resumed_after_epoch"] = str(start_step)
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
            run_id = retry_locked(client.create_run, exp_id, run_name=run_name, tags=all_tags).info.run_id
        logger = RunLogger(run_id, start_step=start_step)
        logger.set_tags(all_tags)
    status = RunStatus.to_string(RunStatus.FINISHED)
    try:
        raise_pending()
        yield logger
        logger.flush()  # FINISHED only once every metric is in the store
    except KeyboardInterrupt as exc:
        status = RunStatus.to_string(RunStatus.KILLED)
        with signals_deferred(pending="drop"):  # one more Ctrl-C does not cut the checkpoint short
            # Without a new epoch, a resumed run still has the checkpoint it was resumed from.
            epoch = _close_abnormally(logger, status, "interrupted (Ctrl-C or SIGTERM)", None) or start_step or None
            with contextlib.suppress(Exception):
                _finish(client, run_id, status)
        raise Interrupted(str(exc) or "interrupted", signum=getattr(exc, "signum", signal.SIGINT),
                          run_id=run_id, epoch=epoch) from None
    except BaseException as exc:
        status = RunStatus.to_string(RunStatus.FAILED)
        with signals_deferred(pending="drop"):
            _close_abnormally(logger, status, f"{type(exc).__name__}: {_first_line(exc)}", traceback.format_exc())
            with contextlib.suppress(Exception):  # a broken store must not hide the original error
                _finish(client, run_id, status)
        with contextlib.suppress(Exception):
            exc.tlexp_run_id = run_id  # type: ignore[attr-defined]  # for the user's error message
        raise
    with signals_deferred():  # the run ends FINISHED; a signal meanwhile then stops the caller
        _finish(client, run_id, status)


def _close_abnormally(logger: RunLogger, status: str, message: str, trace: str | None) -> int | None:
    """Tag the error, save the traceback and the last checkpoint; return the checkpoint's epoch."""
    # Best effort: a broken store must not hide the original error.
    with contextlib.suppress(Exception):
        logger.flush()
    with contextlib.suppress(Exception):
        logger.set_tags({TAG_ERROR: message[:5000]})
    if trace:
        with contextlib.suppress(Exception):
            logger.log_text(trace, "error/traceback.txt")
    with contextlib.suppress(Exception):
        if logger.save_checkpoint():
            return int(logger._checkpoint["epoch"])  # type: ignore[index]
    return None


def _finish(client: Any, run_id: str, status: str) -> None:
    import mlflow

    with contextlib.suppress(Exception):
        mlflow.flush_async_logging()
    retry_locked(client.set_terminated, run_id, status=status)


def run_exists(run_id: str) -> Any:
    """The MLflow run ``run_id`` or a TrackingError that says it was not found."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient().get_run(run_id)
    except MlflowException as exc:
        raise TrackingError(f"Run {run_id!r} was not found in the tracking store {tracking_uri()!r}; "
                            f"pass the id of a tlexp run (see `mlflow ui` or `tlexp compare`).") from exc


def resumable_run(run_id: str) -> Any:
    """The run ``run_id`` if it ended KILLED or FAILED (so ``--resume`` cannot log an epoch twice)."""
    run = run_exists(run_id)
    status = run.info.status
    if status == "FINISHED":
        raise TrackingError(f"Run {run_id} is FINISHED; only KILLED or FAILED runs can be resumed "
                            f"(start a new run instead).")
    if status not in ("KILLED", "FAILED"):
        raise TrackingError(f"Run {run_id} is {status}: it is still training, or its process died without "
                            f"saving a checkpoint; only KILLED or FAILED runs can be resumed.")
    return run


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




def _all_experiment_ids(client: Any) -> list[str]:
    from mlflow.entities import ViewType

    return [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]


def sweep_children(experiment: str, sweep_id: str) -> dict[str, list[tuple[str, str]]]:
    """cell id -> [(status, run id)] of the training runs an earlier run of this sweep left."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    ids = _all_experiment_ids(client)
    out: dict[str, list[tuple[str, str]]] = {}
    if not ids:
        return out
    runs = client.search_runs(ids, filter_string=f"tags.`{TAG_SWEEP}` = '{sweep_id}' and "
                                                 f"tags.`{TAG_KIND}` = 'train' and "
                                                 f"tags.`{TAG_EXPERIMENT}` = '{experiment}'",
                              max_results=50000)
    for run in runs:
        out.setdefault(run.data.tags.get(TAG_CELL, ""), []).append((run.info.status, run.info.run_id))
    return out


@contextlib.contextmanager
def sweep_run(*, experiment: str, sweep_id: str, params: dict[str, Any]) -> Iterator[RunLogger]:
    """The sweep's parent run: reopened if this sweep ran before, else created (or `mlflow run`'s own)."""
    from mlflow.entities import RunStatus
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    tags = {TAG_EXPERIMENT: experiment, TAG_KIND: "sweep", TAG_SWEEP: sweep_id}
    env_run = os.environ.get("MLFLOW_RUN_ID")
    if env_run:
        run_id = env_run
    else:
        exp_id = experiment_id(experiment)
        previous = client.search_runs([exp_id], filter_string=f"tags.`{TAG_SWEEP}` = '{sweep_id}' and "
                                                              f"tags.`{TAG_KIND}` = 'sweep'",
                                      order_by=["attributes.start_time DESC"], max_results=1)
        if previous:
            run_id = previous[0].info.run_id
        else:
            run_id = client.create_run(exp_id, run_name=f"sweep-{sweep_id[:8]}", tags=tags).info.run_id
    client.update_run(run_id, status="RUNNING")
    logger = RunLogger(run_id)
    logger.set_tags(tags)
    logger.log_params(params)
    status = RunStatus.to_string(RunStatus.FINISHED)
    try:
        with sigterm_as_interrupt():
            yield logger
    except KeyboardInterrupt:
        status = RunStatus.to_string(RunStatus.KILLED)
        raise
    except BaseException as exc:
        status = RunStatus.to_string(RunStatus.FAILED)
        with contextlib.suppress(Exception):
            logger.set_tags({TAG_ERROR: f"{type(exc).__name__}: {_first_line(exc)}"})
        raise
    finally:
        _finish(client, run_id, status)
