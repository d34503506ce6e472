"""Data through whole runs: what a run logs about its data, its test split, refused data options, and the
sweep's resume keyed by the data's content rather than the --data string."""

from __future__ import annotations

import shutil

import pandas as pd
from mlflow.tracking import MlflowClient

from helpers import make_image_tree
from test_reliability import TINY, _all_runs, _invoke, assert_rejected, store  # noqa: F401  (store: fixture)
from tlexp.data import data_fingerprint


def _only_run(uri: str):
    (run,) = _all_runs(uri)
    assert run.info.status == "FINISHED"
    return run


def _artifact_csv(run, path: str) -> pd.DataFrame:
    return pd.read_csv(MlflowClient().download_artifacts(run.info.run_id, path), keep_default_na=False)


def test_train_and_test_tree_trains_on_class_folders_and_never_on_test(store, tmp_path):
    root = make_image_tree(tmp_path / "hym", {"Train": {"ants": 6, "bees": 6}, "test": {"ants": 3, "bees": 3}},
                           size=8)
    result = _invoke("train", *TINY, "--data", str(root))
    assert result.exit_code == 0, result.output
    run = _only_run(store)
    params, metrics = run.data.params, run.data.metrics
    assert params["num_classes"] == "2" and params["split_rule"] == "test_folder"
    assert params["data_fingerprint"] == data_fingerprint(str(root)) and params["data_path"] == str(root)
    assert params["exif_transpose"] == "True" and params["test_size"] == "6"
    assert {"test_acc", "test_loss"} <= set(metrics)
    manifest = _artifact_csv(run, "data/split_manifest.csv")
    assert set(manifest["class"]) == {"ants", "bees"}
    assert set(manifest[manifest["split"] == "test"]["path"]) == {p for p in manifest["path"] if p.startswith("test/")}
    assert manifest[manifest["split"] != "test"]["path"].str.startswith("Train/").all()


def test_digits_run_is_scored_on_a_held_out_test_split(store):
    result = _invoke("train", *TINY, "--samples-per-class", "2")
    assert result.exit_code == 0, result.output
    run = _only_run(store)
    assert run.data.params["split_rule"] == "carved" and run.data.params["data_path"] == "sklearn digits"
    assert int(run.data.params["test_size"]) > 300 and "test_acc" in run.data.metrics
    manifest = _artifact_csv(run, "data/split_manifest.csv")
    assert not set(manifest[manifest["split"] == "test"]["path"]) & set(manifest[manifest["split"] != "test"]["path"])


def test_a_class_too_small_for_validation_is_warned_logged_and_not_scored_zero(store, tmp_path):
    root = make_image_tree(tmp_path / "d", {"": {"ants": 8, "bees": 8, "rare": 2}}, size=8)
    result = _invoke("train", *[a for a in TINY if a != "--quiet"], "--data", str(root))
    assert result.exit_code == 0, result.output
    assert "warning" in result.stderr and "'rare' in val" in result.stderr
    run = _only_run(store)
    assert run.data.params["classes_without_val"] == "rare"
    assert run.data.params["classes_without_test"] == "none"
    val = _artifact_csv(run, "eval/per_class_accuracy_val.csv").set_index("class")
    assert val.loc["rare", "support"] == 0 and val.loc["rare", "accuracy"] == "n/a"
    assert val.loc["ants", "accuracy"] != "n/a" and 0.0 <= float(val.loc["ants", "accuracy"]) <= 1.0


def test_empty_data_and_huge_image_size_are_refused_in_one_line(store):
    assert_rejected(_invoke("train", *TINY, "--data", ""), "--data is empty", "digits", uri=store)
    assert_rejected(_invoke("train", *TINY[:-1], "--image-size", "200000"), "--image-size", "at most 2048",
                    "got 200000", uri=store)


def test_mixed_split_and_class_folders_are_refused_in_one_line(store, tmp_path):
    root = make_image_tree(tmp_path / "d", {"train": {"a": 3, "b": 3}, "": {"cats": 3}}, size=8)
    assert_rejected(_invoke("train", *TINY, "--data", str(root)), "split folders ['train']", "['cats']", uri=store)


def test_sweep_resume_follows_the_data_content_not_the_data_string(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_image_tree(tmp_path / "base", {"": {"a": 5, "b": 5}}, size=8)
    grid = ["--strategies", "scratch", "--seeds", "0", "--samples-per-class", "2", "--model", "tinycnn",
            "--image-size", "8", "--epochs", "1", "--quiet"]
    first = _invoke("sweep", *grid, "--data", "./base")
    assert first.exit_code == 0, first.output
    for spelling in ("base/", str(tmp_path / "base")):
        again = _invoke("sweep", *grid, "--data", spelling, "--dry-run")
        assert again.exit_code == 0, again.output
        assert "1 cells: 1 already finished, 0 to run." in again.output, again.output

    shutil.copy(tmp_path / "base" / "a" / "a_0.png", tmp_path / "base" / "a" / "a_extra.png")
    changed = _invoke("sweep", *grid, "--data", "base", "--dry-run")
    assert changed.exit_code == 0, changed.output
    assert "1 cells: 0 already finished, 1 to run." in changed.output, changed.output
