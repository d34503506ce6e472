"""Read tlexp runs back from the MLflow store: one row per run, with the settings it was trained with.

Gathers the runs of an experiment (and those tagged with its name elsewhere), keeps the finished
training runs and says in notes what was left out and why.
"""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import pandas as pd

from tlexp.compare.types import CompareError, plural, sort_key
from tlexp.config import DEFAULT_EXPERIMENT
from tlexp.tracking import TAG_EXPERIMENT, TAG_KIND, tag_equals, tagged

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

KIND_TRAIN = "train"
KIND_SWEEP = "sweep"
KIND_COMPARISON = "comparison"
KIND_EVALUATION = "evaluation"  # `tlexp evaluate`: a trained model scored again, not a training run
# Numbers every training run row carries (NaN when a run did not log them).
RUN_NUMBERS = ("best_val_acc", "final_val_acc", "final_train_acc", "test_acc", "test_loss", "best_epoch",
               "total_time_s", "avg_epoch_time_s", "params_trainable", "params_total", "trainable_fraction",
               "train_samples_per_class", "train_size", "num_classes")
_SEARCH_PAGE = 1000


def load_runs(experiment: str = DEFAULT_EXPERIMENT, *, tracking_uri: str | None = None,
              all_runs: bool = False) -> pd.DataFrame:
    """The runs of ``experiment`` as a DataFrame, one row per run.

    Gathers the experiment with that name plus runs anywhere tagged ``tlexp.experiment=<name>``
    (``mlflow run`` puts runs in 'Default'). Columns: run_id, run_name, experiment_id,
    experiment_name, status, kind, strategy, parent_run_id, start_time, end_time, then every
    param (strings, exactly as logged), ``params`` (the same as one dict: a metric such as ``lr``
    may share a param's name) and every summary metric (floats).
    By default only finished training runs are returned; ``all_runs=True`` keeps sweep parents,
    comparison runs and unfinished runs too. Raises CompareError for an unknown experiment, or
    (by default) one without finished training runs.
    """
    frame = load_all_runs(client_for(tracking_uri), experiment)
    if all_runs:
        return frame
    training, _ = select_training_runs(frame, experiment)
    return training



def client_for(tracking_uri: str | None) -> "MlflowClient":
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def resolve_uri(tracking_uri: str | None) -> str:
    import mlflow

    return tracking_uri or mlflow.get_tracking_uri()


def _search_runs(client: "MlflowClient", experiment_ids: list[str], filter_string: str = "") -> list["Run"]:
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=_SEARCH_PAGE, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _experiment_names(client: "MlflowClient") -> dict[str, str]:
    """experiment_id -> name for every active experiment."""
    names: dict[str, str] = {}
    token = None
    while True:
        page = client.search_experiments(max_results=_SEARCH_PAGE, page_token=token)
        names.update({e.experiment_id: e.name for e in page})
        token = page.token
        if not token:
            return names


def load_all_runs(client: "MlflowClient", experiment: str) -> pd.DataFrame:
    """Every active run of the named experiment plus the runs tagged with its name elsewhere."""
    names = _experiment_names(client)
    own = [eid for eid, name in names.items() if name == experiment]
    found: dict[str, Run] = {}
    if own:
        found.update((r.info.run_id, r) for r in _search_runs(client, own))
    others = [eid for eid in names if eid not in own]
    if others:
        found.update((r.info.run_id, r) for r in _tagged_runs(client, others, experiment))
    if not own and not found:
        raise CompareError(
            f"Unknown experiment {experiment!r}: no experiment has that name and no run is tagged "
            f"{TAG_EXPERIMENT}={experiment!r}; existing experiments: {_name_list(names.values())}.")
    columns = ["run_id", "run_name", "experiment_id", "experiment_name", "status", "kind", "strategy",
               "parent_run_id", "start_time", "end_time", "model", "dataset", "params"]
    return pd.DataFrame([_run_row(r, names) for r in found.values()], columns=None if found else columns)


def _tagged_runs(client: "MlflowClient", experiment_ids: list[str], experiment: str) -> list["Run"]:
    """Runs of ``experiment_ids`` tagged tlexp.experiment=<experiment>, whatever quotes the name holds."""
    tags = {TAG_EXPERIMENT: experiment}
    return tagged(_search_runs(client, experiment_ids, tag_equals(TAG_EXPERIMENT, experiment)), tags)


