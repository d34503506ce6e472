"""Faults lose nothing: signals end runs KILLED with a checkpoint that --resume continues exactly,
exceptions end them FAILED with the reason attached, runs are reproducible, and several processes
can share one SQLite store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from fake_store import new_store
from helpers import tiny_weights
from tlexp import experiment, tracking
from tlexp.cli import app
from tlexp.config import TrainConfig

CURVE = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")  # per-epoch numbers that must be reproducible


@pytest.fixture()
def store(tracking_uri, tmp_path) -> str:
    """The conftest store, pre-filled with MLflow's empty schema (creating it takes seconds)."""
    new_store(tmp_path)
    return tracking_uri


def _runs(uri: str | None = None) -> list:
    client = MlflowClient(uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["start_time"])


def _history(run_id: str, key: str, uri: str | None = None) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def _curves(run_id: str, uri: str | None = None) -> dict[str, list[tuple[int, float]]]:
    return {key: _history(run_id, key, uri) for key in CURVE}


def _artifacts(run_id: str, path: str = "") -> list[str]:
    client, out = MlflowClient(), []
    for item in client.list_artifacts(run_id, path):
        out += _artifacts(run_id, item.path) if item.is_dir else [item.path]
    return out


def _tiny(tmp_path: Path, **changes) -> TrainConfig:
    fields = dict(strategy="scratch", model="tinycnn", image_size=12, samples_per_class=10, epochs=3,
                  batch_size=16, num_workers=0)
    if changes.get("strategy", "scratch") != "scratch":
        fields["weights"] = str(tiny_weights(tmp_path / "w.pt"))
    fields.update(changes)
    return TrainConfig(**fields)


def _interrupt_during(epoch: int, after_batches: int, monkeypatch, exc: BaseException | None = None) -> None:
    """Make training raise ``exc`` (default Ctrl-C) inside ``epoch``, after some optimizer steps."""
    real = experiment.train_one_epoch
    calls = {"n": 0}

    def flaky(model, batches, optimizer, **kwargs):
        calls["n"] += 1
        if calls["n"] != epoch:
            return real(model, batches, optimizer, **kwargs)

        def cut():
            for i, batch in enumerate(batches):
                if i == after_batches:
                    raise exc if exc is not None else KeyboardInterrupt()
                yield batch

        return real(model, cut(), optimizer, **kwargs)

    monkeypatch.setattr(experiment, "train_one_epoch", flaky)


# ------------------------------------------------------------- interrupt + resume
@pytest.mark.parametrize("strategy", ["scratch", "transfer"])
def test_interrupted_run_resumes_to_exactly_the_uninterrupted_result(strategy, store, tmp_path, monkeypatch):
    config = _tiny(tmp_path, strategy=strategy)
    reference = experiment.train(config)

    _interrupt_during(3, after_batches=2, monkeypatch=monkeypatch)  # two optimizer steps into epoch 3
    with pytest.raises(KeyboardInterrupt) as caught:
        experiment.train(config.replace(run_name="interrupted"))
    monkeypatch.undo()
    stopped = caught.value
    assert isinstance(stopped, tracking.Interrupted) and stopped.epoch == 2
    run = MlflowClient().get_run(stopped.run_id)
    assert run.info.status == "KILLED"
    assert "checkpoint/last.pt" in _artifacts(stopped.run_id)
    assert [s for s, _ in _history(stopped.run_id, "val_acc")] == [1, 2]  # epoch 3 logged nothing

    resumed = experiment.train(TrainConfig(), resume_run_id=stopped.run_id)
    assert resumed.run_id == stopped.run_id
    run = MlflowClient().get_run(stopped.run_id)
    assert run.info.status == "FINISHED"
    assert tracking.TAG_ERROR not in run.data.tags  # the interruption is over
    # Every epoch exactly once, and the same numbers as the run that was never stopped.
    assert _curves(stopped.run_id) == _curves(reference.run_id)
    assert [s for s, _ in _history(stopped.run_id, "epoch_time_s")] == [1, 2, 3]
    for key in ("best_val_acc", "best_epoch", "final_val_acc", "final_train_acc"):
        assert resumed.metrics[key] == reference.metrics[key], key
    if strategy == "transfer":
        assert len(_history(stopped.run_id, "feature_cache_time_s")) == 1


