"""Using the winner: register it, predict with it, serve it over HTTP, evaluate it on new labelled images."""

from __future__ import annotations

import base64
import csv
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from helpers import make_image_tree, stop_process, tiny_weights
from tlexp.cli import app

EXPERIMENT = "winner-test"


def _cli(*args: str) -> "object":
    return CliRunner().invoke(app, list(args))


def _lines(output: str) -> list[str]:
    """What tlexp printed (MLflow's own INFO lines about creating the test store left out)."""
    return [line for line in output.strip().splitlines() if " INFO mlflow." not in line]


def _train_two_strategies(tmp_path: Path) -> Path:
    """scratch and transfer (tinycnn, 1 epoch) on a three-colour tree; returns the tree."""
    data = make_image_tree(tmp_path / "train", {"": {"ants": 8, "bees": 8, "wasps": 8}}, size=16)
    weights = tiny_weights(tmp_path / "w.pt")
    result = _cli("train", "--data", str(data), "--model", "tinycnn", "--strategy", "scratch,transfer",
                  "--weights", str(weights), "--image-size", "12", "--epochs", "1", "--experiment", EXPERIMENT,
                  "--quiet")
    assert result.exit_code == 0, result.output
    return data


@pytest.fixture()
def trained(tracking_uri, tmp_path) -> Path:
    return _train_two_strategies(tmp_path)


def _versions(name: str) -> list:
    return sorted(MlflowClient().search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


def test_register_picks_the_best_strategy_then_the_best_run_on_validation_and_moves_the_alias(trained):
    from tlexp.compare import build_comparison, load_history, load_runs
    from tlexp.registry import choose_champion

    first = _cli("register", "--experiment", EXPERIMENT)
    assert first.exit_code == 0, first.output
    assert "Registered winner-test version 1" in first.output
    runs = load_runs(EXPERIMENT)
    comparison = build_comparison(EXPERIMENT, runs, load_history(EXPERIMENT, runs=runs))
    champion = choose_champion(comparison)
    headline = comparison.headline.set_index("strategy")["test_acc_mean"]
    assert headline[champion.strategy] == headline.max()  # the best mean test accuracy wins
    version = MlflowClient().get_model_version_by_alias(EXPERIMENT, "champion")
    assert str(version.version) == "1" and version.run_id == champion.run_id
    assert version.tags["strategy"] == champion.strategy and version.tags["model"] == "tinycnn"
    assert float(version.tags["headline_accuracy"]) == pytest.approx(headline.max(), abs=1e-4)
    assert champion.finding in version.description

    second = _cli("register", "--experiment", EXPERIMENT, "--name", EXPERIMENT)
    assert second.exit_code == 0, second.output
    assert [str(v.version) for v in _versions(EXPERIMENT)] == ["1", "2"]
    assert str(MlflowClient().get_model_version_by_alias(EXPERIMENT, "champion").version) == "2"


def test_the_champion_among_seeds_is_chosen_on_validation_not_test(tracking_uri, tmp_path):
    from tlexp.compare import build_comparison, load_history, load_runs
    from tlexp.registry import choose_champion

    data = make_image_tree(tmp_path / "train", {"": {"ants": 8, "bees": 8}}, size=16)
    for seed in ("1", "2"):
        result = _cli("train", "--data", str(data), "--model", "tinycnn", "--strategy", "scratch", "--seed", seed,
                      "--image-size", "12", "--epochs", "1", "--experiment", EXPERIMENT, "--quiet")
        assert result.exit_code == 0, result.output
    runs = load_runs(EXPERIMENT)
    comparison = build_comparison(EXPERIMENT, runs, load_history(EXPERIMENT, runs=runs))
    champion = choose_champion(comparison)
    best_val = runs.sort_values(["best_val_acc", "start_time"], ascending=[False, True]).iloc[0]
    assert runs.set_index("run_id").loc[champion.run_id, "best_val_acc"] == best_val["best_val_acc"]
    assert champion.n_runs == 2


def test_register_with_no_finished_run_is_one_line_and_registers_nothing(tracking_uri):
    result = _cli("register", "--experiment", "nothing-here")
    assert result.exit_code == 2
    assert len(_lines(result.output)) == 1, result.output
    assert MlflowClient().search_registered_models() == []


def test_predict_labels_folders_and_globs_skips_unreadable_files_and_writes_a_csv(trained, tmp_path):
    from tlexp.tracking.models import run_model

    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "broken.png").write_bytes(b"not a png")
    run_id = MlflowClient().search_runs([MlflowClient().get_experiment_by_name(EXPERIMENT).experiment_id])[0].info.run_id
    assert run_model(MlflowClient(), run_id) is not None
    out = tmp_path / "out" / "predictions.csv"
    result = _cli("predict", "--model", run_id, str(trained / "ants"), str(trained / "bees" / "bees_*.png"),
                  str(tmp_path / "new"), "--batch-size", "5", "--top-k", "2", "--device", "cpu", "-o", str(out))
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 16  # 8 ants + 8 bees; the broken file has no row
    assert {r["label"] for r in rows} <= {"ants", "bees", "wasps"}
    assert all(len(r["top_k"].split()) == 2 and r["top_k"].startswith(r["label"] + ":") for r in rows)
    assert "1 unreadable file(s) skipped" in result.output and "broken.png" in result.output


def test_predict_with_a_path_that_names_nothing_is_one_line(tracking_uri, tmp_path):
    result = _cli("predict", "--model", "0" * 32, str(tmp_path / "missing" / "*.jpg"))
    assert result.exit_code == 2 and "names no image file" in result.output
    assert len(_lines(result.output)) == 1, result.output


