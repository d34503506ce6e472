"""Read tlexp runs back from the MLflow store, aggregate them over seeds, and say what they show.

This replaces the end of the seed notebook (its table, bar charts and "insights") with numbers
read from the tracking store only: nothing is re-trained. Data flows one way:

    store --load_runs/load_history--> pandas --run_stats/summarize--> table
          --findings/data_efficiency--> words --report/plots--> files (+ one MLflow run)

Runs are averaged only over seeds: runs that differ in any of ``GROUP_KEYS`` get their own rows.
Accuracies stay fractions in [0, 1] in every frame and CSV; they become percentages only on display.
"""

from __future__ import annotations

import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence
from urllib.parse import urlparse

import numpy as np
import pandas as pd

from tlexp.config import DEFAULT_EXPERIMENT
from tlexp.tracking import TAG_EXPERIMENT, TAG_KIND

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from rich.console import Console

KIND_TRAIN = "train"
KIND_SWEEP = "sweep"
KIND_COMPARISON = "comparison"
SCRATCH = "scratch"
# Table and legend order; strategies not listed here follow, sorted by name.
STRATEGY_ORDER = ("transfer", "finetune", "scratch")

PER_EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "epoch_time_s", "lr",
                     "train_samples_per_s")
# Settings that make runs incomparable: runs are averaged over seeds only within equal values.
GROUP_KEYS = ("model", "dataset", "epochs", "samples_per_class", "train_fraction", "image_size", "head")
SIZE_KEYS = ("samples_per_class", "train_fraction")  # the keys a data-efficiency sweep varies
# What the table aggregates per (group, strategy): mean and std over seeds of each per-run number.
TABLE_METRICS = ("best_val_acc", "final_val_acc", "final_train_acc", "test_acc", "total_time_s",
                 "avg_epoch_time_s", "params_trainable", "params_total", "trainable_fraction",
                 "epochs_to_target", "seconds_to_target", "train_val_gap")
TARGET_FRACTION = 0.95  # "converged" = reached 95% of the run's own best validation accuracy
OVERFIT_GAP = 0.10  # a final train-val gap above 10 points is called overfitting
FORMATS = ("md", "csv", "html")
HISTORY_THREADS = 8  # parallel get_metric_history requests when the store is a server
_SQL_CHUNK = 500  # run ids per IN (...) query, well under SQLite's bound-parameter limit
_SEARCH_PAGE = 1000
_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
_BULK_ENDPOINT = "/api/2.0/mlflow/metrics/get-history-bulk-interval"
_BULK_MAX_RUNS = 100  # the server's limit of run ids per bulk request
_BULK_MAX_STEPS = 2500  # the server's limit of points per run; longer histories come back sampled


class CompareError(ValueError):
    """The experiment or an option cannot be compared. The message is one sentence for the user."""


@dataclass
class Section:
    """A titled list of plain-language findings."""

    title: str
    lines: list[str]


@dataclass
class Comparison:
    """Everything the report shows, computed from the store without side effects."""

    experiment: str
    runs: pd.DataFrame  # finished training runs, one row each (load_runs)
    history: pd.DataFrame  # per-epoch metrics, long format (load_history)
    stats: pd.DataFrame  # one row per run: the numbers the table aggregates (run_stats)
    table: pd.DataFrame  # one row per (group, strategy): n_runs, <metric>_mean, <metric>_std
    group_keys: list[str]  # the GROUP_KEYS whose values differ between runs (table columns)
    shared: dict[str, str]  # the GROUP_KEYS every run has in common, and their value
    findings: list[Section]
    notes: list[str]
    efficiency: pd.DataFrame | None = None  # per family, size and strategy: mean, std, n
    paired: pd.DataFrame | None = None  # per family, size and strategy pair: mean diff over seeds
    efficiency_metric: str = "best_val_acc"


@dataclass
class CompareResult:
    """What ``run_compare`` did: the comparison, where it wrote it, and the MLflow run it logged."""

    comparison: Comparison
    output_dir: Path
    files: list[Path] = field(default_factory=list)
    run_id: str | None = None


# ---------------------------------------------------------------------------- reading the store
def load_runs(experiment: str = DEFAULT_EXPERIMENT, *, tracking_uri: str | None = None,
              all_runs: bool = False) -> pd.DataFrame:
    """The runs of ``experiment`` as a DataFrame, one row per run.

    Gathers the experiment with that name plus runs anywhere tagged ``tlexp.experiment=<name>``
    (``mlflow run`` puts runs in 'Default'). Columns: run_id, run_name, experiment_id,
    experiment_name, status, kind, strategy, parent_run_id, start_time, end_time, then every
    param (strings, exactly as logged) and every summary metric (floats).
    By default only finished training runs are returned; ``all_runs=True`` keeps sweep parents,
    comparison runs and unfinished runs too. Raises CompareError for an unknown experiment, or
    (by default) one without finished training runs.
    """
    frame = _load_all_runs(_client(tracking_uri), experiment)
    if all_runs:
        return frame
    training, _ = select_training_runs(frame, experiment)
    return training


def load_history(experiment: str = DEFAULT_EXPERIMENT, *, tracking_uri: str | None = None,
                 runs: pd.DataFrame | None = None,
                 metrics: Sequence[str] = PER_EPOCH_METRICS) -> pd.DataFrame:
    """Per-epoch metrics in long format: run_id, strategy, seed, <GROUP_KEYS>, metric, step, value.

    ``runs`` (from ``load_runs``) skips the run search. Histories are fetched in bulk: one SQL
    query per 500 runs on a database store, parallel requests on a tracking server.
    """
    if runs is None:
        runs = load_runs(experiment, tracking_uri=tracking_uri)
    uri = _resolve_uri(tracking_uri)
    run_ids = list(runs["run_id"])
    long = _fetch_history(uri, run_ids, list(metrics))
    keys = ["run_id", "strategy", "seed", *GROUP_KEYS]
    long = long.merge(runs[keys], on="run_id", how="inner")
    return long[[*keys, "metric", "step", "value"]].sort_values(
        ["run_id", "metric", "step"], ignore_index=True)


