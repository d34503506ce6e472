"""tlexp.compare and tlexp.report against small SQLite stores with known numbers (no training)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterator

import pandas as pd
import pytest
from mlflow import MlflowClient
from rich.console import Console

from fake_store import log_fake_run, log_sweep_parent, temporary_store
from tlexp import compare
from tlexp.compare import CompareError, load_history, load_runs, run_compare

EXP = "tl-vs-scratch"


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[MlflowClient, str]]:
    """An empty store; the cwd moves to tmp_path (default reports/ and ./mlruns land there)."""
    monkeypatch.chdir(tmp_path)
    with temporary_store() as uri:
        yield MlflowClient(tracking_uri=uri), uri


def new_experiment(client: MlflowClient, tmp_path: Path, name: str = EXP) -> str:
    return client.create_experiment(name, artifact_location=str(tmp_path / "artifacts" / name))


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def row(table: pd.DataFrame, strategy: str, **keys: str) -> pd.Series:
    mask = table["strategy"] == strategy
    for key, value in keys.items():
        mask &= table[key] == value
    assert mask.sum() == 1, f"expected one row for {strategy} {keys}, got {mask.sum()}"
    return table[mask].iloc[0]


def build(uri: str, experiment: str = EXP) -> compare.Comparison:
    runs = load_runs(experiment, tracking_uri=uri)
    return compare.build_comparison(experiment, runs, load_history(experiment, tracking_uri=uri, runs=runs))


def all_text(comparison: compare.Comparison) -> str:
    return "\n".join(line for section in comparison.findings for line in section.lines)


# ------------------------------------------------------------------------------ table numbers
def test_table_mean_std_and_counts(store, tmp_path):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    log_fake_run(client, eid, strategy="transfer", seed=1, val_acc=[0.6, 0.8], train_acc=[0.7, 0.9],
                 epoch_time_s=[1.0, 3.0], test_acc=0.70, params_total=1000, params_trainable=10)
    log_fake_run(client, eid, strategy="transfer", seed=2, val_acc=[0.7, 0.9], train_acc=[0.8, 1.0],
                 epoch_time_s=[2.0, 2.0], test_acc=0.80, params_total=1000, params_trainable=10)
    log_fake_run(client, eid, strategy="scratch", seed=1, val_acc=[0.2, 0.4], train_acc=[0.3, 0.7],
                 epoch_time_s=5.0, params_total=1000, params_trainable=1000)

    table = build(uri).table
    transfer, scratch = row(table, "transfer"), row(table, "scratch")
    assert transfer["n_runs"] == 2 and transfer["seeds"] == "1,2"
    assert transfer["best_val_acc_mean"] == pytest.approx(0.85)
    assert transfer["best_val_acc_std"] == pytest.approx(0.0707107, rel=1e-5)  # sample std of 0.8, 0.9
    assert transfer["final_train_acc_mean"] == pytest.approx(0.95)
    assert transfer["test_acc_mean"] == pytest.approx(0.75)
    assert transfer["total_time_s_mean"] == pytest.approx(4.0)
    assert transfer["avg_epoch_time_s_mean"] == pytest.approx(2.0)
    assert transfer["params_trainable_mean"] == 10 and transfer["trainable_fraction_mean"] == pytest.approx(0.01)
    assert transfer["train_val_gap_mean"] == pytest.approx(0.10)
    assert scratch["n_runs"] == 1 and pd.isna(scratch["best_val_acc_std"])  # one run: no std, not 0
    assert scratch["train_val_gap_mean"] == pytest.approx(0.30)
    assert pd.isna(scratch["test_acc_mean"])
    assert list(table["strategy"]) == ["transfer", "scratch"]


def test_summary_missing_is_filled_from_the_curves(store, tmp_path):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    log_fake_run(client, eid, strategy="scratch", val_acc=[0.3, 0.5, 0.4], train_acc=[0.4, 0.6, 0.9],
                 epoch_time_s=[1.0, 2.0, 3.0], summary=False)
    stats = build(uri).stats.iloc[0]
    assert stats["best_val_acc"] == pytest.approx(0.5)
    assert stats["final_val_acc"] == pytest.approx(0.4)
    assert stats["final_train_acc"] == pytest.approx(0.9)
    assert stats["total_time_s"] == pytest.approx(6.0)
    assert stats["avg_epoch_time_s"] == pytest.approx(2.0)


def test_epochs_and_seconds_to_95_percent_of_own_best(store, tmp_path):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    # best 1.0 -> target 0.95, first reached at epoch 4; seconds = 1+2+3+4
    log_fake_run(client, eid, strategy="transfer", seed=1, val_acc=[0.5, 0.8, 0.94, 0.96, 1.0],
                 epoch_time_s=[1.0, 2.0, 3.0, 4.0, 5.0])
    # best 0.6 -> target 0.57: epoch 2 (0.58), even though 0.58 < the other run's target
    log_fake_run(client, eid, strategy="transfer", seed=2, val_acc=[0.2, 0.58, 0.6, 0.3, 0.3],
                 epoch_time_s=[1.0, 2.0, 3.0, 4.0, 5.0])
    # never improves: flat at zero -> reaches its own (zero) best at epoch 1, no division by zero
    log_fake_run(client, eid, strategy="scratch", seed=1, val_acc=[0.0, 0.0, 0.0, 0.0, 0.0], epoch_time_s=0.0)

    comparison = build(uri)
    transfer = comparison.stats[comparison.stats["strategy"] == "transfer"].set_index("seed")
    assert transfer.loc["1", "epochs_to_target"] == 4
    assert transfer.loc["1", "seconds_to_target"] == pytest.approx(10.0)
    assert transfer.loc["2", "epochs_to_target"] == 2
    assert transfer.loc["2", "seconds_to_target"] == pytest.approx(3.0)
    flat = comparison.stats[comparison.stats["strategy"] == "scratch"].iloc[0]
    assert flat["epochs_to_target"] == 1 and flat["seconds_to_target"] == 0.0
    assert row(comparison.table, "transfer")["epochs_to_target_mean"] == pytest.approx(3.0)
    text = all_text(comparison)
    assert "transfer 3.0 epochs, 6.5 s; scratch 1.0 epochs, 0.0 s" in text
    assert "x cheaper" not in text  # a zero epoch time gives no ratio instead of a division by zero


def test_runs_differing_in_settings_are_not_averaged(store, tmp_path):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    log_fake_run(client, eid, strategy="scratch", seed=1, val_acc=[0.2, 0.4, 0.5])
    log_fake_run(client, eid, strategy="scratch", seed=2, val_acc=[0.2, 0.4, 0.5, 0.7, 0.9])
    log_fake_run(client, eid, strategy="scratch", seed=3, val_acc=[0.2, 0.4, 0.6], model="resnet18")

    comparison = build(uri)
    assert set(comparison.group_keys) == {"model", "epochs"}
    table = comparison.table
    assert len(table) == 3 and set(table["n_runs"]) == {1}
    assert row(table, "scratch", epochs="3", model="efficientnet_lite0")["best_val_acc_mean"] == pytest.approx(0.5)
    assert row(table, "scratch", epochs="5")["best_val_acc_mean"] == pytest.approx(0.9)
    assert row(table, "scratch", model="resnet18")["best_val_acc_mean"] == pytest.approx(0.6)
    assert any("Runs differ in model, epochs" in note for note in comparison.notes)
    assert comparison.shared["dataset"] == "digits"


def test_seeds_are_averaged_within_a_group(store, tmp_path):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    for seed, best in ((1, 0.5), (2, 0.7), (3, 0.9)):
        log_fake_run(client, eid, strategy="scratch", seed=seed, val_acc=[0.1, best])
    table = build(uri).table
    assert len(table) == 1
    assert table.iloc[0]["n_runs"] == 3
    assert table.iloc[0]["best_val_acc_mean"] == pytest.approx(0.7)
    assert table.iloc[0]["best_val_acc_std"] == pytest.approx(0.2)


# ------------------------------------------------------------------------- which runs count
def test_unfinished_sweep_and_comparison_runs_are_left_out_and_counted(store, tmp_path):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    log_fake_run(client, eid, strategy="transfer", seed=1, val_acc=[0.5, 0.9])
    log_fake_run(client, eid, strategy="transfer", seed=2, val_acc=[0.1, 0.1], status="RUNNING")
    log_fake_run(client, eid, strategy="transfer", seed=3, val_acc=[0.1, 0.1], status="FAILED")
    log_fake_run(client, eid, strategy="scratch", seed=4, val_acc=[0.1, 0.1], status="KILLED")
    log_fake_run(client, eid, strategy="scratch", seed=5, val_acc=[0.2, 0.3], kind="comparison")
    log_sweep_parent(client, eid)

    runs = load_runs(EXP, tracking_uri=uri)
    assert list(runs["seed"]) == ["1"]
    everything = load_runs(EXP, tracking_uri=uri, all_runs=True)
    assert len(everything) == 6
    comparison = build(uri)
    assert list(comparison.table["strategy"]) == ["transfer"]
    notes = " ".join(compare.select_training_runs(everything, EXP)[1])
    assert "Left out 3 unfinished runs (1 FAILED, 1 KILLED, 1 RUNNING)" in notes
    assert "1 sweep parent run" in notes
    assert "1 earlier comparison run" in notes


def test_runs_in_default_are_found_through_the_tag(store, tmp_path):
    client, uri = store
    # `mlflow run .` without --experiment-name: the run lands in 'Default' (id 0), tagged with the name.
    log_fake_run(client, "0", strategy="scratch", seed=1, val_acc=[0.3, 0.4])
    log_fake_run(client, "0", strategy="transfer", seed=1, val_acc=[0.3, 0.4], experiment_tag="other")
    log_fake_run(client, "0", strategy="transfer", seed=2, val_acc=[0.3, 0.4], experiment_tag=None)

    runs = load_runs(EXP, tracking_uri=uri)
    assert list(runs["strategy"]) == ["scratch"]
    assert list(runs["experiment_name"]) == ["Default"]
    _, notes = compare.select_training_runs(load_runs(EXP, tracking_uri=uri, all_runs=True), EXP)
    assert any("outside experiment 'tl-vs-scratch' (in 'Default')" in n for n in notes)


def test_run_in_both_places_is_counted_once(store, tmp_path):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    log_fake_run(client, eid, strategy="scratch", seed=1, val_acc=[0.3, 0.4])  # tagged and in the experiment
    log_fake_run(client, "0", strategy="transfer", seed=1, val_acc=[0.5, 0.6])
    runs = load_runs(EXP, tracking_uri=uri)
    assert sorted(runs["strategy"]) == ["scratch", "transfer"]
    assert runs["run_id"].is_unique


def test_unknown_experiment_names_the_value_and_the_choices(store, tmp_path):
    client, uri = store
    new_experiment(client, tmp_path, "flowers")
    with pytest.raises(CompareError) as err:
        load_runs("nope", tracking_uri=uri)
    message = str(err.value)
    assert isinstance(err.value, ValueError)
    assert "'nope'" in message and "'flowers'" in message and "'Default'" in message
    assert message.count(".") >= 1 and "\n" not in message


def test_experiment_without_finished_runs_is_an_error(store, tmp_path):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    log_fake_run(client, eid, strategy="scratch", val_acc=[0.1], status="FAILED")
    log_fake_run(client, eid, strategy="scratch", val_acc=[0.1], status="RUNNING")
    with pytest.raises(CompareError, match=r"no FINISHED training runs .*1 FAILED, 1 RUNNING"):
        run_compare(EXP, tracking_uri=uri, output=tmp_path / "out", console=quiet())
    assert not (tmp_path / "out").exists()


def test_empty_experiment_is_an_error(store, tmp_path):
    client, uri = store
    new_experiment(client, tmp_path)
    with pytest.raises(CompareError, match="no FINISHED training runs"):
        load_runs(EXP, tracking_uri=uri)


# ----------------------------------------------------------------------------------- findings
@pytest.mark.parametrize("winner,loser", [("transfer", "scratch"), ("scratch", "transfer")])
def test_findings_follow_the_numbers(store, tmp_path, winner, loser):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    for seed in (1, 2, 3):
        # winner: best 0.90 +- 0.01, fast; loser: best 0.60 +- 0.01, slow, overfits
        log_fake_run(client, eid, strategy=winner, seed=seed, val_acc=[0.88, 0.89 + 0.01 * (seed - 1), 0.88],
                     train_acc=[0.9, 0.9, 0.9], epoch_time_s=1.0)
        log_fake_run(client, eid, strategy=loser, seed=seed, val_acc=[0.2, 0.4, 0.59 + 0.01 * (seed - 1)],
                     train_acc=[0.5, 0.8, 0.95], epoch_time_s=4.0)
    text = all_text(build(uri))
    assert f"{winner} has the highest best validation accuracy, 90.0% ± 1.0 over 3 runs, 30.0 points above {loser}" \
        in text
    assert "larger than the spread over seeds" in text
    assert f"{winner} gets there in the fewest epochs (1.0 epochs, against {loser} 3.0 epochs)" in text
    assert f"{winner} gets there in the least training time (1.0 s, against {loser} 12.0 s)" in text
    assert f"{winner} is 4.0x cheaper per epoch than {loser}" in text
    assert f"{winner} generalises best (smallest gap); {loser} has the largest" in text
    assert f"{loser} overfits" in text and f"{winner} overfits" not in text


def test_difference_within_the_spread_is_called_unreliable(store, tmp_path):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    for seed, (a, b) in enumerate([(0.80, 0.70), (0.60, 0.72), (0.70, 0.74)]):
        log_fake_run(client, eid, strategy="transfer", seed=seed, val_acc=[a])
        log_fake_run(client, eid, strategy="scratch", seed=seed, val_acc=[b])
    text = all_text(build(uri))
    assert "scratch has the highest best validation accuracy, 72.0%" in text
    assert "within the spread over seeds (std up to 10.0 points)" in text


def test_single_runs_report_unknown_spread(store, tmp_path):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    log_fake_run(client, eid, strategy="transfer", val_acc=[0.5, 0.7])
    log_fake_run(client, eid, strategy="scratch", val_acc=[0.5, 0.6])
    text = all_text(build(uri))
    assert "transfer has the highest best validation accuracy, 70.0%, 1 run, 10.0 points above scratch" in text
    assert "spread over seeds is unknown" in text


def test_test_accuracy_is_preferred_when_every_strategy_logged_it(store, tmp_path):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    log_fake_run(client, eid, strategy="transfer", val_acc=[0.9], test_acc=0.5)
    log_fake_run(client, eid, strategy="scratch", val_acc=[0.6], test_acc=0.55)
    assert "scratch has the highest test accuracy, 55.0%" in all_text(build(uri))


def test_only_one_strategy_reports_what_there_is(store, tmp_path):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    log_fake_run(client, eid, strategy="transfer", seed=1, val_acc=[0.5, 0.8])
    log_fake_run(client, eid, strategy="transfer", seed=2, val_acc=[0.5, 0.6])
    comparison = build(uri)
    text = all_text(comparison)
    assert "Only transfer was run here (best validation accuracy 70.0% ± 14.1 over 2 runs)" in text
    assert len(comparison.table) == 1


# ---------------------------------------------------------------------------- data efficiency
def _sweep(client: MlflowClient, eid: str, accuracies: dict[str, dict[int, list[float]]]) -> None:
    parent = log_sweep_parent(client, eid)
    for strategy, per_size in accuracies.items():
        for size, values in per_size.items():
            for seed, acc in enumerate(values):
                log_fake_run(client, eid, strategy=strategy, seed=seed, samples_per_class=size,
                             val_acc=[acc / 2, acc], parent_run_id=parent)


def test_crossover_and_per_size_tables(store, tmp_path):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    _sweep(client, eid, {
        "transfer": {5: [0.80, 0.82, 0.84], 20: [0.85, 0.86, 0.87], 80: [0.90, 0.91, 0.92]},
        "scratch": {5: [0.20, 0.30, 0.40], 20: [0.50, 0.55, 0.60], 80: [0.89, 0.905, 0.92]},
    })
    comparison = build(uri)
    eff = comparison.efficiency.set_index(["size", "strategy"])
    assert eff.loc[(20.0, "scratch"), "mean"] == pytest.approx(0.55)
    assert eff.loc[(20.0, "scratch"), "std"] == pytest.approx(0.05)
    assert eff.loc[(20.0, "scratch"), "n"] == 3
    paired = comparison.paired.set_index(["size", "strategy", "versus"])
    # per seed at size 5: 0.60, 0.52, 0.44 -> mean 0.52, std 0.08
    assert paired.loc[(5.0, "transfer", "scratch"), "mean_diff"] == pytest.approx(0.52)
    assert paired.loc[(5.0, "transfer", "scratch"), "std_diff"] == pytest.approx(0.08)
    assert paired.loc[(5.0, "transfer", "scratch"), "n_pairs"] == 3
    text = all_text(comparison)
    # at 80: scratch 0.905 vs transfer 0.91, transfer's std 0.01 -> within one std
    assert "Scratch first comes within one standard deviation of the best pretrained strategy at 80 " in text
    assert ("Paired by seed, transfer minus scratch: +52.0 ± 8.0 points at 5 per class (3 seeds) and "
            "+0.5 ± 0.5 points at 80 per class (3 seeds).") in text
    # the sweep parent is not a training run and the sizes are separate rows
    assert len(comparison.table) == 6 and "samples_per_class" in comparison.group_keys


def test_crossover_never_reached(store, tmp_path):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    _sweep(client, eid, {
        "finetune": {10: [0.80, 0.82], 100: [0.95, 0.97]},
        "transfer": {10: [0.85, 0.87], 100: [0.90, 0.92]},
        "scratch": {10: [0.20, 0.30], 100: [0.70, 0.72]},
    })
    text = all_text(build(uri))
    assert ("Scratch never comes within one standard deviation of the best pretrained strategy in the measured "
            "range (10-100 training samples per class); at 100 per class it is still 25.0 points behind finetune"
            in text)


def test_no_data_efficiency_without_different_sizes(store, tmp_path):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    log_fake_run(client, eid, strategy="transfer", val_acc=[0.8])
    log_fake_run(client, eid, strategy="scratch", val_acc=[0.5])
    comparison = build(uri)
    assert comparison.efficiency is None and comparison.paired is None
    assert not any(s.title.startswith("Data efficiency") for s in comparison.findings)


# ------------------------------------------------------------------------- files and MLflow
def test_run_compare_writes_every_format_and_logs_one_comparison_run(store, tmp_path):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    for seed in (1, 2):
        log_fake_run(client, eid, strategy="transfer", seed=seed, val_acc=[0.7, 0.9 - 0.02 * seed])
        log_fake_run(client, eid, strategy="scratch", seed=seed, val_acc=[0.3, 0.5 + 0.02 * seed])
    console = quiet()
    result = run_compare(EXP, tracking_uri=uri, output=tmp_path / "out", console=console)

    names = {p.name for p in result.files}
    assert {"comparison.md", "comparison.csv", "report.html", "curves.png", "bars.png",
            "time_to_accuracy.png"} <= names
    for path in result.files:
        assert path.exists() and path.stat().st_size > 0
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv = pd.read_csv(tmp_path / "out" / "comparison.csv")
    assert csv.set_index("strategy").loc["transfer", "best_val_acc_mean"] == pytest.approx(0.87)
    assert csv.set_index("strategy").loc["transfer", "model"] == "efficientnet_lite0"
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert "| transfer | 2 | 87.0 ± 1.4 |" in md and "![Training curves](curves.png)" in md
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.count("src='data:image/png;base64,") == 3 and "<td>87.0 ± 1.4</td>" in html
    assert "transfer has the highest best validation accuracy" in html
    printed = console.file.getvalue()
    assert "87.0 ± 1.4" in printed and "transfer has the highest" in printed
    assert f"Logged to MLflow as run {result.run_id}" in printed

    logged = client.get_run(result.run_id)
    assert logged.info.status == "FINISHED"
    assert logged.data.tags["tlexp.kind"] == "comparison" and logged.data.tags["tlexp.experiment"] == EXP
    assert {a.path for a in client.list_artifacts(result.run_id)} == names

    # Reading the experiment again ignores the comparison run and gives the same table.
    everything = load_runs(EXP, tracking_uri=uri, all_runs=True)
    runs, notes = compare.select_training_runs(everything, EXP)
    assert len(everything) == 5 and result.run_id not in set(runs["run_id"])
    assert any("1 earlier comparison run" in note for note in notes)
    pd.testing.assert_frame_equal(build(uri).table, result.comparison.table)


def test_sweep_report_has_the_data_efficiency_files(store, tmp_path):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    _sweep(client, eid, {"transfer": {5: [0.8, 0.82], 50: [0.9, 0.91]}, "scratch": {5: [0.3, 0.4], 50: [0.8, 0.9]}})
    result = run_compare(EXP, tracking_uri=uri, output=tmp_path / "out", log_to_mlflow=False, console=quiet())
    names = {p.name for p in result.files}
    assert {"data_efficiency.png", "data_efficiency.csv", "paired.csv", "curves_samples_per_class-5.png",
            "curves_samples_per_class-50.png"} <= names
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert "## Accuracy per training-set size" in md and "| 5 | 81.0 ± 1.4 (n=2) | 35.0 ± 7.1 (n=2) |" in md
    assert "| 5 | transfer − scratch | 46.0 ± 5.7 | 2 |" in md


@pytest.fixture
def no_charts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip drawing for tests about other things (charts are covered above and in test_plots)."""
    from tlexp import report

    monkeypatch.setattr(report, "write_charts", lambda comparison, out_dir: [])


