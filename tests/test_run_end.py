"""The very end of a run: the final evaluation and logging are not cut by a signal, a finished run holds
one model and no checkpoint (resumed or not), and a resume after a cut there logs nothing twice."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from test_faults import _artifacts, _history, _interrupt_during, _runs, _tiny, store  # noqa: F401 - fixture
from tlexp import experiment, tracking
from tlexp.cli import app
from tlexp.engine import DeviceSettings
from tlexp.tracking.runs import RunLogger


def _models(run_id: str) -> list:
    client = MlflowClient()
    run = client.get_run(run_id)
    return list(client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'"))


def _signal_when_logging_the_model(monkeypatch, signals: int, *, half_written: bool = False) -> None:
    """Send ``signals`` SIGINTs to this process as the model starts being logged (the first time only);
    ``half_written``: first leave a PENDING logged model, as a model logging cut midway does."""
    real = RunLogger.log_model
    calls = {"n": 0}

    def log_model(self, model, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            if half_written:
                client = MlflowClient()
                client.create_logged_model(client.get_run(self.run_id).info.experiment_id,
                                           source_run_id=self.run_id, name="model")
            for _ in range(signals):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # the handler runs here
        return real(self, model, **kwargs)

    monkeypatch.setattr(RunLogger, "log_model", log_model)


def _assert_finished_cleanly(run_id: str) -> None:
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    # each model once, whole: the pytorch module and the image model (tracking.models)
    assert sorted((m.name, m.status) for m in _models(run_id)) == [("image_model", "READY"), ("model", "READY")]
    assert tracking.CHECKPOINT_ARTIFACT not in _artifacts(run_id)
    assert len(_history(run_id, "best_val_acc")) == 1  # the summary, logged once


def test_a_signal_during_the_final_logging_waits_and_the_run_finishes_with_one_model(store, monkeypatch):
    _signal_when_logging_the_model(monkeypatch, signals=1)
    result = CliRunner().invoke(app, ["train", "--model", "tinycnn", "--strategy", "scratch", "--image-size", "12",
                                      "--samples-per-class", "5", "--epochs", "2", "--quiet"])
    assert result.exit_code == 130, result.output
    (run,) = _runs()
    _assert_finished_cleanly(run.info.run_id)
    assert result.stderr.strip() == (f"Interrupted: run {run.info.run_id} had finished its final evaluation and "
                                     f"logging first; it is FINISHED.")


def test_a_resumed_run_that_finishes_keeps_no_checkpoint_and_one_model(store, tmp_path, monkeypatch):
    _interrupt_during(2, after_batches=1, monkeypatch=monkeypatch)
    with pytest.raises(tracking.Interrupted) as caught:
        experiment.train(_tiny(tmp_path, epochs=2))
    monkeypatch.undo()
    assert tracking.CHECKPOINT_ARTIFACT in _artifacts(caught.value.run_id)
    experiment.train(_tiny(tmp_path), resume_run_id=caught.value.run_id)
    _assert_finished_cleanly(caught.value.run_id)
    assert tracking.TAG_STALE_CHECKPOINT not in MlflowClient().get_run(caught.value.run_id).data.tags


def test_a_second_signal_during_the_final_logging_then_resume_logs_nothing_twice(store, tmp_path, monkeypatch):
    _signal_when_logging_the_model(monkeypatch, signals=2, half_written=True)  # the second one acts at once
    with pytest.raises(tracking.Interrupted) as caught:
        experiment.train(_tiny(tmp_path, epochs=2))
    monkeypatch.undo()
    run_id = caught.value.run_id
    assert caught.value.epoch == 2 and MlflowClient().get_run(run_id).info.status == "KILLED"
    assert len(_history(run_id, "best_val_acc")) == 1 and len(_models(run_id)) == 1  # the half-written one
    summary = experiment.train(_tiny(tmp_path), resume_run_id=run_id)
    _assert_finished_cleanly(run_id)
    assert summary.metrics["best_val_acc"] == MlflowClient().get_run(run_id).data.metrics["best_val_acc"]


# ------------------------------------------------------------------ random states in the checkpoint
def test_the_checkpoint_keeps_and_restores_every_cuda_random_state(monkeypatch):
    gpu_states = [torch.tensor([1, 2], dtype=torch.uint8), torch.tensor([3, 4], dtype=torch.uint8)]
    restored = {}
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: gpu_states)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.__setitem__(device, state))
    cuda = DeviceSettings(device=torch.device("cuda"))

    states = experiment.rng_states(cuda)
    assert set(states) == {"torch_rng", "cuda_rng"}
    path = "ckpt.pt"
    torch.save(states, path)
    loaded = torch.load(path, weights_only=True)  # as tracking.load_checkpoint reads it
    expected = torch.rand(3)
    experiment.restore_rng_states(loaded, cuda)
    assert torch.equal(torch.rand(3), expected)  # the CPU stream continues where it was saved
    assert {i: s.tolist() for i, s in restored.items()} == {0: [1, 2], 1: [3, 4]}

    restored.clear()
    cpu = DeviceSettings(device=torch.device("cpu"))
    assert set(experiment.rng_states(cpu)) == {"torch_rng"}
    experiment.restore_rng_states(loaded, cpu)  # a CUDA run resumed on the CPU: nothing to give the GPU
    assert restored == {}


def test_fit_checkpoints_the_random_states_of_its_device(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(experiment, "rng_states", lambda settings: seen.append(settings.device) or {
        "torch_rng": torch.get_rng_state(), "cuda_rng": ["marker"]})
    prep = experiment.prepare(_tiny(tmp_path, epochs=1))
    logger = tracking.NullLogger()
    experiment.fit(prep, logger, experiment.SilentReporter(), None)
    assert seen == [torch.device("cpu")] and logger.checkpoint["cuda_rng"] == ["marker"]


def test_the_model_is_logged_into_the_open_run_without_ending_it(store, monkeypatch):
    import mlflow

    from tlexp.tracking.runs import _active

    monkeypatch.setenv("MLFLOW_RUN_ID", "set-by-mlflow-run")
    run_id = MlflowClient().create_run("0").info.run_id
    with _active(run_id):
        assert mlflow.active_run().info.run_id == run_id  # what the fluent log_model writes into
    assert mlflow.active_run() is None
    assert MlflowClient().get_run(run_id).info.status == "RUNNING"
    assert os.environ["MLFLOW_RUN_ID"] == "set-by-mlflow-run"  # end_run() forgets it; `mlflow run` needs it