def _client(tracking_uri: str | None) -> "MlflowClient":
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _resolve_uri(tracking_uri: str | None) -> str:
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


def _load_all_runs(client: "MlflowClient", experiment: str) -> pd.DataFrame:
    """Every active run of the named experiment plus the runs tagged with its name elsewhere."""
    names = _experiment_names(client)
    own = [eid for eid, name in names.items() if name == experiment]
    found: dict[str, Run] = {}
    if own:
        found.update((r.info.run_id, r) for r in _search_runs(client, own))
    others = [eid for eid in names if eid not in own]
    if others:
        quote = '"' if "'" in experiment else "'"
        tagged = _search_runs(client, others, f'tags."{TAG_EXPERIMENT}" = {quote}{experiment}{quote}')
        found.update((r.info.run_id, r) for r in tagged)
    if not own and not found:
        raise CompareError(
            f"Unknown experiment {experiment!r}: no experiment has that name and no run is tagged "
            f"{TAG_EXPERIMENT}={experiment!r}; existing experiments: {_name_list(names.values())}.")
    columns = ["run_id", "run_name", "experiment_id", "experiment_name", "status", "kind", "strategy",
               "parent_run_id", "start_time", "end_time", "model", "dataset"]
    return pd.DataFrame([_run_row(r, names) for r in found.values()], columns=None if found else columns)


def _name_list(names: Iterable[str], limit: int = 20) -> str:
    names = sorted(names)
    if not names:
        return "none"
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _run_row(run: "Run", experiment_names: dict[str, str]) -> dict[str, Any]:
    tags, params = run.data.tags, run.data.params
    row: dict[str, Any] = dict(params)
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
    # Runs logged before the kind tag existed still count if they name a strategy.
    is_training = (kind == KIND_TRAIN) | ((kind == "") & (frame["strategy"] != ""))
    finished = frame["status"] == "FINISHED"
    notes: list[str] = []
    unfinished = frame[is_training & ~finished]
    if len(unfinished):
        counts = unfinished["status"].value_counts().sort_index()
        detail = ", ".join(f"{n} {status}" for status, n in counts.items())
        notes.append(f"Left out {_plural(len(unfinished), 'unfinished run')} ({detail}).")
    if is_sweep.any():
        notes.append(f"Left out {_plural(int(is_sweep.sum()), 'sweep parent run')} (a sweep parent holds no "
                     f"per-epoch metrics; its child runs are compared).")
    if is_comparison.any():
        notes.append(f"Left out {_plural(int(is_comparison.sum()), 'earlier comparison run')} "
                     f"({TAG_KIND}={KIND_COMPARISON}).")
    other = ~(is_training | is_sweep | is_comparison)
    if other.any():
        notes.append(f"Left out {_plural(int(other.sum()), 'run')} that {'is' if other.sum() == 1 else 'are'} "
                     f"not a tlexp training run (no strategy tag).")
    training = frame[is_training & finished].copy()
    if training.empty:
        statuses = frame.loc[is_training, "status"].value_counts().sort_index()
        if len(statuses):
            found = "its training runs are " + ", ".join(f"{n} {status}" for status, n in statuses.items())
        else:
            found = f"it holds {_plural(len(frame), 'run')}, none of them a training run"
        raise CompareError(
            f"Experiment {experiment!r} has no FINISHED training runs to compare ({found}); "
            f"train some with `tlexp train --experiment {experiment}` or pass another --experiment.")
    outside = training[training["experiment_name"] != experiment]
    if len(outside):
        where = ", ".join(repr(n) for n in sorted(outside["experiment_name"].unique()))
        notes.append(f"Found {_plural(len(outside), 'run')} outside experiment {experiment!r} (in {where}) "
                     f"through the {TAG_EXPERIMENT} tag.")
    for key in (*GROUP_KEYS, "seed"):
        if key not in training:
            training[key] = "none"
        training[key] = training[key].fillna("none").astype(str)
    for key in (*TABLE_METRICS, "train_samples_per_class", "test_loss", "best_epoch"):
        if key not in training:
            training[key] = np.nan
    training = training.sort_values(["strategy", "seed", "run_id"], key=_sort_key, ignore_index=True)
    return training, notes


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _sort_key(values: pd.Series) -> pd.Series:
    """Sort strategies in STRATEGY_ORDER and numeric strings ('5' < '15') as numbers."""
    if values.name == "strategy":
        return values.map(lambda s: (STRATEGY_ORDER.index(s), "") if s in STRATEGY_ORDER else (99, s))
    return values.map(_natural)


def _natural(value: Any) -> tuple[int, float, str]:
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def order_strategies(strategies: Iterable[str]) -> list[str]:
    """Unique strategies in table/legend order."""
    unique = set(strategies)
    return [s for s in STRATEGY_ORDER if s in unique] + sorted(unique - set(STRATEGY_ORDER))


