"""End to end: `tlexp train` writes one complete MLflow run per strategy (tiny model, tiny data)."""

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from helpers import make_image_tree, tiny_weights
from tlexp.cli import app

EPOCH_METRICS = {"train_loss", "train_acc", "val_loss", "val_acc", "epoch_time_s", "lr", "train_samples_per_s"}
SUMMARY = {"best_val_acc", "best_epoch", "final_train_acc", "final_val_acc", "total_time_s", "avg_epoch_time_s",
           "params_total", "params_trainable", "trainable_fraction"}
TINY = ["--model", "tinycnn", "--image-size", "12", "--samples-per-class", "8", "--epochs", "2", "--quiet"]


def _train(*args: str):
    result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output
    return result


def _only_run(client: MlflowClient):
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    return runs[0]


def _artifacts(client, run_id, path=""):
    out = []
    for item in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return out


def test_scratch_run_logs_the_whole_contract(tracking_uri):
    _train("--strategy", "scratch", *TINY)
    client = MlflowClient()
    run = _only_run(client)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "tl-vs-scratch"
    tags = run.data.tags
    assert (tags["strategy"], tags["model"], tags["dataset"]) == ("scratch", "tinycnn", "digits")
    assert tags["tlexp.experiment"] == "tl-vs-scratch" and tags["mlflow.runName"] == "scratch-tinycnn-s42-n8"
    params = run.data.params
    assert params["epochs"] == "2" and params["image_size"] == "12" and params["num_classes"] == "10"
    assert params["train_size"] == "80" and int(params["val_size"]) > 300 and int(params["test_size"]) > 300
    for key in ("torch_version", "torchvision_version", "mlflow_version", "device_resolved", "lr", "seed"):
        assert key in params
    for name in EPOCH_METRICS:
        history = client.get_metric_history(run.info.run_id, name)
        assert sorted(m.step for m in history) == [1, 2], name
    metrics = run.data.metrics
    assert SUMMARY <= set(metrics)
    assert 0.0 <= metrics["best_val_acc"] <= 1.0 and metrics["trainable_fraction"] == 1.0
    assert metrics["params_trainable"] == metrics["params_total"] > 0
    arts = _artifacts(client, run.info.run_id)
    for expected in ("history.csv", "data/split_manifest.csv", "eval/confusion_matrix_val.png",
                     "eval/per_class_accuracy_val.csv", "model_classes.json"):
        assert expected in arts


def test_logged_model_round_trips_with_another_batch_size(tracking_uri):
    _train("--strategy", "scratch", *TINY)
    run = _only_run(MlflowClient())
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    out = model(torch.rand(3, 3, 12, 12))  # logged with an example batch of 2
    assert tuple(out.shape) == (3, 10)
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    assert np.asarray(pyfunc.predict(np.random.rand(5, 3, 12, 12).astype(np.float32))).shape == (5, 10)


def test_transfer_run_keeps_the_pretrained_body(tracking_uri, tmp_path):
    weights = tiny_weights(tmp_path / "pre.pt", seed=1)
    _train("--strategy", "transfer", "--weights", str(weights), "--head", "linear", *TINY)
    run = _only_run(MlflowClient())
    assert run.data.metrics["trainable_fraction"] < 0.5
    assert run.data.params["feature_cache_used"] == "True"
    # The one-off feature computation is part of transfer's cost: it lands in the first epoch's time.
    epoch_times = MlflowClient().get_metric_history(run.info.run_id, "epoch_time_s")
    first = next(m.value for m in epoch_times if m.step == 1)
    assert first >= run.data.metrics["feature_cache_time_s"] > 0
    assert run.data.metrics["total_time_s"] == pytest.approx(sum(m.value for m in epoch_times))
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    saved = torch.load(weights, weights_only=True)
    body = model.body.state_dict()
    assert all(torch.equal(body[k], saved[k]) for k in body)  # BatchNorm statistics included