def test_formats_choose_the_table_files(store, tmp_path, no_charts):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    log_fake_run(client, eid, strategy="scratch", val_acc=[0.3, 0.5])
    result = run_compare(EXP, tracking_uri=uri, output=tmp_path / "out", formats="csv", log_to_mlflow=False,
                         console=quiet())
    names = {p.name for p in result.files}
    assert "comparison.csv" in names and "comparison.md" not in names and "report.html" not in names
    assert not (tmp_path / "out" / "report.html").exists()


def test_unknown_format_is_an_error_before_reading(store, tmp_path):
    _, uri = store
    with pytest.raises(CompareError, match=r"Unknown report format 'pdf'; expected .*md, csv, html"):
        run_compare("does-not-matter", tracking_uri=uri, formats="md,pdf", output=tmp_path / "out")


def test_output_that_cannot_be_a_folder_fails_before_anything_is_written(store, tmp_path):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    log_fake_run(client, eid, strategy="scratch", val_acc=[0.3, 0.5])
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(CompareError, match="is a file, not a folder"):
        run_compare(EXP, tracking_uri=uri, output=blocker / "report", console=quiet())
    assert len(load_runs(EXP, tracking_uri=uri, all_runs=True)) == 1  # no comparison run was logged


def test_output_folder_without_write_permission_fails_before_anything_is_written(store, tmp_path, monkeypatch):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    log_fake_run(client, eid, strategy="scratch", val_acc=[0.3, 0.5])
    # Simulated, so that it also holds when the tests run as root (root ignores folder permissions).
    monkeypatch.setattr(compare.os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(CompareError, match="is not writable"):
        run_compare(EXP, tracking_uri=uri, output=tmp_path / "report", console=quiet())
    assert not (tmp_path / "report").exists()
    assert len(load_runs(EXP, tracking_uri=uri, all_runs=True)) == 1


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_output_folder_fails_before_anything_is_written(store, tmp_path):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    log_fake_run(client, eid, strategy="scratch", val_acc=[0.3, 0.5])
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(CompareError, match="is not writable"):
            run_compare(EXP, tracking_uri=uri, output=locked / "report", console=quiet())
    finally:
        locked.chmod(0o700)
    assert not (locked / "report").exists()


def test_report_run_goes_to_the_named_experiment_even_when_runs_live_in_default(store, tmp_path, no_charts):
    client, uri = store
    log_fake_run(client, "0", strategy="scratch", seed=1, val_acc=[0.3, 0.4])
    result = run_compare(EXP, tracking_uri=uri, output=tmp_path / "out", console=quiet())
    experiment = client.get_experiment_by_name(EXP)
    assert experiment is not None
    assert client.get_run(result.run_id).info.experiment_id == experiment.experiment_id
    runs, notes = compare.select_training_runs(load_runs(EXP, tracking_uri=uri, all_runs=True), EXP)
    assert list(runs["experiment_name"]) == ["Default"]
    assert any("1 earlier comparison run" in note for note in notes)


def test_failed_logging_leaves_the_report_and_no_running_run(store, tmp_path, monkeypatch, no_charts):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    log_fake_run(client, eid, strategy="scratch", val_acc=[0.3, 0.5])

    def broken(*args, **kwargs):
        raise OSError("artifact store unreachable")

    monkeypatch.setattr(MlflowClient, "log_artifact", broken)
    with pytest.raises(CompareError, match="report was written, but logging it to MLflow failed"):
        run_compare(EXP, tracking_uri=uri, output=tmp_path / "out", console=quiet())
    assert (tmp_path / "out" / "comparison.md").exists()
    everything = load_runs(EXP, tracking_uri=uri, all_runs=True)
    assert list(everything.loc[everything["kind"] == "comparison", "status"]) == ["FAILED"]


def test_default_output_and_tracking_uri_from_the_environment(store, tmp_path, monkeypatch, no_charts):
    import mlflow.tracking._tracking_service.utils as tracking_utils

    client, uri = store
    eid = new_experiment(client, tmp_path, "my/exp")
    log_fake_run(client, eid, strategy="scratch", val_acc=[0.3, 0.5], experiment_tag="my/exp")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)  # another test may have set one
    result = run_compare("my/exp", log_to_mlflow=False, console=quiet())
    assert result.output_dir == Path("reports") / "my_exp"
    assert (tmp_path / "reports" / "my_exp" / "comparison.md").exists()


