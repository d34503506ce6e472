"""Divergence is a failure: a non-finite loss ends the run FAILED with the epoch named and a smaller --lr
suggested, the last finite epoch's checkpoint kept; non-finite float options are refused up front."""

from __future__ import annotations

import math

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from helpers import all_runs
from tlexp import experiment, tracking
from tlexp.cli import app
from tlexp.config import ConfigError, TrainConfig

TINY = ["--strategy", "scratch", "--model", "tinycnn", "--image-size", "12", "--samples-per-class", "8",
        "--epochs", "3", "--no-system-metrics", "--quiet"]


def _artifacts(run_id: str, path: str = "") -> list[str]:
    client, out = MlflowClient(), []
    for item in client.list_artifacts(run_id, path):
        out += _artifacts(run_id, item.path) if item.is_dir else [item.path]
    return out


def test_a_huge_lr_fails_the_run_with_one_line_instead_of_a_chance_score(schema_store):
    result = CliRunner().invoke(app, ["train", *TINY, "--lr", "1e30"])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    (run,) = all_runs()
    assert line.startswith("Error: Training diverged at epoch 1: the training loss is nan")
    assert f"run {run.info.run_id} was marked FAILED" in line and "a smaller --lr than 1e+30" in line
    assert run.info.status == "FAILED"
    assert run.data.tags[tracking.TAG_ERROR].startswith("Diverged: Training diverged at epoch 1")
    assert run.data.tags[tracking.TAG_DIVERGED_EPOCH] == "1"
    assert "best_val_acc" not in run.data.metrics  # no result was logged for compare to average


def test_divergence_mid_run_keeps_the_last_finite_epoch_and_refuses_a_resume(schema_store, monkeypatch):
    real = experiment.train_one_epoch
    calls = {"n": 0}

    def nan_in_epoch_2(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        return {**out, "loss": math.nan} if calls["n"] == 2 else out

    monkeypatch.setattr(experiment, "train_one_epoch", nan_in_epoch_2)
    config = TrainConfig(strategy="scratch", model="tinycnn", image_size=12, samples_per_class=8, epochs=3,
                         num_workers=0, system_metrics=False)
    with pytest.raises(experiment.Diverged, match="epoch 2: the training loss is nan.*epoch 1's checkpoint is kept"):
        experiment.train(config)
    (run,) = all_runs()
    assert run.info.status == "FAILED"
    assert "checkpoint/last.pt" in _artifacts(run.info.run_id)
    assert tracking.load_checkpoint(run.info.run_id)["epoch"] == 1
    steps = [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "train_loss")]
    assert steps == [1]  # the diverged epoch logged nothing
    resumed = CliRunner().invoke(app, ["train", "--resume", run.info.run_id, "--quiet"])
    assert resumed.exit_code == 2
    assert resumed.output.strip() == (f"Error: Run {run.info.run_id} diverged (non-finite loss) at epoch 2; resumed "
                                      f"with the same settings it would diverge again, so start a new run with a "
                                      f"smaller --lr.")


@pytest.mark.parametrize("option, value", [("--lr", "inf"), ("--lr", "nan"), ("--lr", "-inf"),
                                           ("--backbone-lr-mult", "inf"), ("--val-fraction", "nan"),
                                           ("--test-fraction", "nan"), ("--train-fraction", "nan")])
def test_non_finite_float_options_are_refused_before_any_run(option, value, schema_store):
    result = CliRunner().invoke(app, ["train", *TINY, option, value])
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert option in line and value in line.lower()
    assert not all_runs()


def test_validate_refuses_an_infinite_lr():
    with pytest.raises(ConfigError, match=r"^--lr must be a finite number, got inf\.$"):
        TrainConfig(lr=math.inf).validate()