def test_test_split_is_evaluated_on_the_best_weights(tmp_path, monkeypatch):
    """A run whose best validation epoch is not its last reports the best epoch's test score."""
    from tlexp import experiment, tracking
    from tlexp.config import TrainConfig
    from tlexp.console import SilentReporter
    from tlexp.data import EvalPreset
    from tlexp.engine import evaluate, iterate_batches

    root = make_image_tree(tmp_path / "pets", {"train": {"cat": 6, "dog": 6}, "val": {"cat": 3, "dog": 3},
                                               "test": {"cat": 3, "dog": 3}})
    prep = experiment.prepare(TrainConfig(strategy="scratch", model="tinycnn", data=str(root), image_size=12,
                                          epochs=3, lr=0.01, head="linear"))
    scripted_val_acc = iter([0.9, 0.2, 0.5])  # epoch 1 is the best; the last is not

    def scripted_evaluate(model, batches, **kwargs):
        result = evaluate(model, batches, **kwargs)
        return {**result, "acc": next(scripted_val_acc, result["acc"])}

    monkeypatch.setattr(experiment, "evaluate", scripted_evaluate)
    weights = {}  # epoch -> its weights, from its checkpoint

    class Recording(tracking.NullLogger):
        def keep_checkpoint(self, state):
            weights[state["epoch"]] = state["model"]

    metrics = experiment.fit(prep, Recording(), SilentReporter(), None)["metrics"]
    assert metrics["best_epoch"] == 1 and sorted(weights) == [1, 2, 3]

    def test_score(state):
        prep.model.load_state_dict(state)
        return evaluate(prep.model, iterate_batches(prep.data.images, prep.data.labels, prep.splits.test,
                                                    batch_size=64, settings=prep.settings, transform=EvalPreset()),
                        settings=prep.settings)

    best, last = test_score(weights[1]), test_score(weights[3])
    assert best["loss"] != pytest.approx(last["loss"])  # the two candidates can be told apart
    assert metrics["test_loss"] == pytest.approx(best["loss"]) and metrics["test_acc"] == best["acc"]


def test_a_test_folder_is_evaluated_and_logged(tracking_uri, tmp_path):
    root = make_image_tree(tmp_path / "pets", {"train": {"cat": 6, "dog": 6}, "val": {"cat": 3, "dog": 3},
                                               "test": {"cat": 3, "dog": 3}})
    _train("--strategy", "scratch", "--data", str(root), "--model", "tinycnn", "--image-size", "12",
           "--epochs", "2", "--quiet")
    run = _only_run(MlflowClient())
    assert {"test_acc", "test_loss"} <= set(run.data.metrics)
    assert run.data.params["test_size"] == "6" and run.data.tags["dataset"] == "pets"
    assert "eval/confusion_matrix_test.png" in _artifacts(MlflowClient(), run.info.run_id)


def test_under_mlflow_run_it_logs_into_the_existing_run(tracking_uri, monkeypatch):
    """`mlflow run` creates the run (in 'Default') and passes MLFLOW_RUN_ID: no second run may appear."""
    client = MlflowClient()
    outer = client.create_run("0", tags={"mlflow.source.type": "PROJECT"})
    client.log_param(outer.info.run_id, "image_size", "auto")  # as mlflow run logs the MLproject parameter
    monkeypatch.setenv("MLFLOW_RUN_ID", outer.info.run_id)
    _train("--strategy", "scratch", *TINY)
    run = _only_run(client)
    assert run.info.run_id == outer.info.run_id and run.info.experiment_id == "0"
    assert run.data.tags["tlexp.experiment"] == "tl-vs-scratch"
    assert run.data.params["image_size"] == "auto" and run.data.params["image_size_resolved"] == "12"
    assert "val_acc" in run.data.metrics


def test_several_strategies_make_several_runs(tracking_uri):
    result = _train("--strategy", "scratch,finetune", "--weights", str(tiny_weights(__import__("pathlib").Path("w.pt"))),
                    *TINY)
    client = MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(r.data.tags["strategy"] for r in runs) == ["finetune", "scratch"]
    assert "tlexp compare --experiment tl-vs-scratch" in result.output.replace("\n", " ")
