"""Write tlexp-shaped runs straight into an MLflow store, without training anything.

Used by tests/test_compare.py, tests/test_plots.py and benchmarks/bench_compare.py: each fake
run carries exactly what the logging contract promises (tags, the grouping params, per-epoch
metrics with step = epoch, summary metrics at step 0), with values the caller chooses.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

_T0_MS = 1_700_000_000_000  # fixed timestamps keep the stores reproducible
_TEMPLATE: Path | None = None


def new_store(folder: Path) -> str:
    """A fresh, empty SQLite tracking store in ``folder``; returns its URI.

    Creating MLflow's schema (alembic migrations) takes seconds, so an empty database is made
    once per MLflow version, kept in the temp folder across test sessions, and copied.
    """
    global _TEMPLATE
    if _TEMPLATE is None:
        template = Path(tempfile.gettempdir()) / f"tlexp-empty-mlflow-{mlflow.__version__}.db"
        if not template.exists():
            work = Path(tempfile.mkdtemp(prefix="tlexp-store-")) / "empty.db"
            MlflowClient(tracking_uri=f"sqlite:///{work}").search_experiments()
            os.replace(work, template)  # atomic: a parallel session sees all or nothing
        _TEMPLATE = template
    path = Path(folder) / "mlflow.db"
    shutil.copyfile(_TEMPLATE, path)
    return f"sqlite:///{path}"


@contextlib.contextmanager
def temporary_store() -> Iterator[str]:
    """An empty store in memory-backed storage when there is some (/dev/shm), removed afterwards.

    Every MLflow write is a SQLite commit; on a real disk each one waits for fsync, which makes
    a test that logs twenty runs several times slower for no benefit.
    """
    ram = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    folder = Path(tempfile.mkdtemp(prefix="tlexp-test-", dir=ram))
    try:
        yield new_store(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def log_fake_run(
    client: MlflowClient,
    experiment_id: str,
    *,
    strategy: str,
    val_acc: Sequence[float],
    seed: int = 0,
    train_acc: Sequence[float] | None = None,
    train_loss: Sequence[float] | None = None,
    val_loss: Sequence[float] | None = None,
    epoch_time_s: float | Sequence[float] = 1.0,
    test_acc: float | None = None,
    model: str = "efficientnet_lite0",
    dataset: str = "digits",
    epochs: int | None = None,
    samples_per_class: int | None = None,
    train_fraction: float = 1.0,
    image_size: int = 64,
    head: str = "mlp",
    num_classes: int = 10,
    train_size: int = 1000,
    params_total: int = 1_000_000,
    params_trainable: int | None = None,
    status: str = "FINISHED",
    kind: str = "train",
    experiment_tag: str | None = "tl-vs-scratch",
    parent_run_id: str | None = None,
    summary: bool = True,
    lr: float = 1e-3,
    data_fingerprint: str | None = None,
    started_s: float = 0.0,
    params: dict[str, str] | None = None,
) -> str:
    """Log one fake training run and return its run id.

    ``val_acc`` sets the number of epochs logged; the other curves default to simple functions
    of it (train acc 5 points above val acc, losses falling). ``epochs`` is the configured
    number of epochs (a param), which may be larger than what was logged. ``started_s`` shifts the
    start time (which of two runs is newer); ``params`` adds or overrides params.
    """
    n = len(val_acc)
    train_acc = list(train_acc) if train_acc is not None else [min(1.0, v + 0.05) for v in val_acc]
    train_loss = list(train_loss) if train_loss is not None else [2.0 / (i + 1) for i in range(n)]
    val_loss = list(val_loss) if val_loss is not None else [2.2 / (i + 1) for i in range(n)]
    times = list(epoch_time_s) if isinstance(epoch_time_s, (list, tuple)) else [float(epoch_time_s)] * n
    if params_trainable is None:
        params_trainable = params_total if strategy == "scratch" else params_total // 100
    if samples_per_class is not None:
        train_size = samples_per_class * num_classes

    tags = {"strategy": strategy, "model": model, "dataset": dataset, "tlexp.kind": kind,
            "mlflow.runName": f"{strategy}-s{seed}"}
    if experiment_tag is not None:
        tags["tlexp.experiment"] = experiment_tag
    if parent_run_id is not None:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, start_time=_T0_MS + int(1000 * started_s), tags=tags)
    run_id = run.info.run_id

    params = {
        "strategy": strategy, "model": model, "dataset": dataset, "data": dataset, "head": head,
        "epochs": str(epochs if epochs is not None else n), "seed": str(seed),
        "samples_per_class": "none" if samples_per_class is None else str(samples_per_class),
        "train_fraction": str(train_fraction), "image_size": str(image_size),
        "num_classes": str(num_classes), "train_size": str(train_size), "lr": str(lr),
        **({"data_fingerprint": data_fingerprint} if data_fingerprint else {}), **(params or {}),
    }
    metrics: list[Metric] = []
    for i in range(n):
        step = i + 1
        for key, value in (("train_loss", train_loss[i]), ("train_acc", train_acc[i]),
                           ("val_loss", val_loss[i]), ("val_acc", val_acc[i]),
                           ("epoch_time_s", times[i]), ("lr", lr), ("train_samples_per_s", 100.0)):
            metrics.append(Metric(key, float(value), _T0_MS + step, step))
    if summary and n:
        best = max(val_acc)
        values = {
            "best_val_acc": best, "best_epoch": float(list(val_acc).index(best) + 1),
            "final_train_acc": train_acc[-1], "final_val_acc": val_acc[-1],
            "total_time_s": sum(times), "avg_epoch_time_s": sum(times) / n,
            "params_total": params_total, "params_trainable": params_trainable,
            "trainable_fraction": params_trainable / params_total,
            "train_samples_per_class": train_size / num_classes,
        }
        if test_acc is not None:
            values["test_acc"] = test_acc
            values["test_loss"] = 0.5
        metrics += [Metric(k, float(v), _T0_MS + 1000, 0) for k, v in values.items()]
    # log_batch takes at most 1000 metrics per call
    param_list = [Param(k, v) for k, v in params.items()]
    for start in range(0, max(len(metrics), 1), 1000):
        client.log_batch(run_id, metrics=metrics[start:start + 1000],
                         params=param_list if start == 0 else [])
    if status != "RUNNING":
        client.set_terminated(run_id, status=status, end_time=_T0_MS + int(1000 * started_s) + 10_000)
    return run_id


def log_sweep_parent(client: MlflowClient, experiment_id: str, *,
                     experiment_tag: str = "tl-vs-scratch") -> str:
    """Log a finished sweep parent run (no per-epoch metrics) and return its id."""
    run = client.create_run(experiment_id, start_time=_T0_MS, tags={
        "tlexp.kind": "sweep", "tlexp.experiment": experiment_tag, "mlflow.runName": "sweep"})
    client.log_batch(run.info.run_id, params=[Param("strategies", "scratch,transfer")],
                     tags=[RunTag("note", "parent")])
    client.set_terminated(run.info.run_id, status="FINISHED")
    return run.info.run_id