# ------------------------------------------------------------------------------ metric histories
def _fetch_history(uri: str, run_ids: list[str], keys: list[str]) -> pd.DataFrame:
    """run_id, metric, step, value for the given runs and keys; the last value logged per step wins."""
    columns = ["run_id", "metric", "step", "value", "timestamp"]
    if not run_ids or not keys:
        return pd.DataFrame(columns=columns[:-1])
    rows = None
    scheme = urlparse(uri).scheme.split("+")[0]
    if scheme in _DB_SCHEMES:
        rows = _history_from_database(uri, run_ids, keys)
    elif scheme in ("http", "https"):
        rows = _history_from_server(uri, run_ids, keys)
    if rows is None:
        rows = _history_from_client(_client(uri), run_ids, keys)
    frame = pd.DataFrame.from_records(rows, columns=columns)
    frame["step"] = frame["step"].astype(int)
    frame["value"] = frame["value"].astype(float)
    # A resumed run may log a step twice; keep the latest value like MLflow's own "latest metric".
    frame = frame.sort_values(["run_id", "metric", "step", "timestamp"], kind="stable")
    frame = frame.drop_duplicates(["run_id", "metric", "step"], keep="last")
    return frame.drop(columns="timestamp").reset_index(drop=True)


def _history_from_database(uri: str, run_ids: list[str], keys: list[str]) -> list[tuple] | None:
    """All histories in one query per chunk of runs, straight from MLflow's ``metrics`` table.

    MLflow's client has no bulk history call for database stores (one request per run and key
    would be 200 x 7 round trips); the ``metrics`` table layout has been stable since MLflow 1.x.
    Returns None when the database cannot be read this way, so the caller falls back to the client.
    """
    try:
        import sqlalchemy as sa

        engine = sa.create_engine(uri)
    except Exception:  # missing driver, unusual URI: the client path still works
        return None
    query = sa.text(
        "SELECT run_uuid, key, step, value, is_nan, timestamp FROM metrics "
        "WHERE run_uuid IN :run_ids AND key IN :keys"
    ).bindparams(sa.bindparam("run_ids", expanding=True), sa.bindparam("keys", expanding=True))
    rows: list[tuple] = []
    try:
        with engine.connect() as conn:
            for start in range(0, len(run_ids), _SQL_CHUNK):
                result = conn.execute(query, {"run_ids": run_ids[start:start + _SQL_CHUNK], "keys": keys})
                rows.extend((run_id, key, step, math.nan if is_nan else value, ts)
                            for run_id, key, step, value, is_nan, ts in result)
    except sa.exc.SQLAlchemyError:
        return None
    finally:
        engine.dispose()
    return rows


def _history_from_server(uri: str, run_ids: list[str], keys: list[str]) -> list[tuple] | None:
    """Histories from a tracking server's bulk endpoint: one request per metric and 100 runs.

    The MLflow server answers ``metrics/get-history-bulk-interval`` for up to 100 runs at once
    (the Python client has no wrapper for it). It samples histories longer than 2,500 steps, so
    such (run, metric) pairs are fetched again in full. Returns None when the server lacks the
    endpoint or refuses it, so the caller falls back to one request per run and metric.
    """
    try:
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request

        creds = get_default_host_creds(uri)
    except Exception:  # the helpers moved: use the public client instead
        return None

    def fetch(job: tuple[str, list[str]]) -> list[dict[str, Any]] | None:
        key, chunk = job
        response = http_request(creds, _BULK_ENDPOINT, "GET", max_retries=2, raise_on_status=False,
                                params={"run_ids": chunk, "metric_key": key, "max_results": _BULK_MAX_STEPS})
        return response.json().get("metrics", []) if response.status_code == 200 else None

    jobs = [(key, run_ids[i:i + _BULK_MAX_RUNS]) for key in keys for i in range(0, len(run_ids), _BULK_MAX_RUNS)]
    try:
        with ThreadPoolExecutor(max_workers=HISTORY_THREADS) as pool:
            answers = list(pool.map(fetch, jobs))
    except Exception:
        return None
    if any(answer is None for answer in answers):
        return None
    rows = [(m["run_id"], m["key"], int(m.get("step", 0)), float(m.get("value", math.nan)), int(m.get("timestamp", 0)))
            for answer in answers for m in answer]
    counts: dict[tuple[str, str], int] = {}
    for run_id, key, *_ in rows:
        counts[(run_id, key)] = counts.get((run_id, key), 0) + 1
    sampled = {pair for pair, n in counts.items() if n >= _BULK_MAX_STEPS}
    if sampled:  # rare: more steps than the endpoint returns; fetch those pairs whole
        rows = [r for r in rows if (r[0], r[1]) not in sampled]
        rows += _history_from_client(_client(uri), sorted({p[0] for p in sampled}), sorted({p[1] for p in sampled}))
    return rows


def _history_from_client(client: "MlflowClient", run_ids: list[str], keys: list[str]) -> list[tuple]:
    """One get_metric_history per run and key, concurrently: the fallback for any other store."""
    pairs = [(run_id, key) for run_id in run_ids for key in keys]
    with ThreadPoolExecutor(max_workers=HISTORY_THREADS) as pool:
        histories = pool.map(lambda pair: client.get_metric_history(*pair), pairs)
        return [(run_id, key, m.step, m.value, m.timestamp)
                for (run_id, key), history in zip(pairs, histories) for m in history]


