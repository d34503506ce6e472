"""The tracking store: where it is, whether it can be used, experiments, and the queries runs are found by."""

from __future__ import annotations

import contextlib
import os
import re
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


def check_store(uri: str | None = None, *, experiment: str | None = None, read_only: bool = False) -> str:
    """Fail fast, before any training, if the tracking store cannot be reached or written; return its URI.

    With ``experiment``, a local artifact folder the run would write to is checked too. ``read_only``
    (compare, sweep --dry-run) creates nothing: a SQLite folder that does not exist is refused, and a SQLite
    file that does not exist yet is not opened (MLflow would create it; there is nothing in it to read).
    Every problem is one sentence (TrackingError); a server that is down answers within seconds.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = uri or mlflow.get_tracking_uri()
    path = sqlite_path(uri)
    if path is not None:
        folder = os.path.dirname(path) or "."
        if not os.path.isdir(folder):
            raise TrackingError(f"Tracking store {uri!r}: folder {folder!r} does not exist; create it or set "
                                f"MLFLOW_TRACKING_URI to a writable location.")
        if read_only and not os.path.exists(path):
            return uri
        if not read_only and write_problem(uri):
            raise TrackingError(f"Tracking store {uri!r} is not writable ({write_problem(uri)}); set "
                                f"MLFLOW_TRACKING_URI to a writable location (e.g. sqlite:///$HOME/mlflow.db).")
    try:
        # A server that is down must fail in seconds: MLflow's default retries take minutes.
        with _schema_lock(uri, shared=read_only), quick_http():
            client = MlflowClient(uri)
            client.search_experiments(max_results=1)
            found = client.get_experiment_by_name(experiment) if experiment else None
    except Exception as exc:
        raise TrackingError(_unusable(uri, exc)) from exc
    if found is not None and found.lifecycle_stage != "active":
        raise TrackingError(f"Experiment {experiment!r} is deleted in {uri!r}; restore it (`mlflow experiments "
                            f"restore --experiment-id {found.experiment_id}`) or pass another --experiment.")
    if experiment and not read_only:
        _check_artifact_folder(found.artifact_location if found is not None else _default_artifact_root(uri),
                               experiment)
    return uri


def _unusable(uri: str, exc: BaseException) -> str:
    """One sentence for a store MLflow could not open or query."""
    detail = f"{type(exc).__name__}: {_first_line(exc)}"
    path = sqlite_path(uri)
    if path is not None and os.path.isfile(path) and "not a database" in str(exc):
        return (f"Tracking store {uri!r}: {path!r} is not an MLflow database ({detail}); point "
                f"MLFLOW_TRACKING_URI (or --tracking-uri) at the store tlexp wrote, or at a new file.")
    if path is not None:
        return (f"Tracking store {uri!r} cannot be used ({detail}); set MLFLOW_TRACKING_URI to a writable "
                f"location (e.g. sqlite:///$HOME/mlflow.db).")
    return f"Tracking store {uri!r} is not reachable ({detail}); start the server or set MLFLOW_TRACKING_URI."


def sqlite_path(uri: str) -> str | None:
    """The absolute file path of a ``sqlite:///`` store, None for any other kind."""
    if not uri.startswith("sqlite:///"):
        return None
    return os.path.abspath(uri[len("sqlite:///"):].split("?", 1)[0])


def store_exists(uri: str | None = None) -> bool:
    """False only for a SQLite store whose file does not exist yet (nothing has been logged there)."""
    import mlflow

    path = sqlite_path(uri or mlflow.get_tracking_uri())
    return path is None or os.path.exists(path)


def write_problem(uri: str | None = None) -> str | None:
    """Why a local SQLite store cannot be written (file or folder read-only), else None (a server cannot be
    asked without writing, so it is assumed writable)."""
    import mlflow

    path = sqlite_path(uri or mlflow.get_tracking_uri())
    if path is None:
        return None
    folder = os.path.dirname(path) or "."
    # SQLite writes a journal next to the file, so the folder must be writable as well as the file.
    for target, what in ((path, "file"), (folder, "folder")):
        if os.path.exists(target) and not os.access(target, os.W_OK):
            return f"its {what} {target!r} is read-only"
    return None


@contextlib.contextmanager
def quick_http() -> Iterator[None]:
    """At most one retry and a 10 s timeout for MLflow's HTTP requests inside the block (the user's own
    MLFLOW_HTTP_REQUEST_* values win). For checks and short read-only commands: a long training run keeps
    MLflow's patient defaults, so a server that blinks does not fail it."""
    settings = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update({k: v for k, v in settings.items() if saved[k] is None})
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
def _schema_lock(uri: str, *, shared: bool = False) -> Iterator[None]:
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
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)  # readers only wait for a schema being made
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


MIN_RUN_ID_PREFIX = 8  # characters of a run id that name a run (git-style short ids)


def find_run(run_id: str) -> Any:
    """The run whose id is ``run_id``, or the only one whose id starts with it (at least 8 characters)."""
    from mlflow.tracking import MlflowClient

    if len(run_id) >= 32 or not re.fullmatch(r"[0-9a-fA-F]+", run_id):
        return run_exists(run_id)  # a whole id (or not an id at all: then "not found")
    if len(run_id) < MIN_RUN_ID_PREFIX:
        raise TrackingError(f"Run id {run_id!r} is too short to name one run; give its first "
                            f"{MIN_RUN_ID_PREFIX} characters or more.")
    client = MlflowClient()
    ids = _all_experiment_ids(client)
    # Hex digits only (checked above), so the prefix cannot smuggle a LIKE wildcard or a quote in.
    matches = client.search_runs(ids, filter_string=f"attributes.run_id LIKE '{run_id.lower()}%'",
                                 max_results=11) if ids else []
    if not matches:
        return run_exists(run_id)
    if len(matches) > 1:
        listed = ", ".join(f"{r.info.run_id} ({r.info.run_name})" for r in matches[:10])
        count = "more than 10" if len(matches) > 10 else str(len(matches))
        raise TrackingError(f"Run id {run_id!r} is the start of {count} runs' ids ({listed}); give more of the id.")
    return matches[0]


def resumable_run(run_id: str) -> Any:
    """The run ``run_id`` (or the only run whose id starts with it) if it ended KILLED or FAILED (so
    ``--resume`` cannot log an epoch twice)."""
    run = find_run(run_id)
    run_id = run.info.run_id
    status = run.info.status
    if status == "FINISHED":
        raise TrackingError(f"Run {run_id} is FINISHED; only KILLED or FAILED runs can be resumed "
                            f"(start a new run instead).")
    if status not in ("KILLED", "FAILED"):
        raise TrackingError(f"Run {run_id} is {status}: it is still training, or its process died without "
                            f"saving a checkpoint; only KILLED or FAILED runs can be resumed.")
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


def sweep_children(experiment: str, sweep_id: str) -> dict[str, list[tuple[str, str]]]:
    """cell id -> [(status, run id)] of the training runs an earlier run of this sweep left."""
    from mlflow.tracking import MlflowClient

    out: dict[str, list[tuple[str, str]]] = {}
    if not store_exists():  # a dry run before the first sweep: nothing ran, and nothing is created
        return out
    client = MlflowClient()
    ids = _all_experiment_ids(client)
    if not ids:
        return out
    tags = {TAG_SWEEP: sweep_id, TAG_KIND: "train", TAG_EXPERIMENT: experiment}
    for run in search_tagged(client, ids, tags, max_results=50000):
        out.setdefault(run.data.tags.get(TAG_CELL, ""), []).append((run.info.status, run.info.run_id))
    return out
