"""What the MLflow UI gets from a run: the experiment kind, the way there, datasets, system metrics, and
`mlflow run` with several strategies as nested runs."""

import json
import threading

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from helpers import make_image_tree, tiny_weights
from tlexp.cli import app
from tlexp.tracking.ui import runs_table_url, ui_command

TINY = ["--model", "tinycnn", "--image-size", "12", "--epochs", "2", "--quiet"]


def _train(*args: str):
    result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output
    return result


def _pets(tmp_path):
    return make_image_tree(tmp_path / "pets", {"train": {"cat": 6, "dog": 4}, "val": {"cat": 3, "dog": 2},
                                               "test": {"cat": 2, "dog": 2}})


def _runs(client):
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def _monitor_threads():
    return [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor" and t.is_alive()]


def test_ui_command_names_the_store_unless_it_is_the_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ui_command(f"sqlite:///{tmp_path / 'mlflow.db'}") == "mlflow ui"
    assert ui_command("sqlite:///mlflow.db") == "mlflow ui"
    odd = tmp_path / "my store" / "x.db"
    assert ui_command(f"sqlite:///{odd}") == f"mlflow ui --backend-store-uri 'sqlite:///{odd}'"  # shell-quoted
    assert ui_command("sqlite:///rel/x.db") == f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/rel/x.db"
    assert ui_command("http://10.0.0.5:5000") is None  # a server serves its own UI
    assert runs_table_url("7") == "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"


def test_train_tags_the_experiment_logs_datasets_and_prints_the_way_to_the_runs_table(tracking_uri, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    root = _pets(tmp_path)
    result = _train("--strategy", "scratch", "--data", str(root), "--experiment", "pets study", *TINY)
    client = MlflowClient()
    experiment = client.get_experiment_by_name("pets study")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    out = " ".join(result.output.split())
    # The test runs in tmp_path and its store is tmp_path/mlflow.db: the default store, plain `mlflow ui`.
    assert f"`mlflow ui`, then open {runs_table_url(experiment.experiment_id)}" in out

    (run,) = _runs(client)
    inputs = {d.tags[0].value: d.dataset for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation", "test"}
    for context, counts in (("training", {"cat": 6, "dog": 4}), ("validation", {"cat": 3, "dog": 2}),
                            ("test", {"cat": 2, "dog": 2})):
        dataset = inputs[context]
        assert dataset.name == "pets" and json.loads(dataset.source) == {"uri": str(root)}
        assert json.loads(dataset.profile)["class_counts"] == counts
    assert len({d.digest for d in inputs.values()}) == 3  # each split is its own set of images

    # System metrics on by default, and the sampling thread ended with the run.
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    assert run.info.status == "FINISHED" and not _monitor_threads()


def test_the_same_images_share_a_digest_and_other_images_do_not(tracking_uri, tmp_path):
    root = _pets(tmp_path)
    _train("--strategy", "scratch", "--data", str(root), "--seed", "1", "--no-system-metrics", *TINY)
    _train("--strategy", "scratch", "--data", str(root), "--seed", "2", "--no-system-metrics", *TINY)
    _train("--strategy", "scratch", "--data", str(root), "--seed", "2", "--samples-per-class", "3",
           "--no-system-metrics", *TINY)
    digests = [{d.tags[0].value: d.dataset.digest for d in r.inputs.dataset_inputs}
               for r in sorted(_runs(MlflowClient()), key=lambda r: r.info.start_time)]
    assert digests[0] == digests[1]  # another seed, the same images
    assert digests[2]["training"] != digests[1]["training"]  # 3 per class: other training images
    assert digests[2]["validation"] == digests[1]["validation"]
    assert all(not k.startswith("system/") for r in _runs(MlflowClient()) for k in r.data.metrics)  # switched off


def test_system_metrics_thread_stops_when_the_run_fails(tracking_uri, monkeypatch):
    from tlexp import tracking

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    with pytest.raises(RuntimeError):
        with tracking.training_run(experiment="e", run_name="r", tags={}, system_metrics=True) as logger:
            assert _monitor_threads()
            threading.Event().wait(0.5)
            raise RuntimeError("boom")
    run = MlflowClient().get_run(logger.run_id)
    assert run.info.status == "FAILED" and not _monitor_threads()
    assert "system/cpu_utilization_percentage" in run.data.metrics


def test_a_sweep_and_compare_print_the_way_to_the_runs_table(tracking_uri, tmp_path):
    root = _pets(tmp_path)
    sweep = CliRunner().invoke(app, ["sweep", "--strategies", "scratch", "--seeds", "0", "--samples-per-class",
                                     "all", "--data", str(root), "--no-system-metrics", *TINY])
    assert sweep.exit_code == 0, sweep.output
    exp_id = MlflowClient().get_experiment_by_name("tl-vs-scratch").experiment_id
    assert runs_table_url(exp_id) in " ".join(sweep.output.split())
    compare = CliRunner().invoke(app, ["compare", "--format", "md"])
    assert compare.exit_code == 0, compare.output
    assert runs_table_url(exp_id) in " ".join(compare.output.split())


def test_under_mlflow_run_several_strategies_are_child_runs_of_the_run_mlflow_created(tracking_uri, tmp_path,
                                                                                       monkeypatch):
    client = MlflowClient()
    outer = client.create_run("0", tags={"mlflow.source.type": "PROJECT"})  # what `mlflow run` does
    client.log_param(outer.info.run_id, "strategy", "scratch,finetune")
    monkeypatch.setenv("MLFLOW_RUN_ID", outer.info.run_id)
    weights = tiny_weights(tmp_path / "w.pt")
    _train("--strategy", "scratch,finetune", "--weights", str(weights), "--samples-per-class", "8",
           "--no-system-metrics", *TINY)
    runs = {r.info.run_id: r for r in client.search_runs(["0"])}
    children = [r for r in runs.values() if r.info.run_id != outer.info.run_id]
    assert sorted(r.data.tags["strategy"] for r in children) == ["finetune", "scratch"]
    assert all(r.data.tags["mlflow.parentRunId"] == outer.info.run_id for r in children)
    assert all(r.data.params["strategy"] == r.data.tags["strategy"] for r in children)  # one strategy a run
    assert "val_acc" not in runs[outer.info.run_id].data.metrics  # nothing trained into the outer run
    assert client.get_experiment("0").tags["mlflow.experimentKind"] == "custom_model_development"


@pytest.mark.slow
def test_real_mlflow_run_with_two_strategies_nests_them(tracking_uri, tmp_path):
    """`mlflow run . -P strategy=scratch,transfer --env-manager local`, for real (efficientnet_lite0's offline
    weights, 1 epoch on 16 images): two child runs under the run MLflow created."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    data = make_image_tree(tmp_path / "pets", {"train": {"cat": 4, "dog": 4}, "val": {"cat": 2, "dog": 2}}, size=32)
    env = {**os.environ, "PYTHONPATH": str(root), "MLFLOW_TRACKING_URI": tracking_uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run([sys.executable, "-m", "mlflow", "run", str(root), "--env-manager", "local",
                           "-P", "strategy=scratch,transfer", "-P", f"data={data}", "-P", "epochs=1",
                           "-P", "image_size=32", "-P", "batch_size=8"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    runs = MlflowClient().search_runs(["0"])
    (outer,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == outer.info.run_id]
    assert outer.data.params["strategy"] == "scratch,transfer" and "val_acc" not in outer.data.metrics
    assert sorted(r.data.tags["strategy"] for r in children) == ["scratch", "transfer"]
    assert all(r.info.status == "FINISHED" and "val_acc" in r.data.metrics for r in children)


def test_a_dataset_another_run_inserted_meanwhile_is_linked_not_an_error(tracking_uri, monkeypatch):
    """Parallel cells share val/test splits: the race MLflow's log_inputs loses is retried, not fatal."""
    import mlflow

    from tlexp.tracking import datasets

    calls = []
    real = mlflow.log_inputs

    def racing(**kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise mlflow.exceptions.MlflowException(
                "(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, datasets.name")
        return real(**kwargs)

    monkeypatch.setattr(mlflow, "log_inputs", racing)
    run = mlflow.MlflowClient().create_run(mlflow.MlflowClient().create_experiment("race"))
    split = datasets.SplitInput(split="test", indices=[1, 2, 3, 4, 5], class_counts={"a": 2, "b": 3})
    datasets.log_datasets(run.info.run_id, name="digits", source="sklearn digits", fingerprint="f" * 16,
                          splits=[split])
    logged = mlflow.MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    assert len(calls) == 2 and [d.dataset.name for d in logged] == ["digits"]