# ------------------------------------------------------------------------------- per-run numbers
def run_stats(runs: pd.DataFrame, history: pd.DataFrame, *,
              target_fraction: float = TARGET_FRACTION) -> pd.DataFrame:
    """One row per run with every TABLE_METRICS number, plus epochs_logged and train_samples_per_class.

    Summary metrics are used when logged; the per-epoch history fills the gaps and gives what
    the summary cannot: epochs and seconds until val acc first reaches ``target_fraction`` of
    the run's own best.
    """
    runs = runs.reset_index(drop=True)
    stats = runs[["run_id", "strategy", "seed", *GROUP_KEYS]].copy()
    derived = pd.DataFrame([_curve_stats(run_id, curves, target_fraction)
                            for run_id, curves in _curves_by_run(history)])
    derived = derived.set_index("run_id").reindex(runs["run_id"]) if not derived.empty else pd.DataFrame()

    def logged(name: str) -> np.ndarray:
        return _numeric_param(runs, name).to_numpy(dtype=float)

    def from_curves(name: str) -> np.ndarray:
        return derived[name].to_numpy(dtype=float) if name in derived else np.full(len(runs), np.nan)

    for name in ("best_val_acc", "final_val_acc", "final_train_acc", "total_time_s", "avg_epoch_time_s"):
        summary = logged(name)  # the summary wins; the curves fill runs that did not log it
        stats[name] = np.where(np.isnan(summary), from_curves(name), summary)
    for name in ("test_acc", "params_trainable", "params_total", "trainable_fraction"):
        stats[name] = logged(name)
    for name in ("epochs_to_target", "seconds_to_target", "epochs_logged"):
        stats[name] = from_curves(name)
    stats["train_val_gap"] = stats["final_train_acc"] - stats["final_val_acc"]
    per_class = logged("train_samples_per_class")
    with np.errstate(divide="ignore", invalid="ignore"):
        from_sizes = logged("train_size") / logged("num_classes")
    stats["train_samples_per_class"] = np.where(np.isnan(per_class), from_sizes, per_class)
    stats["train_samples_per_class"] = stats["train_samples_per_class"].replace([np.inf, -np.inf], np.nan)
    return stats


def _numeric_param(runs: pd.DataFrame, name: str) -> pd.Series:
    """A param or metric column as floats ('none', missing column -> NaN)."""
    if name not in runs:
        return pd.Series(np.nan, index=runs.index)
    return pd.to_numeric(runs[name], errors="coerce").astype(float)


def _curves_by_run(history: pd.DataFrame) -> Iterable[tuple[str, pd.DataFrame]]:
    """(run_id, wide frame indexed by step with one column per metric) for every run."""
    if history.empty:
        return []
    wide = history.pivot_table(index=["run_id", "step"], columns="metric", values="value", aggfunc="last")
    return ((run_id, frame.droplevel(0)) for run_id, frame in wide.groupby(level=0))


def _curve_stats(run_id: str, curves: pd.DataFrame, target_fraction: float) -> dict[str, Any]:
    row: dict[str, Any] = {"run_id": run_id, "epochs_logged": int(curves.index.max())}
    val = curves["val_acc"].dropna() if "val_acc" in curves else pd.Series(dtype=float)
    times = curves["epoch_time_s"] if "epoch_time_s" in curves else pd.Series(np.nan, index=curves.index)
    if "train_acc" in curves and curves["train_acc"].notna().any():
        row["final_train_acc"] = curves["train_acc"].dropna().iloc[-1]
    if times.notna().any():
        row["total_time_s"] = times.sum()
        row["avg_epoch_time_s"] = times.mean()
    if not val.empty:
        row["best_val_acc"] = val.max()
        row["final_val_acc"] = val.iloc[-1]
        step = first_step_reaching(val, target_fraction * val.max())
        row["epochs_to_target"] = float(step)
        row["seconds_to_target"] = seconds_until(times, step)
    return row


def first_step_reaching(val_acc: pd.Series, target: float) -> int:
    """First step (epoch) whose value reaches ``target``; the series is indexed by step.

    The target is at most the series' maximum, so it is always reached; a run that never
    improves reaches 95% of its flat best in its first epoch, which is the honest answer.
    """
    reached = val_acc.index[val_acc.to_numpy() >= target - 1e-12]
    return int(reached[0]) if len(reached) else int(val_acc.index[-1])


def seconds_until(epoch_time_s: pd.Series, step: int) -> float:
    """Training seconds from the start until the end of epoch ``step`` (NaN if a time is missing)."""
    upto = epoch_time_s[epoch_time_s.index <= step]
    if upto.empty or upto.isna().any():
        return math.nan
    return float(upto.sum())


# ------------------------------------------------------------------------------- aggregation
def varying_keys(stats: pd.DataFrame) -> tuple[list[str], dict[str, str]]:
    """Split GROUP_KEYS into those that differ between runs and those shared (with their value)."""
    varying = [k for k in GROUP_KEYS if stats[k].nunique() > 1]
    shared = {k: str(stats[k].iloc[0]) for k in GROUP_KEYS if k not in varying}
    return varying, shared


