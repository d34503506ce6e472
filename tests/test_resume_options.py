"""Options that say what they do: --resume refuses options that would change the run and accepts a unique
run-id prefix; seeds are bounded to what torch's generators take; duplicate strategies are refused."""

from __future__ import annotations

import sqlite3

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from helpers import all_runs
from tlexp import experiment
from tlexp.cli import app
from tlexp.config import MAX_SEED, TrainConfig

TINY = ["--model", "tinycnn", "--image-size", "12", "--samples-per-class", "4", "--epochs", "2",
        "--no-system-metrics", "--quiet"]


def _one_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("Error: ") and "Traceback" not in result.output
    return line


def _killed_run(monkeypatch) -> str:
    """A run interrupted in its second epoch: KILLED, with epoch 1's checkpoint."""
    real, calls = experiment.train_one_epoch, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt()
        return real(*args, **kwargs)

    monkeypatch.setattr(experiment, "train_one_epoch", flaky)
    with pytest.raises(KeyboardInterrupt) as caught:
        experiment.train(TrainConfig(strategy="scratch", model="tinycnn", image_size=12, samples_per_class=4,
                                     epochs=2, num_workers=0, system_metrics=False))
    monkeypatch.undo()
    return caught.value.run_id


def test_resume_refuses_options_that_would_change_the_run_then_continues_from_a_prefix(schema_store,
                                                                                        monkeypatch):
    run_id = _killed_run(monkeypatch)
    line = _one_line(CliRunner().invoke(app, ["train", "--resume", run_id, "--epochs", "3", "--lr", "0.5",
                                              "--experiment", "other", "--quiet"]))
    assert line == (f"Error: --resume continues run {run_id} with its own settings, so --epochs, --lr, --experiment "
                    f"cannot be given with it; leave them out, or start a new run.")
    assert MlflowClient().get_run(run_id).info.status == "KILLED"  # refused before the run was touched

    done = CliRunner().invoke(app, ["train", "--resume", run_id[:8], "--quiet"])
    assert done.exit_code == 0, done.output
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["epochs"] == "2"
    assert [m.step for m in MlflowClient().get_metric_history(run_id, "val_acc")] == [1, 2]
    assert len(all_runs()) == 1


def test_an_ambiguous_or_too_short_run_id_prefix_is_one_line(schema_store, tmp_path):
    client = MlflowClient()
    eid = client.create_experiment("tl-vs-scratch")
    ids = [client.create_run(eid, run_name=f"r{i}").info.run_id for i in range(2)]
    client.set_terminated(ids[0], "KILLED")
    # Give both runs ids that share their first 10 characters, as two runs of a big store can.
    wanted = ["abcdef0123" + "0" * 22, "abcdef0123" + "1" * 22]
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        for old, new in zip(ids, wanted):
            for table in ("runs", "tags", "params", "metrics", "latest_metrics"):
                db.execute(f"UPDATE {table} SET run_uuid = ? WHERE run_uuid = ?", (new, old))
    line = _one_line(CliRunner().invoke(app, ["train", "--resume", "abcdef0123", "--quiet"]))
    assert "is the start of 2 runs' ids" in line and wanted[0] in line and wanted[1] in line
    assert "give more of the id" in line
    line = _one_line(CliRunner().invoke(app, ["train", "--resume", "abcdef0", "--quiet"]))
    assert "too short" in line and "first 8 characters" in line
    # The unique prefix of the KILLED one names it (and it has no checkpoint: that is the next check).
    line = _one_line(CliRunner().invoke(app, ["train", "--resume", wanted[0][:11], "--quiet"]))
    assert f"Run {wanted[0]} has no checkpoint" in line


@pytest.mark.parametrize("option, value", [("--seed", "99999999999999999999"), ("--seed", "18446744073709551615"),
                                           ("--seed", "-1"), ("--split-seed", "18446744073709551615")])
def test_seeds_beyond_what_torch_takes_are_one_line_and_leave_no_run(option, value, schema_store):
    line = _one_line(CliRunner().invoke(app, ["train", "--strategy", "scratch", *TINY, option, value]))
    assert f"{option} must be between 0 and {MAX_SEED}, got {value}." in line
    assert not all_runs()
    line = _one_line(CliRunner().invoke(app, ["sweep", "--strategies", "scratch", "--seeds", f"0,{value}"
                                              if option == "--seed" else "0", *TINY,
                                              *([option, value] if option != "--seed" else [])]))
    assert "must be between 0 and" in line and not all_runs()


def test_the_largest_seed_trains(schema_store):
    """MAX_SEED itself is accepted, and fit's derived seeds (seed + 10_000) do not overflow."""
    result = CliRunner().invoke(app, ["train", "--strategy", "scratch", *TINY, "--seed", str(MAX_SEED)])
    assert result.exit_code == 0, result.output


def test_duplicate_strategies_are_refused(schema_store):
    line = _one_line(CliRunner().invoke(app, ["train", "--strategy", "scratch,scratch", *TINY]))
    assert "lists a strategy twice" in line and not all_runs()