def test_a_finished_run_cannot_be_resumed(store, tmp_path):
    done = experiment.train(_tiny(tmp_path, epochs=1))
    result = CliRunner().invoke(app, ["train", "--resume", done.run_id, "--quiet"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"Error: Run {done.run_id} is FINISHED; only KILLED or FAILED runs can be "
                                     f"resumed (start a new run instead).")
    assert len(_history(done.run_id, "val_acc")) == 1


def test_interrupt_before_the_first_epoch_ends_says_there_is_nothing_to_resume(store, tmp_path, monkeypatch):
    _interrupt_during(1, after_batches=1, monkeypatch=monkeypatch)
    result = CliRunner().invoke(app, ["train", "--model", "tinycnn", "--strategy", "scratch", "--image-size", "12",
                                      "--samples-per-class", "10", "--epochs", "2", "--quiet"])
    assert result.exit_code == 130
    (run,) = _runs()
    assert run.info.status == "KILLED"
    assert result.stderr.strip() == (f"Interrupted: run {run.info.run_id} was marked KILLED before its first epoch "
                                     f"ended, so there is nothing to resume; start it again.")
    assert "checkpoint/last.pt" not in _artifacts(run.info.run_id)
    again = CliRunner().invoke(app, ["train", "--resume", run.info.run_id, "--quiet"])
    assert again.exit_code == 2 and "has no checkpoint" in again.stderr


def _wait_for_metric(uri: str, key: str, proc: subprocess.Popen, timeout: float = 120.0) -> str:
    """Poll the store until some run has ``key`` logged; return its run id."""
    client = MlflowClient(uri)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        for exp in client.search_experiments():
            for run in client.search_runs([exp.experiment_id]):
                if key in run.data.metrics:
                    return run.info.run_id
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"no {key} metric after {timeout}s")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_a_real_training_process_kills_the_run_and_resume_continues_it(signum, store, tmp_path):
    epochs = 8
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tlexp", "train", "--model", "tinycnn", "--strategy", "scratch", "--image-size", "16",
         "--data", "digits", "--samples-per-class", "10", "--val-fraction", "0.1", "--epochs", str(epochs),
         "--batch-size", "8", "--quiet"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        run_id = _wait_for_metric(store, "val_acc", proc)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "KILLED"
    assert "checkpoint/last.pt" in _artifacts(run_id)
    steps = [s for s, _ in _history(run_id, "val_acc")]
    assert steps == list(range(1, len(steps) + 1)) and 1 <= len(steps) < epochs
    last = steps[-1]
    assert f"Interrupted: run {run_id} was marked KILLED and epoch {last} (the last completed) saved" in stderr
    assert f"tlexp train --resume {run_id}" in stderr
    if signum != signal.SIGTERM:
        return  # resuming is the same for both signals; once is enough

    result = CliRunner().invoke(app, ["train", "--resume", run_id, "--quiet"])
    assert result.exit_code == 0, result.output
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["tlexp.resumed_after_epoch"] == str(last)
    for key in CURVE:  # continued at the next step; nothing logged twice
        assert [s for s, _ in _history(run_id, key)] == list(range(1, epochs + 1)), key
    assert len(_runs()) == 1


