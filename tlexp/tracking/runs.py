"""Runs: open, log into, and always close a training or sweep run; checkpoints (models: ``models``)."""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import time
import traceback
from typing import Any, Iterator

from .liveness import TAG_HEARTBEAT, heartbeat, owner_tags
from .signals import Interrupted, raise_pending, sigterm_as_interrupt, signals_deferred
from .store import (CHECKPOINT_ARTIFACT, TAG_ERROR, TAG_EXPERIMENT, TAG_KIND, TAG_STALE_CHECKPOINT, TAG_SWEEP,
                    TrackingError, _first_line, experiment_id, has_checkpoint, mark_model_training, retry_locked, search_tagged)


# Seconds between checkpoints written to the store: 0 = after every epoch. Measured on this project's
# default model (benchmarks/README.md, "Checkpoint cost"), a checkpoint costs well under 2% of an epoch.
CHECKPOINT_EVERY_S = "0"


def _same_number(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return False


class RunLogger:
    """What a training run writes, bound to one run id."""

    def __init__(self, run_id: str, *, start_step: int = 0) -> None:
        from mlflow.tracking import MlflowClient

        self.run_id = run_id
        self.client = MlflowClient()
        self._checkpoint: dict[str, Any] | None = None
        self.start_step = start_step
        self._queued: list[tuple[Any, list[Any]]] = []  # (RunOperations, metrics) not yet confirmed written
        self._saved_at: float | None = None  # time.monotonic() of the last checkpoint written to the store
        self.checkpoint_seconds: list[float] = []  # what each checkpoint written by this process cost
        self._logged_steps: dict[str, int] = {}  # metric -> last step an earlier attempt logged (on resume)

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
        # A run resumed from an older checkpoint than its last logged epoch (a process killed between the
        # two writes) replays epochs it logged already, to the same values: each (metric, step) once.
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if step > self._logged_steps.get(k, -1)]
        if not batch:
            return
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
        """Log the run's models (``tracking.models``: the pytorch module and the image pyfunc)."""
        from .models import log_run_models

        with _active(self.run_id):
            log_run_models(model, input_example=input_example, class_names=class_names)

    # -- checkpoints ---------------------------------------------------------
    def atomic(self) -> contextlib.AbstractContextManager:
        """An epoch's metrics and checkpoint as one step: Ctrl-C/SIGTERM inside waits for the block's end,
        so a resumed run neither repeats nor skips an epoch."""
        return signals_deferred()

    def finishing(self) -> contextlib.AbstractContextManager:
        """The final evaluation and logging: Ctrl-C/SIGTERM inside waits for the block's end and then for
        the run to end FINISHED, and only then stops the program (a cut model logging would leave a
        half-written model behind)."""
        return signals_deferred(pending="keep")

    def note_logged_steps(self) -> None:
        """Read which steps an earlier attempt of this run logged, so that a replayed epoch logs nothing."""
        run = self.client.get_run(self.run_id)
        for key in run.data.metrics:
            steps = [m.step for m in self.client.get_metric_history(self.run_id, key)]
            self._logged_steps[key] = max(steps, default=-1)

    def keep_checkpoint(self, state: dict[str, Any]) -> None:
        """Remember the last completed epoch's state and write it to the run's artifacts (which outlive
        this process: a SIGKILL loses at most the epochs since), at most every ``TLEXP_CHECKPOINT_EVERY_S``
        seconds; the heartbeat says the process is alive. A run that ends KILLED or FAILED writes its
        latest state in any case; a FINISHED run's checkpoint is deleted."""
        new_epoch = self._checkpoint is None or state.get("epoch") != self._checkpoint.get("epoch")
        self._checkpoint = state
        if not new_epoch:  # the final logging's progress: written only if the run ends KILLED or FAILED
            return
        self.set_tags({TAG_HEARTBEAT: f"{time.time():.3f}"})
        every_s = float(os.environ.get("TLEXP_CHECKPOINT_EVERY_S", CHECKPOINT_EVERY_S))
        if self._saved_at is None or time.monotonic() - self._saved_at >= every_s:
            self.save_checkpoint()

    def save_checkpoint(self) -> bool:
        if self._checkpoint is None:
            return False
        import torch

        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, os.path.basename(CHECKPOINT_ARTIFACT))
            torch.save(self._checkpoint, path)
            self.client.log_artifact(self.run_id, path, os.path.dirname(CHECKPOINT_ARTIFACT))
        self._saved_at = time.monotonic()
        self.checkpoint_seconds.append(time.perf_counter() - t0)
        return True


@contextlib.contextmanager
def _active(run_id: str) -> Iterator[None]:
    """Make ``run_id`` the fluent API's active run for a call that needs one, and leave it RUNNING."""
    import mlflow

    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield
        return
    env_run = os.environ.get("MLFLOW_RUN_ID")
    mlflow.start_run(run_id=run_id, nested=active is not None, log_system_metrics=False)
    try:
        yield
    finally:
        # end_run() leaves the fluent stack as it found it; the status it sets is the one the run had.
        # It also forgets MLFLOW_RUN_ID, which tells a later run started under `mlflow run` where to log.
        mlflow.end_run(status="RUNNING")
        if env_run is not None:
            os.environ["MLFLOW_RUN_ID"] = env_run


def outer_run_id() -> str | None:
    """The run ``mlflow run`` created for this process (``MLFLOW_RUN_ID``), if any.

    One strategy logs into it; several strategies become child runs nested under it (pass it as
    ``parent_run_id``), so that no run ever holds two strategies.
    """
    return os.environ.get("MLFLOW_RUN_ID") or None