def summarize(stats: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """One row per (group, strategy): n_runs, seeds, and <metric>_mean / <metric>_std over seeds.

    Only runs equal in every ``keys`` column are averaged; std is NaN for a single run.
    """
    by = [*keys, "strategy"]
    grouped = stats.groupby(by, sort=False)
    agg = grouped[list(TABLE_METRICS)].agg(["mean", "std"])
    agg.columns = [f"{metric}_{stat}" for metric, stat in agg.columns]
    agg.insert(0, "n_runs", grouped.size())
    agg.insert(1, "seeds", grouped["seed"].agg(lambda s: ",".join(sorted(s, key=_natural))))
    table = agg.reset_index()
    return table.sort_values(by, key=_sort_key, ignore_index=True)


def group_label(row: pd.Series | dict[str, Any], keys: Sequence[str]) -> str:
    """'epochs=15, samples_per_class=all' for the varying keys of one group ('' when none vary)."""
    return ", ".join(f"{k}={display_value(k, row[k])}" for k in keys)


def display_value(key: str, value: Any) -> str:
    if key == "samples_per_class" and value == "none":
        return "all"
    return str(value)


def iter_groups(frame: pd.DataFrame, keys: Sequence[str]) -> Iterable[tuple[str, pd.DataFrame]]:
    """(label, rows) per group of ``keys``, in natural order; one unnamed group when keys is empty."""
    if not keys:
        yield "", frame
        return
    for _, rows in frame.groupby(list(keys), sort=False):
        yield group_label(rows.iloc[0], keys), rows


# ------------------------------------------------------------------------------------ findings
def pct(fraction: float) -> str:
    return f"{100 * fraction:.1f}%"


def points(fraction: float) -> str:
    """A difference of accuracies in percentage points."""
    return f"{100 * fraction:.1f} points"


def _seconds(value: float) -> str:
    return f"{value:,.1f} s"


def accuracy_metric(rows: pd.DataFrame) -> str:
    """Test accuracy when every row has it (unbiased), else best validation accuracy."""
    return "test_acc" if rows["test_acc_mean"].notna().all() else "best_val_acc"


METRIC_WORDS = {"test_acc": "test accuracy", "best_val_acc": "best validation accuracy"}


def accuracy_findings(rows: pd.DataFrame) -> list[str]:
    """Who wins on accuracy, by how much, and whether that beats the spread over seeds."""
    metric = accuracy_metric(rows)
    words = METRIC_WORDS[metric]
    ranked = rows.sort_values(f"{metric}_mean", ascending=False, kind="stable")
    top = ranked.iloc[0]
    if len(ranked) == 1:
        return [f"Only {top.strategy} was run here ({words} {pct(top[f'{metric}_mean'])}"
                f"{_spread(top, metric)}); there is no other strategy to compare it with."]
    second = ranked.iloc[1]
    diff = top[f"{metric}_mean"] - second[f"{metric}_mean"]
    lines = []
    if abs(diff) < 5e-5:  # equal to the display precision
        lines.append(f"{top.strategy} and {second.strategy} tie on {words} ({pct(top[f'{metric}_mean'])}).")
    else:
        lines.append(f"{top.strategy} has the highest {words}, {pct(top[f'{metric}_mean'])}{_spread(top, metric)}, "
                     f"{points(diff)} above {second.strategy} ({pct(second[f'{metric}_mean'])}"
                     f"{_spread(second, metric)}).")
    stds = [top[f"{metric}_std"], second[f"{metric}_std"]]
    known = [s for s in stds if not math.isnan(s)]
    if not known:
        lines.append("With a single run per strategy the spread over seeds is unknown, so this difference "
                     "is not yet evidence; repeat the runs with other seeds.")
    else:
        spread = max(known)
        caveat = "" if len(known) == 2 else " (one of them has a single run, so its spread is unknown)"
        if abs(diff) > spread:
            lines.append(f"The difference is larger than the spread over seeds (std up to {points(spread)})"
                         f"{caveat}, so it is unlikely to be seed noise.")
        else:
            lines.append(f"The difference is within the spread over seeds (std up to {points(spread)}){caveat}, "
                         f"so the two are not reliably different.")
    if len(ranked) > 2:
        lines.append("Ranking: " + ", ".join(f"{s} {pct(v)}" for s, v in
                                              zip(ranked["strategy"], ranked[f"{metric}_mean"])) + ".")
    return lines


def _spread(row: pd.Series, metric: str) -> str:
    std = row[f"{metric}_std"]
    if math.isnan(std):
        return f", {_plural(int(row.n_runs), 'run')}"
    return f" ± {100 * std:.1f} over {int(row.n_runs)} runs"


def convergence_findings(rows: pd.DataFrame, history: pd.DataFrame, stats: pd.DataFrame,
                         *, target_fraction: float = TARGET_FRACTION) -> list[str]:
    """Epochs and seconds to 95% of each strategy's own best, and to one common target."""
    share = f"{100 * target_fraction:.0f}%"
    rows = rows[rows["epochs_to_target_mean"].notna()]
    if rows.empty:
        return ["No validation curve was logged, so convergence cannot be measured."]
    parts = []
    for r in rows.itertuples():
        secs = "" if math.isnan(r.seconds_to_target_mean) else f", {_seconds(r.seconds_to_target_mean)}"
        parts.append(f"{r.strategy} {r.epochs_to_target_mean:.1f} epochs{secs}")
    lines = [f"Epochs (and training seconds) until validation accuracy first reaches {share} of the run's "
             f"own best, mean over seeds: " + "; ".join(parts) + "."]
    if len(rows) > 1:
        lines.append(_fastest(rows, "epochs_to_target_mean", "in the fewest epochs", lambda v: f"{v:.1f} epochs"))
        if rows["seconds_to_target_mean"].notna().all():
            lines.append(_fastest(rows, "seconds_to_target_mean", "in the least training time", _seconds))
        lines.extend(_common_target(rows, history, stats, target_fraction))
    return [line for line in lines if line]


def _fastest(rows: pd.DataFrame, column: str, how: str, fmt: Any) -> str:
    ordered = rows.sort_values(column, kind="stable")
    best = ordered[column].iloc[0]
    tied = ordered[ordered[column] == best]
    rest = ordered[ordered[column] != best]
    if rest.empty:
        return f"All strategies get there equally fast ({fmt(best)})."
    others = ", ".join(f"{s} {fmt(v)}" for s, v in zip(rest["strategy"], rest[column]))
    who = " and ".join(tied["strategy"])
    verb = "gets" if len(tied) == 1 else "get"
    return f"{who} {verb} there {how} ({fmt(best)}, against {others})."


def _common_target(rows: pd.DataFrame, history: pd.DataFrame, stats: pd.DataFrame,
                   target_fraction: float) -> list[str]:
    """Time to one accuracy every strategy can reach: own-best targets favour low plateaus."""
    target = target_fraction * rows["best_val_acc_mean"].min()
    run_ids = stats.loc[stats["strategy"].isin(rows["strategy"]) & stats["run_id"].isin(history["run_id"]),
                        ["run_id", "strategy"]]
    if run_ids.empty:
        return []
    curves = dict(_curves_by_run(history[history["run_id"].isin(run_ids["run_id"])]))
    parts = []
    for strategy in order_strategies(run_ids["strategy"]):
        epochs, seconds, missed = [], [], 0
        for run_id in run_ids.loc[run_ids["strategy"] == strategy, "run_id"]:
            curve = curves.get(run_id)
            if curve is None or "val_acc" not in curve:
                continue
            val = curve["val_acc"].dropna()
            if val.empty or val.max() < target - 1e-12:
                missed += 1
                continue
            step = first_step_reaching(val, target)
            epochs.append(step)
            if "epoch_time_s" in curve:
                seconds.append(seconds_until(curve["epoch_time_s"], step))
        if not epochs:
            parts.append(f"{strategy} never reaches it")
            continue
        secs = [s for s in seconds if not math.isnan(s)]
        text = f"{strategy} {np.mean(epochs):.1f} epochs"
        if secs and len(secs) == len(epochs):
            text += f" ({_seconds(float(np.mean(secs)))})"
        if missed:
            text += f", but {missed} of {missed + len(epochs)} runs never reach it"
        parts.append(text)
    return [f"To a common target of {pct(target)} validation accuracy ({100 * target_fraction:.0f}% of the "
            f"lowest strategy's best): " + "; ".join(parts) + "."]


def cost_findings(rows: pd.DataFrame) -> list[str]:
    """Seconds per epoch, total time and trainable parameters, with a ratio only when it is defined."""
    lines = []
    timed = rows[rows["avg_epoch_time_s_mean"].notna()].sort_values("avg_epoch_time_s_mean", kind="stable")
    if not timed.empty:
        lines.append("Average time per epoch: " + ", ".join(
            f"{r.strategy} {_seconds(r.avg_epoch_time_s_mean)} (total {_seconds(r.total_time_s_mean)})"
            for r in timed.itertuples()) + ".")
        cheap, dear = timed.iloc[0], timed.iloc[-1]
        if len(timed) > 1 and cheap.avg_epoch_time_s_mean > 0 and dear.strategy != cheap.strategy:
            ratio = dear.avg_epoch_time_s_mean / cheap.avg_epoch_time_s_mean
            if ratio >= 1.05:
                lines.append(f"{cheap.strategy} is {ratio:.1f}x cheaper per epoch than {dear.strategy}.")
            else:
                lines.append("Per-epoch cost is about the same for every strategy (within 5%).")
    counted = rows[rows["params_trainable_mean"].notna()]
    if not counted.empty:
        parts = []
        for r in counted.itertuples():
            frac = r.trainable_fraction_mean
            if math.isnan(frac) and r.params_total_mean > 0:
                frac = r.params_trainable_mean / r.params_total_mean
            share = "" if math.isnan(frac) else f" ({100 * frac:.1f}% of {r.params_total_mean:,.0f})"
            parts.append(f"{r.strategy} {r.params_trainable_mean:,.0f}{share}")
        lines.append("Trainable parameters: " + ", ".join(parts) + ".")
    return lines


def overfitting_findings(rows: pd.DataFrame) -> list[str]:
    """The train-val gap at the last epoch: who generalises best and who overfits."""
    gaps = rows[rows["train_val_gap_mean"].notna()].sort_values("train_val_gap_mean", kind="stable")
    if gaps.empty:
        return []
    lines = ["Train-val accuracy gap at the last epoch: " + ", ".join(
        f"{r.strategy} {points(r.train_val_gap_mean)}" for r in gaps.itertuples()) + "."]
    if len(gaps) > 1:
        best, worst = gaps.iloc[0], gaps.iloc[-1]
        if best.train_val_gap_mean < 0:
            # Training accuracy is measured on augmented images with dropout on, so a negative gap
            # says the regularisation is strong, not that one strategy generalises "better".
            lines.append("A negative gap means validation accuracy is above training accuracy, which is "
                         "measured on augmented images with dropout on: no sign of overfitting.")
        elif worst.train_val_gap_mean - best.train_val_gap_mean >= 5e-4:
            lines.append(f"{best.strategy} generalises best (smallest gap); {worst.strategy} has the largest.")
    over = gaps[gaps["train_val_gap_mean"] > OVERFIT_GAP]
    if not over.empty:
        lines.append(f"{' and '.join(over['strategy'])} overfit{'s' if len(over) == 1 else ''}: a gap above "
                     f"{points(OVERFIT_GAP)} means the model fits the training set much better than new images.")
    elif len(gaps):
        lines.append(f"No strategy overfits noticeably (every gap is at most {points(OVERFIT_GAP)}).")
    return lines


def findings(table: pd.DataFrame, keys: Sequence[str], history: pd.DataFrame,
             stats: pd.DataFrame) -> list[Section]:
    """Plain-language findings per group, every figure taken from the table or the curves."""
    sections = []
    runs_of = dict(iter_groups(stats, keys))
    for label, rows in iter_groups(table, keys):
        group_runs = runs_of[label]
        group_history = history[history["run_id"].isin(group_runs["run_id"])]
        prefix = f" ({label})" if label else ""
        sections.append(Section(f"Accuracy{prefix}", accuracy_findings(rows)))
        sections.append(Section(f"Convergence{prefix}", convergence_findings(rows, group_history, group_runs)))
        sections.append(Section(f"Compute cost{prefix}", cost_findings(rows)))
        sections.append(Section(f"Overfitting{prefix}", overfitting_findings(rows)))
    return [s for s in sections if s.lines]


# ----------------------------------------------------------------------- data efficiency (sweeps)
def data_efficiency(stats: pd.DataFrame, keys: Sequence[str]) -> tuple[
        pd.DataFrame | None, pd.DataFrame | None, str, list[Section]]:
    """Accuracy against training samples per class, when the runs differ in training-set size.

    Returns (per-size table, paired-by-seed table, accuracy metric, findings), or Nones when the
    runs all have one size. A family is a set of runs equal in every varying key but the size.
    """
    sized = stats.assign(size=stats["train_samples_per_class"].round(6)).dropna(subset=["size"])
    if sized["size"].nunique() < 2:
        return None, None, "best_val_acc", []
    metric = "test_acc" if sized["test_acc"].notna().all() else "best_val_acc"
    family_keys = [k for k in keys if k not in SIZE_KEYS]
    tables, pairs, sections = [], [], []
    for label, family in iter_groups(sized, family_keys):
        if family["size"].nunique() < 2:
            continue
        per_size = (family.groupby(["size", "strategy"])[metric].agg(["mean", "std", "count"])
                    .rename(columns={"count": "n"}).reset_index())
        for k in family_keys:
            per_size.insert(0, k, family.iloc[0][k])
        tables.append(per_size)
        pairs.append(_paired(family, metric, family_keys))
        title = f"Data efficiency ({label})" if label else "Data efficiency"
        sections.append(Section(title, [crossover(per_size, metric), *_paired_lines(pairs[-1])]))
    if not tables:
        return None, None, metric, []
    order = [*family_keys, "size", "strategy"]
    table = pd.concat(tables, ignore_index=True).sort_values(order, key=_sort_key, ignore_index=True)
    paired = pd.concat(pairs, ignore_index=True)
    return table, paired, metric, sections


def _paired(family: pd.DataFrame, metric: str, family_keys: Sequence[str]) -> pd.DataFrame:
    """Per size and strategy pair: the difference on the same seed, averaged over seeds."""
    wide = family.pivot_table(index=["size", "seed"], columns="strategy", values=metric, aggfunc="mean")
    strategies = order_strategies(wide.columns)
    rows = []
    for i, first in enumerate(strategies):
        for second in strategies[i + 1:]:
            diff = (wide[first] - wide[second]).dropna()
            for size, d in diff.groupby(level="size"):
                rows.append({"size": size, "strategy": first, "versus": second, "mean_diff": d.mean(),
                             "std_diff": d.std(), "n_pairs": len(d)})
    frame = pd.DataFrame(rows, columns=["size", "strategy", "versus", "mean_diff", "std_diff", "n_pairs"])
    for k in family_keys:
        frame.insert(0, k, family.iloc[0][k])
    return frame


def _paired_lines(paired: pd.DataFrame) -> list[str]:
    """Each strategy against scratch, paired by seed, at the smallest and the largest size."""
    lines = []
    for strategy, rows in paired[paired["versus"] == SCRATCH].groupby("strategy", sort=False):
        rows = rows.sort_values("size")
        ends = rows.iloc[[0, -1]] if len(rows) > 1 else rows
        parts = [f"{100 * r.mean_diff:+.1f}{'' if math.isnan(r.std_diff) else f' ± {100 * r.std_diff:.1f}'} "
                 f"points at {r.size:g} per class ({_plural(int(r.n_pairs), 'seed')})" for r in ends.itertuples()]
        lines.append(f"Paired by seed, {strategy} minus scratch: " + " and ".join(parts) + ".")
    return lines


def crossover(per_size: pd.DataFrame, metric: str) -> str:
    """The smallest size at which scratch comes within one std of the best pretrained strategy.

    The std is the pretrained strategy's spread over seeds at that size (scratch's when the
    pretrained one has a single run; zero when both do, i.e. scratch must match it).
    """
    words = METRIC_WORDS[metric]
    sizes = sorted(per_size["size"].unique())
    scratch = per_size[per_size["strategy"] == SCRATCH].set_index("size")
    pretrained = per_size[per_size["strategy"] != SCRATCH]
    if scratch.empty or pretrained.empty:
        missing = "scratch" if scratch.empty else "pretrained (transfer or finetune)"
        return f"No crossover can be computed: the sweep has no {missing} runs."
    last_gap = None
    for size in sizes:
        if size not in scratch.index:
            continue
        here = pretrained[pretrained["size"] == size]
        if here.empty:
            continue
        best = here.sort_values("mean", ascending=False, kind="stable").iloc[0]
        mine = scratch.loc[size]
        spread = best["std"] if not math.isnan(best["std"]) else mine["std"]
        spread = 0.0 if math.isnan(spread) else spread
        gap = best["mean"] - mine["mean"]
        last_gap = (size, gap, best)
        if gap <= spread + 1e-12:
            return (f"Scratch first comes within one standard deviation of the best pretrained strategy at "
                    f"{size:g} training samples per class ({words}: scratch {pct(mine['mean'])}, "
                    f"{best['strategy']} {pct(best['mean'])}, std {points(spread)}).")
    measured = f"{sizes[0]:g}-{sizes[-1]:g} training samples per class"
    if last_gap is None:
        return f"No crossover can be computed: scratch and pretrained runs share no training-set size ({measured})."
    size, gap, best = last_gap
    return (f"Scratch never comes within one standard deviation of the best pretrained strategy in the measured "
            f"range ({measured}); at {size:g} per class it is still {points(gap)} behind {best['strategy']} "
            f"({words}).")


# ------------------------------------------------------------------------------ the whole thing
def build_comparison(experiment: str, runs: pd.DataFrame, history: pd.DataFrame,
                     notes: Sequence[str] = ()) -> Comparison:
    """Aggregate and interpret already-loaded runs (no I/O): the core of ``run_compare``."""
    stats = run_stats(runs, history)
    keys, shared = varying_keys(stats)
    table = summarize(stats, keys)
    sections = findings(table, keys, history, stats)
    efficiency, paired, eff_metric, eff_sections = data_efficiency(stats, keys)
    notes = list(notes)
    if keys:
        notes.append(f"Runs differ in {', '.join(keys)}; each row averages only runs with equal settings "
                     f"(over seeds).")
    short = stats[stats["epochs_logged"] < pd.to_numeric(stats["epochs"], errors="coerce")]
    if len(short):
        notes.append(f"{_plural(len(short), 'run')} logged fewer epochs than configured; curves are "
                     f"averaged per epoch over the runs that reached it.")
    return Comparison(experiment=experiment, runs=runs, history=history, stats=stats, table=table,
                      group_keys=keys, shared=shared, findings=[*sections, *eff_sections], notes=notes,
                      efficiency=efficiency, paired=paired, efficiency_metric=eff_metric)


def default_output_dir(experiment: str) -> Path:
    """reports/<experiment>/ with the name made safe for a folder."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return Path("reports") / safe


def parse_formats(formats: str | Sequence[str]) -> tuple[str, ...]:
    """'md,csv' or ['md', 'csv'] -> ('md', 'csv'); CompareError names an unknown one."""
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    chosen = tuple(dict.fromkeys(f.strip().lower() for f in items if f.strip()))
    bad = [f for f in chosen if f not in FORMATS]
    if bad or not chosen:
        raise CompareError(f"Unknown report format {', '.join(map(repr, bad)) or repr('')}; "
                           f"expected a comma-separated list of: {', '.join(FORMATS)}.")
    return chosen


def check_output_dir(path: Path) -> None:
    """Raise CompareError unless ``path`` is, or can be created as, a writable directory."""
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise CompareError(f"Cannot write the report to {str(path)!r}: {str(probe)!r} is a file, not a folder; "
                           f"pass --output a writable folder.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CompareError(f"Cannot write the report to {str(path)!r}: {str(probe)!r} is not writable; "
                           f"pass --output a writable folder.")


def run_compare(experiment: str = DEFAULT_EXPERIMENT, *, output: str | os.PathLike[str] | None = None,
                formats: str | Sequence[str] = FORMATS, tracking_uri: str | None = None,
                log_to_mlflow: bool = True, console: "Console | None" = None) -> CompareResult:
    """Compare the strategies of ``experiment``: table, charts, findings, report files, MLflow run.

    Reads only the tracking store. Writes the report to ``output`` (default reports/<experiment>/),
    prints the table and findings to ``console`` (default: stdout), and logs the files as one run
    tagged tlexp.kind=comparison unless ``log_to_mlflow`` is False. Raises CompareError for a bad
    format, an unwritable output folder (before anything is written), an unknown experiment, or
    one without finished training runs.
    """
    from tlexp import report

    chosen = parse_formats(formats)
    out_dir = Path(output) if output is not None else default_output_dir(experiment)
    check_output_dir(out_dir)
    client = _client(tracking_uri)
    all_runs = _load_all_runs(client, experiment)
    runs, notes = select_training_runs(all_runs, experiment)
    history = load_history(experiment, tracking_uri=_resolve_uri(tracking_uri), runs=runs)
    comparison = build_comparison(experiment, runs, history, notes)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        files = report.write_report(comparison, out_dir, formats=chosen)
    except OSError as exc:
        raise CompareError(f"Cannot write the report to {str(out_dir)!r} ({exc.strerror or exc}); "
                           f"pass --output a writable folder.") from exc
    result = CompareResult(comparison=comparison, output_dir=out_dir, files=files)
    console = report.print_report(result, console=console)  # before logging: a store error keeps the report
    if log_to_mlflow:
        result.run_id = log_comparison_run(client, comparison, files)
        console.print(f"Logged to MLflow as run {result.run_id} ({TAG_KIND}={KIND_COMPARISON}).", highlight=False)
    return result


def log_comparison_run(client: "MlflowClient", comparison: Comparison, files: Sequence[Path]) -> str:
    """Log the report files as one FINISHED run tagged tlexp.kind=comparison; never left RUNNING."""
    experiment = comparison.experiment
    found = client.get_experiment_by_name(experiment)
    if found is not None and found.lifecycle_stage != "active":
        raise CompareError(f"Experiment {experiment!r} is deleted, so the report cannot be logged to it; "
                           f"restore it, or pass --no-log.")
    exp_id = found.experiment_id if found is not None else client.create_experiment(experiment)
    tags = {TAG_KIND: KIND_COMPARISON, TAG_EXPERIMENT: experiment, "mlflow.runName": "comparison"}
    run_id = client.create_run(exp_id, run_name="comparison", tags=tags).info.run_id
    try:
        from mlflow.entities import Param

        client.log_batch(run_id, params=[
            Param("runs_compared", str(len(comparison.runs))),
            Param("strategies", ",".join(order_strategies(comparison.runs["strategy"]))),
            Param("group_keys", ",".join(comparison.group_keys) or "none"),
        ])
        for path in files:
            client.log_artifact(run_id, str(path))
    except BaseException as exc:  # Ctrl-C included: the run must not stay RUNNING
        client.set_terminated(run_id, status="FAILED" if isinstance(exc, Exception) else "KILLED")
        if not isinstance(exc, Exception):
            raise
        raise CompareError(f"The report was written, but logging it to MLflow failed ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}); pass --no-log to skip it.") from exc
    client.set_terminated(run_id, status="FINISHED")
    return run_id


__all__ = ["CompareError", "Comparison", "CompareResult", "Section", "load_runs", "load_history", "run_stats",
           "summarize", "build_comparison", "run_compare", "GROUP_KEYS", "PER_EPOCH_METRICS", "TABLE_METRICS"]