def _wait_for_checkpoint(uri: str, proc: subprocess.Popen, timeout: float = 120.0) -> str:
    """Poll until some run has written its per-epoch checkpoint; return its run id."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"training ended before it could be killed: {proc.communicate()[1][-3000:]}"
        for run in _runs(uri):
            if "checkpoint/last.pt" in _artifacts(run.info.run_id, "checkpoint"):
                return run.info.run_id
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no checkpoint after {timeout}s")


@pytest.mark.slow
def test_a_sigkilled_training_process_leaves_a_running_run_that_resume_continues(store, tmp_path, monkeypatch):
    epochs = 12
    args = ["train", "--model", "tinycnn", "--strategy", "scratch", "--image-size", "16", "--data", "digits",
            "--samples-per-class", "10", "--val-fraction", "0.1", "--epochs", str(epochs), "--batch-size", "8",
            "--quiet"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    proc = subprocess.Popen([sys.executable, "-m", "tlexp", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        run_id = _wait_for_checkpoint(store, proc)
        proc.send_signal(signal.SIGKILL)  # no handler runs: nothing can mark the run KILLED
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "RUNNING"
    saved = tracking.load_checkpoint(run_id)["epoch"]  # the last epoch whose checkpoint reached the store
    assert 1 <= saved < epochs

    # A heartbeat seconds old is a process that may still be training: refused, unless --force.
    monkeypatch.setenv("TLEXP_HEARTBEAT_TIMEOUT_S", "120")
    refused = CliRunner().invoke(app, ["train", "--resume", run_id, "--quiet"])
    assert refused.exit_code == 2
    assert f"Run {run_id} is RUNNING and its process was alive" in refused.stderr
    assert "--force" in refused.stderr
    assert MlflowClient().get_run(run_id).info.status == "RUNNING"  # refusing changed nothing

    monkeypatch.setenv("TLEXP_HEARTBEAT_TIMEOUT_S", "0")  # as if two minutes had passed
    resumed = CliRunner().invoke(app, ["train", "--resume", run_id, "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["tlexp.resumed_after_epoch"] == str(saved)
    assert "checkpoint/last.pt" not in _artifacts(run_id, "checkpoint")  # nothing left to resume

    reference = CliRunner().invoke(app, args)
    assert reference.exit_code == 0, reference.output
    (ref_run,) = [r for r in _runs() if r.info.run_id != run_id]
    assert [s for s, _ in _history(run_id, "epoch_time_s")] == list(range(1, epochs + 1))  # each epoch once
    assert _curves(run_id) == _curves(ref_run.info.run_id)
    for key in ("best_val_acc", "best_epoch", "final_val_acc", "test_acc"):
        assert run.data.metrics[key] == ref_run.data.metrics[key], key


def test_force_goes_only_with_resume(store):
    result = CliRunner().invoke(app, ["train", "--force", "--model", "tinycnn"])
    assert result.exit_code == 2
    assert result.stderr.strip() == ("Error: --force only goes with --resume RUN_ID (it resumes a RUNNING run whose "
                                     "process is dead).")
    assert _runs() == []


# ---------------------------------------------------------------- exceptions
def test_out_of_memory_mid_training_fails_the_run_with_a_hint(store, monkeypatch):
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total)\nmore")
    _interrupt_during(2, after_batches=1, monkeypatch=monkeypatch, exc=oom)
    result = CliRunner().invoke(app, ["train", "--model", "tinycnn", "--strategy", "scratch", "--image-size", "12",
                                      "--samples-per-class", "10", "--epochs", "3", "--batch-size", "16", "--quiet"])
    assert result.exit_code == 1
    (run,) = _runs()
    lines = result.stderr.strip().splitlines()
    assert lines == [f"Error: out of memory (CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB "
                     f"total)); run {run.info.run_id} was marked FAILED; try a smaller --batch-size "
                     f"(or --image-size)."]
    assert run.info.status == "FAILED"
    assert run.data.tags[tracking.TAG_ERROR].startswith("OutOfMemoryError: CUDA out of memory")
    trace = Path(MlflowClient().download_artifacts(run.info.run_id, "error/traceback.txt")).read_text()
    assert "Traceback" in trace and "OutOfMemoryError" in trace and "train_one_epoch" in trace
    assert "checkpoint/last.pt" in _artifacts(run.info.run_id)  # epoch 1 is kept


def test_a_bug_mid_training_fails_the_run_and_keeps_its_traceback(store, monkeypatch):
    _interrupt_during(1, after_batches=1, monkeypatch=monkeypatch, exc=ZeroDivisionError("boom in the loop"))
    result = CliRunner().invoke(app, ["train", "--model", "tinycnn", "--strategy", "scratch", "--image-size", "12",
                                      "--samples-per-class", "10", "--epochs", "2", "--quiet"])
    assert result.exit_code == 1
    assert isinstance(result.exception, ZeroDivisionError)  # a bug is not a user error: its traceback shows
    (run,) = _runs()
    assert run.info.status == "FAILED"
    assert run.data.tags[tracking.TAG_ERROR] == "ZeroDivisionError: boom in the loop"
    trace = Path(MlflowClient().download_artifacts(run.info.run_id, "error/traceback.txt")).read_text()
    assert "ZeroDivisionError: boom in the loop" in trace


# ---------------------------------------------------------------- determinism
@pytest.mark.slow
def test_two_runs_with_the_same_seed_log_identical_curves(store, tmp_path):
    """Same seed and settings on the CPU: identical per-epoch numbers, for scratch and for transfer
    (feature cache). One run in a subprocess with another string-hash seed, one in this process."""
    weights = tiny_weights(tmp_path / "w.pt")
    args = ["train", "--model", "tinycnn", "--strategy", "scratch,transfer", "--weights", str(weights),
            "--image-size", "12", "--samples-per-class", "20", "--epochs", "2", "--device", "cpu", "--quiet"]
    other = tmp_path / "other"
    other.mkdir()
    other_uri = new_store(other)
    env = {**os.environ, "MLFLOW_TRACKING_URI": other_uri, "TLEXP_CACHE_DIR": str(other / "cache"),
           "PYTHONHASHSEED": "12345"}
    proc = subprocess.Popen([sys.executable, "-m", "tlexp", *args], cwd=other, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        here = CliRunner().invoke(app, args)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert here.exit_code == 0, here.output
    assert proc.returncode == 0, err[-3000:]
    curves = []
    for uri in (store, other_uri):
        runs = {r.data.tags["strategy"]: r.info.run_id for r in _runs(uri)}
        assert sorted(runs) == ["scratch", "transfer"]
        curves.append({s: _curves(run_id, uri) for s, run_id in runs.items()})
    assert all(len(v) == 2 for c in curves[0].values() for v in c.values())
    assert curves[0] == curves[1]


# ---------------------------------------------------------------- concurrency
@pytest.mark.slow
def test_four_processes_share_one_fresh_sqlite_store(tmp_path):
    # A fresh file (no template schema): creating MLflow's schema is where concurrent processes race.
    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "tlexp", "train", "--model", "tinycnn", "--strategy", "scratch", "--image-size", "8",
         "--samples-per-class", "5", "--epochs", "2", "--seed", str(seed), "--experiment", "shared", "--quiet"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in range(4)]
    errors = []
    for proc in procs:
        _, err = proc.communicate(timeout=400)
        if proc.returncode != 0:
            errors.append(err[-2000:])
    assert errors == []
    runs = _runs(uri)
    assert len(runs) == 4
    assert len(MlflowClient(uri).search_experiments(filter_string="name = 'shared'")) == 1
    for run in runs:
        assert run.info.status == "FINISHED"
        for key in CURVE:
            assert [s for s, _ in _history(run.info.run_id, key, uri)] == [1, 2], key
        assert {"best_val_acc", "test_acc"} <= set(run.data.metrics)  # every run holds a test split out
    assert sorted(r.data.params["seed"] for r in runs) == ["0", "1", "2", "3"]


# ------------------------------------------------------------ metrics never lost
def test_metrics_the_background_writer_failed_to_write_are_written_before_the_run_finishes(store, monkeypatch):
    from mlflow.utils.async_logging.run_operations import RunOperations

    class Failed:
        def result(self):
            raise RuntimeError("(sqlite3.OperationalError) database is locked")

    with tracking.training_run(experiment="e", run_name="r", tags={}) as logger:
        real = logger.client.log_batch

        def lossy(run_id, metrics=(), params=(), tags=(), synchronous=None):
            if synchronous is False:  # the background writer "failed": nothing written
                return RunOperations([Failed()])
            return real(run_id, metrics=metrics, params=params, tags=tags, synchronous=synchronous)

        monkeypatch.setattr(logger.client, "log_batch", lossy)
        for step in (1, 2, 3):
            logger.log_metrics({"val_acc": step / 10}, step=step)
    run = MlflowClient().get_run(logger.run_id)
    assert run.info.status == "FINISHED"
    assert _history(logger.run_id, "val_acc") == [(1, 0.1), (2, 0.2), (3, 0.3)]


def test_database_is_locked_is_retried_and_other_errors_are_not(monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda s: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert tracking.retry_locked(flaky) == "ok" and len(calls) == 3

    def broken():
        calls.append(1)
        raise ValueError("no such table: runs")

    calls.clear()
    with pytest.raises(ValueError):
        tracking.retry_locked(broken)
    assert len(calls) == 1


def test_a_signal_at_the_end_of_an_epoch_waits_until_metrics_and_checkpoint_agree(store):
    with pytest.raises(tracking.Interrupted) as caught:
        with tracking.training_run(experiment="e", run_name="r", tags={}) as logger:
            with logger.atomic():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # the handler runs here, between the epoch's two writes
                logger.log_metrics({"val_acc": 0.5}, step=1)
                logger.keep_checkpoint({"epoch": 1})
            pytest.fail("the signal must stop the run as soon as the block ends")
    assert caught.value.signum == signal.SIGTERM and caught.value.epoch == 1
    assert caught.value.run_id == logger.run_id
    assert MlflowClient().get_run(logger.run_id).info.status == "KILLED"
    assert _history(logger.run_id, "val_acc") == [(1, 0.5)]
    assert _artifacts(logger.run_id) == ["checkpoint/last.pt"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed with the run


def test_resume_reads_the_resolved_value_of_a_param_mlflow_run_logged_raw():
    # Under `mlflow run` the run holds image_size=auto (the MLproject's value) and image_size_resolved=64.
    params = {**TrainConfig(image_size=64).to_params(), "image_size": "auto", "image_size_resolved": "64"}
    assert TrainConfig.from_params(params).image_size == 64