def test_evaluate_with_unknown_class_folders_says_so_before_any_work(trained, tmp_path, monkeypatch):
    from tlexp import predict as predict_mod

    _cli("register", "--experiment", EXPERIMENT)
    other = make_image_tree(tmp_path / "other", {"": {"ants": 2, "moths": 2}}, size=16)
    monkeypatch.setattr(predict_mod, "load_image_model", lambda *a, **k: pytest.fail("loaded the model"))
    result = _cli("evaluate", "--model", f"models:/{EXPERIMENT}@champion", "--data", str(other))
    assert result.exit_code == 2
    assert "['moths']" in result.output and len(_lines(result.output)) == 1, result.output


def test_evaluate_scores_each_image_against_its_folder_and_logs_an_evaluation_run(trained, tmp_path):
    from scipy.stats import binomtest

    from tlexp.evaluate import evaluate_model

    run_id = MlflowClient().search_runs([MlflowClient().get_experiment_by_name(EXPERIMENT).experiment_id])[0].info.run_id
    held_out = make_image_tree(tmp_path / "held_out", {"": {"ants": 3, "wasps": 4}}, size=16, seed=3)
    result = evaluate_model(run_id, str(held_out), batch_size=4, device="cpu")
    assert result.n == 7 and result.classes == ["ants", "bees", "wasps"]
    assert result.confusion.sum() == 7 and result.confusion[1].sum() == 0  # no bees folder: no bees row
    assert result.correct == int(result.confusion.trace())
    interval = binomtest(result.correct, 7).proportion_ci(confidence_level=0.95)
    assert (result.ci_low, result.ci_high) == pytest.approx((interval.low, interval.high))
    run = MlflowClient().get_run(result.run_id)
    assert run.data.tags["tlexp.kind"] == "evaluation" and run.data.tags["tlexp.model_run_id"] == run_id
    assert run.info.status == "FINISHED" and run.data.metrics["eval_acc"] == pytest.approx(result.correct / 7)
    logged = MlflowClient().download_artifacts(result.run_id, "eval/predictions.csv", str(tmp_path))
    rows = list(csv.DictReader(open(logged)))
    hits = sum(Path(r["path"]).parent.name == r["label"] for r in rows)
    assert hits == result.correct and len(rows) == 7  # each image scored against its own folder's class


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post_until_ready(url: str, body: bytes, server: subprocess.Popen, timeout_s: float) -> bytes:
    """POST ``body`` until the server answers (it is still starting), within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert server.poll() is None, server.stderr.read().decode()[-2000:]
        try:
            request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.read()
        except (ConnectionError, urllib.error.URLError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.slow
def test_end_to_end_train_compare_register_predict_serve_evaluate(tracking_uri, tmp_path):
    import json

    import mlflow
    from PIL import Image

    data = _train_two_strategies(tmp_path)
    compared = _cli("compare", "--experiment", EXPERIMENT, "-o", str(tmp_path / "report"))
    assert compared.exit_code == 0, compared.output
    registered = _cli("register", "--experiment", EXPERIMENT)
    assert registered.exit_code == 0, registered.output
    uri = f"models:/{EXPERIMENT}@champion"
    version = MlflowClient().get_model_version_by_alias(EXPERIMENT, "champion")
    comparison_run = [r for r in MlflowClient().search_runs([MlflowClient().get_experiment_by_name(
        EXPERIMENT).experiment_id]) if r.data.tags.get("tlexp.kind") == "comparison"][0]
    assert version.tags["comparison_run_id"] == comparison_run.info.run_id

    model = mlflow.pyfunc.load_model(uri)
    predicted = _cli("predict", "--model", uri, str(data), "-o", str(tmp_path / "p.csv"))
    assert predicted.exit_code == 0, predicted.output
    assert len(list(csv.DictReader((tmp_path / "p.csv").open()))) == 24

    # a real JPEG, base64, over HTTP
    photo = tmp_path / "photo.jpg"
    Image.open(next((data / "bees").glob("*.png"))).convert("RGB").save(photo, "JPEG")
    expected = model.predict({"image": [str(photo)]})["label"][0]
    port = _free_port()
    # The scoring server runs `uvicorn` by name: the venv's bin folder must be on PATH.
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
           "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager",
                               "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        body = json.dumps({"dataframe_split": {"columns": ["image"],
                                               "data": [[base64.b64encode(photo.read_bytes()).decode()]]}})
        answer = json.loads(_post_until_ready(f"http://127.0.0.1:{port}/invocations", body.encode(), server, 90))
    finally:
        stop_process(server)
    assert answer["predictions"][0]["label"] == expected, answer
    assert answer["predictions"][0]["error"] == ""

    held_out = make_image_tree(tmp_path / "held_out", {"": {"ants": 4, "bees": 4}}, size=16, seed=7)
    evaluated = _cli("evaluate", "--model", uri, "--data", str(held_out))
    assert evaluated.exit_code == 0, evaluated.output
    runs = MlflowClient().search_runs([MlflowClient().get_experiment_by_name(EXPERIMENT).experiment_id],
                                      "tags.`tlexp.kind` = 'evaluation'")
    assert len(runs) == 1 and runs[0].data.tags["tlexp.model_run_id"] == version.run_id
    metrics = runs[0].data.metrics
    assert 0 <= metrics["eval_acc_ci_low"] <= metrics["eval_acc"] <= metrics["eval_acc_ci_high"] <= 1
    assert metrics["eval_images"] == 8
    assert "eval/confusion_matrix.png" in [a.path for a in MlflowClient().list_artifacts(runs[0].info.run_id, "eval")]
    from tlexp.compare import load_runs

    assert runs[0].info.run_id not in set(load_runs(EXPERIMENT)["run_id"])  # compare leaves it out