def _name_list(names: Iterable[str], limit: int = 20) -> str:
    names = sorted(names)
    if not names:
        return "none"
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _run_row(run: "Run", experiment_names: dict[str, str]) -> dict[str, Any]:
    tags, params = run.data.tags, run.data.params
    row: dict[str, Any] = dict(params)
    # The params apart as well: a per-epoch metric may share a param's name (lr) and overwrite it below.
    row["params"] = dict(params)
    # Under `mlflow run` a param keeps the MLproject's raw value (image_size=auto) and tlexp logs the
    # value it resolved beside it; group by what the run really used.
    for key, value in params.items():
        if key.endswith("_resolved"):
            row[key[: -len("_resolved")]] = value
    row.update(run.data.metrics)
    row.update(
        run_id=run.info.run_id,
        run_name=tags.get("mlflow.runName") or run.info.run_name,
        experiment_id=run.info.experiment_id,
        experiment_name=experiment_names.get(run.info.experiment_id, run.info.experiment_id),
        status=run.info.status,
        kind=tags.get(TAG_KIND, ""),
        strategy=tags.get("strategy") or params.get("strategy") or "",
        parent_run_id=tags.get("mlflow.parentRunId"),
        start_time=pd.to_datetime(run.info.start_time, unit="ms", utc=True),
        end_time=pd.to_datetime(run.info.end_time, unit="ms", utc=True) if run.info.end_time else pd.NaT,
    )
    for key in ("model", "dataset"):  # tags are the contract; params are the fallback
        row[key] = tags.get(key) or params.get(key) or "none"
    return row


def select_training_runs(frame: pd.DataFrame, experiment: str) -> tuple[pd.DataFrame, list[str]]:
    """Split the finished training runs from the rest, and say in notes what was left out and why."""
    kind = frame["kind"].fillna("")
    is_comparison = kind == KIND_COMPARISON
    is_sweep = kind == KIND_SWEEP
    is_evaluation = kind == KIND_EVALUATION
    # Runs logged before the kind tag existed still count if they name a strategy.
    is_training = (kind == KIND_TRAIN) | ((kind == "") & (frame["strategy"] != ""))
    finished = frame["status"] == "FINISHED"
    notes: list[str] = []
    unfinished = frame[is_training & ~finished]
    if len(unfinished):
        counts = unfinished["status"].value_counts().sort_index()
        detail = ", ".join(f"{n} {status}" for status, n in counts.items())
        notes.append(f"Left out {plural(len(unfinished), 'unfinished run')} ({detail}).")
    if is_sweep.any():
        notes.append(f"Left out {plural(int(is_sweep.sum()), 'sweep parent run')} (a sweep parent holds no "
                     f"per-epoch metrics; its child runs are compared).")
    if is_comparison.any():
        notes.append(f"Left out {plural(int(is_comparison.sum()), 'earlier comparison run')} "
                     f"({TAG_KIND}={KIND_COMPARISON}).")
    if is_evaluation.any():
        notes.append(f"Left out {plural(int(is_evaluation.sum()), 'evaluation run')} ({TAG_KIND}={KIND_EVALUATION}: "
                     f"a trained model scored again, not a training run).")
    other = ~(is_training | is_sweep | is_comparison | is_evaluation)
    if other.any():
        notes.append(f"Left out {plural(int(other.sum()), 'run')} that {'is' if other.sum() == 1 else 'are'} "
                     f"not a tlexp training run (no strategy tag).")
    training = frame[is_training & finished].copy()
    if training.empty:
        statuses = frame.loc[is_training, "status"].value_counts().sort_index()
        if len(statuses):
            found = "its training runs are " + ", ".join(f"{n} {status}" for status, n in statuses.items())
        else:
            found = f"it holds {plural(len(frame), 'run')}, none of them a training run"
        raise CompareError(
            f"Experiment {experiment!r} has no FINISHED training runs to compare ({found}); "
            f"train some with `tlexp train --experiment {shlex.quote(experiment)}` or pass another --experiment.")
    outside = training[training["experiment_name"] != experiment]
    if len(outside):
        where = ", ".join(repr(n) for n in sorted(outside["experiment_name"].unique()))
        notes.append(f"Found {plural(len(outside), 'run')} outside experiment {experiment!r} (in {where}) "
                     f"through the {TAG_EXPERIMENT} tag.")
    for key in ("model", "dataset", "seed"):
        if key not in training:
            training[key] = "none"
        training[key] = training[key].fillna("none").astype(str)
    for key in RUN_NUMBERS:
        training[key] = pd.to_numeric(training[key], errors="coerce") if key in training else np.nan
    training = training.sort_values(["strategy", "seed", "run_id"], key=sort_key, ignore_index=True)
    return training, notes


