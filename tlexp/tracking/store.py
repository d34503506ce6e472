"""The tracking store: where it is, whether it can be used, experiments, and the queries runs are found by."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Iterable, Iterator

TAG_EXPERIMENT = "tlexp.experiment"
TAG_KIND = "tlexp.kind"
TAG_ERROR = "tlexp.error"
TAG_SWEEP = "tlexp.sweep_id"
TAG_CELL = "tlexp.cell_id"
TAG_DIVERGED_EPOCH = "tlexp.diverged_epoch"  # a run that ended FAILED on a non-finite loss, and when
CHECKPOINT_ARTIFACT = "checkpoint/last.pt"
TAG_STALE_CHECKPOINT = "tlexp.stale_checkpoint"  # set where the store could not delete a finished run's checkpoint


class TrackingError(RuntimeError):
    """The tracking store cannot be used. One sentence for the user."""


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


def run_exists(run_id: str) -> Any:
    """The MLflow run ``run_id`` or a TrackingError that says it was not found."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient().get_run(run_id)
    except MlflowException as exc:
        raise TrackingError(f"Run {run_id!r} was not found in the tracking store {tracking_uri()!r}; "
                            f"pass the id of a tlexp run (see `mlflow ui` or `tlexp compare`).") from exc


def resumable_run(run_id: str, *, force: bool = False) -> Any:
    """The run ``run_id`` if it ended KILLED or FAILED, or is RUNNING with a dead process (its heartbeat
    older than the timeout, or ``force``), so that ``--resume`` cannot log an epoch twice."""
    from .liveness import heartbeat_age_s, heartbeat_timeout_s

    run = run_exists(run_id)
    status = run.info.status
    if status == "FINISHED":
        raise TrackingError(f"Run {run_id} is FINISHED; only KILLED or FAILED runs can be resumed "
                            f"(start a new run instead).")
    if status == "RUNNING" and not force:
        age, timeout = heartbeat_age_s(run), heartbeat_timeout_s()
        if age is None:
            raise TrackingError(f"Run {run_id} is RUNNING and has no heartbeat to tell whether its process "
                                f"lives; if you know it is dead, resume it with --force.")
        if age < timeout:
            raise TrackingError(f"Run {run_id} is RUNNING and its process was alive {age:.0f} s ago (heartbeat); "
                                f"a dead run can be resumed once its heartbeat is {timeout:.0f} s old, or now "
                                f"with --force if you know its process is dead.")
    elif status not in ("KILLED", "FAILED", "RUNNING"):
        raise TrackingError(f"Run {run_id} is {status}; only KILLED, FAILED or dead RUNNING runs can be resumed.")
    diverged = run.data.tags.get(TAG_DIVERGED_EPOCH)
    if diverged:  # same settings, same RNG state: it would diverge at the same epoch again
        raise TrackingError(f"Run {run_id} diverged (non-finite loss) at epoch {diverged}; resumed with the same "
                            f"settings it would diverge again, so start a new run with a smaller --lr.")
    return run


def _all_experiment_ids(client: Any) -> list[str]:
    from mlflow.entities import ViewType

    return [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]


def tag_equals(key: str, value: str) -> str:
    """A search-filter clause for "tag ``key`` equals ``value``", whatever quotes ``value`` holds.

    MLflow's filter grammar has no escape character (3.17 rejects both ``\\'`` and ``''``): the value
    goes in single quotes, or in double quotes when it holds a single quote. A value with both kinds
    is matched with LIKE, each single quote as the one-character wildcard ``_``; that may match a few
    other values too, so callers keep only the runs ``tagged`` exactly so.
    """
    if "'" not in value:
        return f"tags.`{key}` = '{value}'"
    if '"' not in value:
        return f'tags.`{key}` = "{value}"'
    return f"tags.`{key}` LIKE '{value.replace(chr(39), '_')}'"


def tagged(runs: Iterable[Any], tags: dict[str, str]) -> list[Any]:
    """The runs whose tags equal ``tags`` exactly (a search by ``tag_equals`` may return more)."""
    return [run for run in runs if all(run.data.tags.get(k) == v for k, v in tags.items())]


def search_tagged(client: Any, experiment_ids: list[str], tags: dict[str, str], **search: Any) -> list[Any]:
    """``client.search_runs`` for the runs whose tags equal ``tags`` exactly (names with any quotes)."""
    found = client.search_runs(experiment_ids, " and ".join(tag_equals(k, v) for k, v in tags.items()), **search)
    return tagged(found, tags)


def attempt_runs(tags: dict[str, str]) -> list[Any]:
    """The training runs, in any experiment, whose tags equal ``tags`` (a Ray task finds its earlier attempts)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    ids = _all_experiment_ids(client)
    return search_tagged(client, ids, {TAG_KIND: "train", **tags}) if ids else []


def has_checkpoint(run_id: str) -> bool:
    from mlflow.tracking import MlflowClient

    folder = os.path.dirname(CHECKPOINT_ARTIFACT)
    return any(item.path == CHECKPOINT_ARTIFACT for item in MlflowClient().list_artifacts(run_id, folder))


def sweep_children(experiment: str, sweep_id: str) -> dict[str, list[tuple[str, str]]]:
    """cell id -> [(status, run id)] of the training runs an earlier run of this sweep left."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    ids = _all_experiment_ids(client)
    out: dict[str, list[tuple[str, str]]] = {}
    if not ids:
        return out
    tags = {TAG_SWEEP: sweep_id, TAG_KIND: "train", TAG_EXPERIMENT: experiment}
    for run in search_tagged(client, ids, tags, max_results=50000):
        out.setdefault(run.data.tags.get(TAG_CELL, ""), []).append((run.info.status, run.info.run_id))
    return out