@contextlib.contextmanager
def training_run(*, experiment: str, run_name: str, tags: dict[str, str], parent_run_id: str | None = None,
                 resume_run_id: str | None = None, start_step: int = 0,
                 system_metrics: bool = False) -> Iterator[RunLogger]:
    """Open (or attach to, or resume) a run, and always close it FINISHED, FAILED or KILLED.

    With ``system_metrics``, MLflow samples CPU/memory/GPU into the run until it closes.
    """
    from .system import system_metrics as monitored

    with sigterm_as_interrupt():
        with _opened_run(experiment=experiment, run_name=run_name, tags=tags, parent_run_id=parent_run_id,
                         resume_run_id=resume_run_id, start_step=start_step) as logger:
            # Inside the run: the sampling thread stops before the run's final status is written.
            with monitored(logger.run_id, enabled=system_metrics, resumed=resume_run_id is not None):
                yield logger


@contextlib.contextmanager
def _opened_run(*, experiment: str, run_name: str, tags: dict[str, str], parent_run_id: str | None,
                resume_run_id: str | None, start_step: int) -> Iterator[RunLogger]:
    from mlflow.entities import RunStatus
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    env_run = outer_run_id()
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
            mark_model_training(client.get_run(run_id).info.experiment_id)
        else:
            if parent_run_id is not None:
                exp_id = client.get_run(parent_run_id).info.experiment_id
                all_tags["mlflow.parentRunId"] = parent_run_id
                if parent_run_id == env_run:  # the experiment `mlflow run` chose, not one tlexp created
                    mark_model_training(exp_id)
            else:
                exp_id = experiment_id(experiment)
            run_id = retry_locked(client.create_run, exp_id, run_name=run_name, tags=all_tags).info.run_id
        logger = RunLogger(run_id, start_step=start_step)
        if resume_run_id is not None:
            logger.note_logged_steps()
        logger.set_tags({**all_tags, **owner_tags()})
    status = RunStatus.to_string(RunStatus.FINISHED)
    try:
        raise_pending()
        with heartbeat(logger):
            yield logger
        logger.flush()  # FINISHED only once every metric is in the store
        if resume_run_id is not None or logger.checkpoint_seconds:
            _drop_leftovers(client, run_id)
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
    try:
        with signals_deferred():  # the run ends FINISHED; a signal meanwhile then stops the caller
            _finish(client, run_id, status)
    except Interrupted as exc:  # a signal during the final logging or the finish, deferred until now
        exc.run_id, exc.finished = run_id, True
        raise


def end_dead_run(run_id: str, reason: str) -> None:
    """Mark FAILED a RUNNING run whose process died before it saved anything to resume from."""
    from mlflow.tracking import MlflowClient

    RunLogger(run_id).set_tags({TAG_ERROR: f"process died: {reason}"})
    _finish(MlflowClient(), run_id, "FAILED")


def _drop_leftovers(client: Any, run_id: str) -> None:
    """What an interrupted attempt left in a run that has now finished: its checkpoint (nothing is left
    to resume) and any logged model it did not finish writing (the run keeps the one logged since)."""
    from mlflow.entities import LoggedModelStatus
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    run = client.get_run(run_id)
    folder = os.path.dirname(CHECKPOINT_ARTIFACT)
    if has_checkpoint(run_id):
        try:  # MlflowClient deletes no artifact; the run's artifact repository does, where its store can
            get_artifact_repository(run.info.artifact_uri).delete_artifacts(folder)
        except Exception:  # noqa: BLE001 - e.g. a server without artifact deletion: mark it stale instead
            RunLogger(run_id).set_tags({TAG_STALE_CHECKPOINT: "true"})
    with contextlib.suppress(Exception):  # a store without logged models has no half-written one either
        for model in client.search_logged_models([run.info.experiment_id],
                                                 filter_string=f"source_run_id = '{run_id}'"):
            if model.status != LoggedModelStatus.READY:
                client.delete_logged_model(model.model_id)


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


def load_checkpoint(run_id: str) -> dict[str, Any]:
    """Download and load the checkpoint a run saved (its last saved epoch)."""
    import torch
    from mlflow.artifacts import download_artifacts
    from mlflow.tracking import MlflowClient

    try:
        # Looked up first: a download of a missing file would draw MLflow's progress bar before the error.
        folder = os.path.dirname(CHECKPOINT_ARTIFACT)
        if CHECKPOINT_ARTIFACT not in [a.path for a in MlflowClient().list_artifacts(run_id, folder)]:
            raise FileNotFoundError(CHECKPOINT_ARTIFACT)
        path = download_artifacts(run_id=run_id, artifact_path=CHECKPOINT_ARTIFACT)
    except Exception as exc:
        raise TrackingError(f"Run {run_id} has no checkpoint to resume from ({CHECKPOINT_ARTIFACT}); only runs "
                            f"that stopped after at least one epoch can be resumed.") from exc
    # The checkpoint holds tensors, numbers and strings only (RNG states are tensors).
    return torch.load(path, map_location="cpu", weights_only=True)


@contextlib.contextmanager
def sweep_run(*, experiment: str, sweep_id: str, params: dict[str, Any]) -> Iterator[RunLogger]:
    """The sweep's parent run: reopened if this sweep ran before, else created (or `mlflow run`'s own)."""
    from mlflow.entities import RunStatus
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    tags = {TAG_EXPERIMENT: experiment, TAG_KIND: "sweep", TAG_SWEEP: sweep_id}
    env_run = outer_run_id()
    if env_run:
        run_id = env_run
        mark_model_training(client.get_run(run_id).info.experiment_id)
    else:
        exp_id = experiment_id(experiment)
        previous = search_tagged(client, [exp_id], {TAG_SWEEP: sweep_id, TAG_KIND: "sweep"},
                                 order_by=["attributes.start_time DESC"])
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
