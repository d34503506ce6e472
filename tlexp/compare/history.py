"""Per-epoch metric histories of many runs, fetched in bulk (one SQL query per 500 runs on a database store,
MLflow's bulk endpoint on a tracking server, concurrent requests elsewhere)."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Sequence
from urllib.parse import urlparse

import pandas as pd

from tlexp.compare.read import client_for, load_runs, resolve_uri
from tlexp.config import DEFAULT_EXPERIMENT

if TYPE_CHECKING:
    from mlflow import MlflowClient

PER_EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "epoch_time_s", "lr",
                     "train_samples_per_s")
HISTORY_KEYS = ("run_id", "strategy", "seed", "model", "dataset")  # run columns repeated on every history row
HISTORY_THREADS = 8  # parallel get_metric_history requests when the store is a server
_SQL_CHUNK = 500  # run ids per IN (...) query, well under SQLite's bound-parameter limit
_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
_BULK_ENDPOINT = "/api/2.0/mlflow/metrics/get-history-bulk-interval"
_BULK_MAX_RUNS = 100  # the server's limit of run ids per bulk request
_BULK_MAX_STEPS = 2500  # the server's limit of points per run; longer histories come back sampled


def load_history(experiment: str = DEFAULT_EXPERIMENT, *, tracking_uri: str | None = None,
                 runs: pd.DataFrame | None = None,
                 metrics: Sequence[str] = PER_EPOCH_METRICS) -> pd.DataFrame:
    """Per-epoch metrics in long format: run_id, strategy, seed, model, dataset, metric, step, value.

    ``runs`` (from ``load_runs``) skips the run search. Histories are fetched in bulk: one SQL
    query per 500 runs on a database store, parallel requests on a tracking server.
    """
    if runs is None:
        runs = load_runs(experiment, tracking_uri=tracking_uri)
    uri = resolve_uri(tracking_uri)
    long = fetch_history(uri, list(runs["run_id"]), list(metrics))
    keys = list(HISTORY_KEYS)
    long = long.merge(runs[keys], on="run_id", how="inner")
    return long[[*keys, "metric", "step", "value"]].sort_values(
        ["run_id", "metric", "step"], ignore_index=True)


def fetch_history(uri: str, run_ids: list[str], keys: list[str]) -> pd.DataFrame:
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
        rows = history_from_client(client_for(uri), run_ids, keys)
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
        rows += history_from_client(client_for(uri), sorted({p[0] for p in sampled}), sorted({p[1] for p in sampled}))
    return rows


def history_from_client(client: "MlflowClient", run_ids: list[str], keys: list[str]) -> list[tuple]:
    """One get_metric_history per run and key, concurrently: the fallback for any other store."""
    pairs = [(run_id, key) for run_id in run_ids for key in keys]
    with ThreadPoolExecutor(max_workers=HISTORY_THREADS) as pool:
        histories = pool.map(lambda pair: client.get_metric_history(*pair), pairs)
        return [(run_id, key, m.step, m.value, m.timestamp)
                for (run_id, key), history in zip(pairs, histories) for m in history]