# ------------------------------------------------------------------------------ histories
def test_load_history_is_long_format_aligned_by_epoch(store, tmp_path):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    log_fake_run(client, eid, strategy="transfer", seed=7, val_acc=[0.5, 0.6, 0.7])
    log_fake_run(client, eid, strategy="scratch", seed=7, val_acc=[0.1, 0.2], epochs=3)  # stopped early
    history = load_history(EXP, tracking_uri=uri)
    assert {"run_id", "strategy", "seed", "model", "metric", "step", "value"} <= set(history.columns)
    val = history[history["metric"] == "val_acc"]
    assert sorted(val.loc[val["strategy"] == "transfer", "step"]) == [1, 2, 3]
    assert list(val.loc[val["strategy"] == "scratch", "value"]) == pytest.approx([0.1, 0.2])
    assert (history["step"] >= 1).all()  # step-0 summary metrics are not part of the curves
    assert any("logged fewer epochs than configured" in n for n in build(uri).notes)


def test_histories_come_from_one_sql_query_not_a_request_per_run(store, tmp_path, monkeypatch):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    for seed in range(30):
        log_fake_run(client, eid, strategy=("transfer", "scratch")[seed % 2], seed=seed, val_acc=[0.1, 0.2, 0.3])
    runs = load_runs(EXP, tracking_uri=uri)
    via_client = compare._history_from_client(MlflowClient(tracking_uri=uri), list(runs["run_id"]),
                                              list(compare.PER_EPOCH_METRICS))

    def forbidden(*args, **kwargs):
        raise AssertionError("get_metric_history called: histories must be read in bulk from a database store")

    monkeypatch.setattr(MlflowClient, "get_metric_history", forbidden)
    history = load_history(EXP, tracking_uri=uri, runs=runs)
    assert len(history) == 30 * 3 * len(compare.PER_EPOCH_METRICS) == len(via_client)
    from_client = pd.DataFrame(via_client, columns=["run_id", "metric", "step", "value", "timestamp"])
    merged = history.merge(from_client, on=["run_id", "metric", "step"], suffixes=("", "_client"))
    assert len(merged) == len(history)
    assert (merged["value"] == merged["value_client"]).all()


@pytest.mark.slow
def test_tracking_server_histories_come_in_bulk(store, tmp_path, monkeypatch):
    """Against a real `mlflow server`: one bulk request per metric and 100 runs, same numbers as SQL."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    client, uri = store
    eid = new_experiment(client, tmp_path)
    for seed in range(4):
        log_fake_run(client, eid, strategy=("transfer", "scratch")[seed % 2], seed=seed, val_acc=[0.1, 0.2, 0.3])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        runs = load_runs(EXP, tracking_uri=url)
        monkeypatch.setattr(MlflowClient, "get_metric_history", lambda *a, **k: pytest.fail("one request per run"))
        over_http = load_history(EXP, tracking_uri=url, runs=runs)
        from_sql = load_history(EXP, tracking_uri=uri, runs=runs)
        pd.testing.assert_frame_equal(over_http, from_sql)
        assert len(over_http) == 4 * 3 * len(compare.PER_EPOCH_METRICS)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_negative_train_val_gaps_are_not_read_as_better_generalisation():
    rows = pd.DataFrame({"strategy": ["scratch", "transfer"], "train_val_gap_mean": [-0.18, -0.06]})
    lines = compare.overfitting_findings(rows)
    assert not any("generalises best" in line for line in lines)
    assert any("negative gap" in line for line in lines)
    positive = compare.overfitting_findings(rows.assign(train_val_gap_mean=[0.02, 0.08]))
    assert any(line.startswith("scratch generalises best") for line in positive)
