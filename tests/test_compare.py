"""tlexp.compare and tlexp.report against small SQLite stores with known numbers (no training)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats
from mlflow import MlflowClient
from rich.console import Console

from fake_store import log_fake_run, log_sweep_parent, temporary_store
from tlexp import compare
from tlexp.compare import CompareError, load_history, load_runs, run_compare
from tlexp.tracking import TrackingError

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
    assert comparison.shared["data"] == "digits"


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


def test_evaluation_runs_are_not_training_runs(store, tmp_path):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    log_fake_run(client, eid, strategy="transfer", seed=1, val_acc=[0.5, 0.9], test_acc=0.9)
    log_fake_run(client, eid, strategy="transfer", seed=1, val_acc=[0.1], test_acc=0.1, kind="evaluation")
    runs, notes = compare.select_training_runs(load_runs(EXP, tracking_uri=uri, all_runs=True), EXP)
    assert list(runs["test_acc"]) == [0.9]
    assert any("Left out 1 evaluation run (tlexp.kind=evaluation" in n for n in notes)


@pytest.mark.parametrize("name", ["bob's study", 'the "big" one', """bob's "big" study"""])
def test_experiment_names_with_quotes(store, tmp_path, name):
    client, uri = store
    # in its own experiment, and (as under `mlflow run`) in Default with only the tag naming it
    log_fake_run(client, new_experiment(client, tmp_path, name), strategy="scratch", seed=1, val_acc=[0.4],
                 experiment_tag=name)
    log_fake_run(client, "0", strategy="transfer", seed=1, val_acc=[0.6], experiment_tag=name)
    log_fake_run(client, "0", strategy="transfer", seed=2, val_acc=[0.6], experiment_tag="bob")
    runs = load_runs(name, tracking_uri=uri)
    assert sorted(runs["strategy"]) == ["scratch", "transfer"]


def test_the_hint_for_an_empty_experiment_is_shell_quoted(store, tmp_path):
    client, uri = store
    new_experiment(client, tmp_path, "bob's study")
    with pytest.raises(CompareError) as err:
        load_runs("bob's study", tracking_uri=uri)
    assert "`tlexp train --experiment 'bob'\"'\"'s study'`" in str(err.value)


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
    assert (f"Ranking on best validation accuracy: {winner} 90.0% ± 1.0 (3 runs), {loser} 60.0% ± 1.0 (3 runs)."
            in text)
    assert f"{winner} beats {loser} by 30.0 points (95% CI 30.0 to 30.0, paired over 3 seeds, p < 0.001)." in text
    assert "spread over seeds" not in text  # the old heuristic is gone
    assert f"{winner} gets there in the fewest epochs (1.0 epochs, against {loser} 3.0 epochs)" in text
    assert f"{winner} gets there in the least training time (1.0 s, against {loser} 12.0 s)" in text
    assert f"{winner} is 4.0x cheaper per epoch than {loser}" in text
    assert f"{winner} generalises best (smallest gap); {loser} has the largest" in text
    assert f"{loser} overfits" in text and f"{winner} overfits" not in text


TRANSFER_TEST = [0.82, 0.91, 0.77, 0.88, 0.85]
SCRATCH_TEST = [0.70, 0.74, 0.69, 0.81, 0.72]


def test_paired_statistics_equal_scipy_and_are_quoted(store, tmp_path):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    for seed, (t, s) in enumerate(zip(TRANSFER_TEST, SCRATCH_TEST)):
        log_fake_run(client, eid, strategy="transfer", seed=seed, val_acc=[0.5, 0.9], test_acc=t)
        log_fake_run(client, eid, strategy="scratch", seed=seed, val_acc=[0.5, 0.8], test_acc=s)
    result = run_compare(EXP, tracking_uri=uri, output=tmp_path / "out", log_to_mlflow=False, console=quiet())
    expected = scipy_stats.ttest_rel(TRANSFER_TEST, SCRATCH_TEST)
    ci = expected.confidence_interval(0.95)
    paired = pd.read_csv(tmp_path / "out" / "paired.csv")
    assert len(paired) == 1
    got = paired.iloc[0]
    assert (got["strategy_a"], got["strategy_b"], got["n"], got["test"]) == ("transfer", "scratch", 5, "paired t")
    assert got["mean_diff"] == pytest.approx(np.mean(np.subtract(TRANSFER_TEST, SCRATCH_TEST)))
    assert (got["ci_low"], got["ci_high"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert got["p_value"] == pytest.approx(expected.pvalue)
    text = all_text(result.comparison)
    assert result.comparison.metric == "test_acc"
    assert (f"transfer beats scratch by {100 * got['mean_diff']:.1f} points (95% CI {100 * ci.low:.1f} to "
            f"{100 * ci.high:.1f}, paired over 5 seeds, p = {expected.pvalue:.3f})." in text)
    assert "Ranking on test accuracy: transfer 84.6%" in text


def test_welch_when_the_seeds_do_not_pair(store, tmp_path):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    for seed, t in enumerate(TRANSFER_TEST[:4]):
        log_fake_run(client, eid, strategy="transfer", seed=seed, val_acc=[0.9], test_acc=t)
    for seed, s in enumerate(SCRATCH_TEST[:3]):
        log_fake_run(client, eid, strategy="scratch", seed=10 + seed, val_acc=[0.8], test_acc=s)
    comparison = build(uri)
    expected = scipy_stats.ttest_ind(TRANSFER_TEST[:4], SCRATCH_TEST[:3], equal_var=False)
    got = comparison.paired.iloc[0]
    assert got["test"] == "Welch t" and (got["n_a"], got["n_b"], got["n"]) == (4, 3, 3)
    assert got["p_value"] == pytest.approx(expected.pvalue)
    assert got["ci_low"] == pytest.approx(expected.confidence_interval(0.95).low)
    assert "Welch's t-test over 4 and 3 runs, seeds not paired" in all_text(comparison)


def test_an_interval_that_includes_zero_names_no_winner(store, tmp_path):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    for seed, (a, b) in enumerate([(0.80, 0.70), (0.60, 0.72), (0.70, 0.74)]):
        log_fake_run(client, eid, strategy="transfer", seed=seed, val_acc=[0.5], test_acc=a)
        log_fake_run(client, eid, strategy="scratch", seed=seed, val_acc=[0.5], test_acc=b)
    text = all_text(build(uri))
    expected = scipy_stats.ttest_rel([0.70, 0.72, 0.74], [0.80, 0.60, 0.70])  # scratch − transfer
    ci = expected.confidence_interval(0.95)
    assert (f"No reliable difference between scratch and transfer: scratch − transfer = +2.0 points "
            f"(95% CI {100 * ci.low:.1f} to {100 * ci.high:.1f}, paired over 3 seeds, p = {expected.pvalue:.3f}); "
            f"the interval includes 0.") in text
    assert "beats" not in text


@pytest.mark.parametrize("seeds,add", [(1, "2 more seeds"), (2, "1 more seed")])
def test_fewer_than_three_pairs_is_insufficient_evidence(store, tmp_path, seeds, add):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    for seed in range(seeds):
        log_fake_run(client, eid, strategy="transfer", seed=seed, val_acc=[0.9], test_acc=0.9 + 0.01 * seed)
        log_fake_run(client, eid, strategy="scratch", seed=seed, val_acc=[0.5], test_acc=0.5)
    comparison = build(uri)
    text = all_text(comparison)
    assert f"the evidence is insufficient to name a winner; add at least {add} to both" in text
    assert "beats" not in text
    assert comparison.paired.iloc[0]["n"] == seeds


def test_headline_falls_back_to_validation_with_a_note(store, tmp_path):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    log_fake_run(client, eid, strategy="transfer", val_acc=[0.9], test_acc=0.5)
    log_fake_run(client, eid, strategy="scratch", val_acc=[0.6])  # an older run: no test split
    comparison = build(uri)
    assert comparison.metric == "best_val_acc"
    assert "Ranking on best validation accuracy: transfer 90.0%" in all_text(comparison)
    assert any("1 run logged no test accuracy" in n and "optimistic" in n for n in comparison.notes)


def test_test_accuracy_is_the_headline_and_the_first_accuracy_column(store, tmp_path):
    from tlexp import report

    client, uri = store
    eid = new_experiment(client, tmp_path)
    log_fake_run(client, eid, strategy="transfer", val_acc=[0.9], test_acc=0.5)
    log_fake_run(client, eid, strategy="scratch", val_acc=[0.6], test_acc=0.55)
    comparison = build(uri)
    assert "Ranking on test accuracy: scratch 55.0% (1 run), transfer 50.0% (1 run)." in all_text(comparison)
    columns = list(report.display_table(comparison, group="accuracy").columns)
    assert columns[:4] == ["Strategy", "Runs", "Test acc (%)", "Best val acc (%)"]


def test_only_one_strategy_reports_what_there_is(store, tmp_path):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    log_fake_run(client, eid, strategy="transfer", seed=1, val_acc=[0.5, 0.8])
    log_fake_run(client, eid, strategy="transfer", seed=2, val_acc=[0.5, 0.6])
    comparison = build(uri)
    text = all_text(comparison)
    assert "Only transfer was run here: best validation accuracy 70.0% ± 14.1 (2 runs)" in text
    assert len(comparison.table) == 1 and comparison.paired is None


# ------------------------------------------------------------------------ identity and tuning
def test_runs_that_differ_only_in_lr_never_share_a_row(store, tmp_path):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    for seed in range(3):
        log_fake_run(client, eid, strategy="transfer", seed=seed, val_acc=[0.8], test_acc=0.8, lr=1e-3)
        log_fake_run(client, eid, strategy="transfer", seed=seed, val_acc=[0.7], test_acc=0.7, lr=1e-2)
    comparison = build(uri)
    assert comparison.row_keys == ["lr"] and comparison.group_keys == []
    assert sorted(comparison.table["lr"]) == ["0.001", "0.01"]
    assert set(comparison.table["n_runs"]) == {3}
    assert row(comparison.table, "transfer", lr="0.01")["test_acc_mean"] == pytest.approx(0.7)


def test_a_repeated_run_counts_once_and_is_named(store, tmp_path):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    old = log_fake_run(client, eid, strategy="scratch", seed=1, val_acc=[0.2], test_acc=0.2, started_s=0)
    new = log_fake_run(client, eid, strategy="scratch", seed=1, val_acc=[0.6], test_acc=0.6, started_s=60)
    log_fake_run(client, eid, strategy="scratch", seed=2, val_acc=[0.4], test_acc=0.4)
    comparison = build(uri)
    only = comparison.table.iloc[0]
    assert only["n_runs"] == 2 and only["test_acc_mean"] == pytest.approx(0.5)  # the newer 0.6, not 0.2
    assert old not in set(comparison.stats["run_id"]) and new in set(comparison.stats["run_id"])
    assert any(f"({old[:8]}) repeats the settings and seed 1 of" in n and f"({new[:8]})" in n
               for n in comparison.notes)


def test_runs_group_by_data_fingerprint_not_the_data_string(store, tmp_path):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    # ./base and /abs/base hold the same images; another folder also called base holds others
    log_fake_run(client, eid, strategy="scratch", seed=1, dataset="base", val_acc=[0.5], test_acc=0.5,
                 data_fingerprint="aaaa1111bbbb2222", params={"data": "./base"})
    log_fake_run(client, eid, strategy="scratch", seed=2, dataset="base", val_acc=[0.7], test_acc=0.7,
                 data_fingerprint="aaaa1111bbbb2222", params={"data": "/abs/base"})
    log_fake_run(client, eid, strategy="scratch", seed=1, dataset="base", val_acc=[0.9], test_acc=0.9,
                 data_fingerprint="cccc3333dddd4444", params={"data": "/other/base"})
    comparison = build(uri)
    assert comparison.group_keys == ["data"]
    table = comparison.table
    assert row(table, "scratch", data="base@aaaa1111bb")["n_runs"] == 2
    assert row(table, "scratch", data="base@cccc3333dd")["test_acc_mean"] == pytest.approx(0.9)


def _lr_study(client: MlflowClient, eid: str) -> None:
    """transfer: lr 1e-3 best on validation; scratch: lr 1e-2 best on validation (and on test).

    At the default lr (1e-3) transfer is far ahead; tuned, scratch catches up: the verdict changes.
    """
    for seed in range(3):
        jitter = 0.01 * seed
        log_fake_run(client, eid, strategy="transfer", seed=seed, lr=1e-3, val_acc=[0.80], test_acc=0.80 + jitter)
        log_fake_run(client, eid, strategy="transfer", seed=seed, lr=1e-2, val_acc=[0.60], test_acc=0.62 + jitter)
        log_fake_run(client, eid, strategy="scratch", seed=seed, lr=1e-3, val_acc=[0.40], test_acc=0.40 + jitter)
        log_fake_run(client, eid, strategy="scratch", seed=seed, lr=1e-2, val_acc=[0.82],
                     test_acc=(0.78, 0.84, 0.79)[seed])


def test_tuned_comparison_picks_the_lr_on_validation_and_reports_its_test(store, tmp_path):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    _lr_study(client, eid)
    result = run_compare(EXP, tracking_uri=uri, output=tmp_path / "out", log_to_mlflow=False, console=quiet())
    comparison = result.comparison
    tuning = pd.read_csv(tmp_path / "out" / "tuning.csv").set_index("strategy")
    assert tuning.loc["transfer", "lr"] == pytest.approx(1e-3) and tuning.loc["scratch", "lr"] == pytest.approx(1e-2)
    assert tuning.loc["scratch", "val_acc_mean"] == pytest.approx(0.82)
    assert tuning.loc["scratch", "candidates_lr"] == "0.001,0.01"
    headline = comparison.headline.set_index("strategy")
    assert list(headline.loc[["transfer", "scratch"], "lr"]) == ["0.001", "0.01"]
    assert headline.loc["scratch", "test_acc_mean"] == pytest.approx(np.mean([0.78, 0.84, 0.79]))
    csv = pd.read_csv(tmp_path / "out" / "comparison.csv")
    assert len(csv) == 4 and csv["chosen"].sum() == 2  # the per-lr rows stay in the CSV
    paired = pd.read_csv(tmp_path / "out" / "paired.csv").iloc[0]
    expected = scipy_stats.ttest_rel([0.80, 0.81, 0.82], [0.78, 0.84, 0.79])
    assert paired["p_value"] == pytest.approx(expected.pvalue)  # the tuned runs are compared
    text = all_text(comparison)
    assert "Chosen per strategy on mean validation accuracy" in text and "scratch lr=0.01 (val 82.0%)" in text
    assert ("At the default settings (transfer lr=0.001; scratch lr=0.001) transfer is reliably ahead; tuned, no "
            "strategy is reliably ahead (transfer ranks first): tuning changes the verdict." in text)
    assert "lr" in report_columns(comparison)


def report_columns(comparison: compare.Comparison) -> list[str]:
    from tlexp import report

    return list(report.display_table(comparison).columns)


def test_one_lr_per_strategy_is_no_tuning(store, tmp_path):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    log_fake_run(client, eid, strategy="transfer", lr=1e-3, val_acc=[0.8], test_acc=0.8)
    log_fake_run(client, eid, strategy="scratch", lr=1e-2, val_acc=[0.6], test_acc=0.6)
    comparison = build(uri)
    assert comparison.tuning is None and comparison.group_keys == [] and comparison.tuned_keys == ["lr"]
    assert len(comparison.paired) == 1  # different lrs per strategy still compare in one group
    assert not any(s.title.startswith("Tuning") for s in comparison.findings)


# ---------------------------------------------------------------------------- data efficiency
def _sweep(client: MlflowClient, eid: str, accuracies: dict[str, dict[int, list[float]]]) -> None:
    parent = log_sweep_parent(client, eid)
    for strategy, per_size in accuracies.items():
        for size, values in per_size.items():
            for seed, acc in enumerate(values):
                log_fake_run(client, eid, strategy=strategy, seed=seed, samples_per_class=size,
                             val_acc=[acc / 2, acc], test_acc=acc, parent_run_id=parent)


def test_crossover_from_the_confidence_intervals(store, tmp_path):
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
    paired = comparison.paired.set_index(["samples_per_class", "strategy_a", "strategy_b"])
    at5 = scipy_stats.ttest_rel([0.80, 0.82, 0.84], [0.20, 0.30, 0.40])
    assert paired.loc[("5", "transfer", "scratch"), "mean_diff"] == pytest.approx(0.52)
    assert paired.loc[("5", "transfer", "scratch"), "ci_low"] == pytest.approx(at5.confidence_interval().low)
    at80 = scipy_stats.ttest_rel([0.90, 0.91, 0.92], [0.89, 0.905, 0.92]).confidence_interval()
    assert at80.low < 0 < at80.high  # scratch caught up at 80; at 20 transfer is still reliably ahead
    text = all_text(comparison)
    assert (f"Crossover at 80 training samples per class: from there on the 95% CI of (best pretrained − scratch) "
            f"on test accuracy includes 0 or lies below it (transfer − scratch = +0.5 points, 95% CI "
            f"{100 * at80.low:.1f} to {100 * at80.high:.1f} at 80).") in text
    assert len(comparison.table) == 6 and comparison.group_keys == ["samples_per_class"]


def test_crossover_not_within_the_measured_range(store, tmp_path):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    _sweep(client, eid, {
        "finetune": {10: [0.80, 0.82, 0.81], 100: [0.95, 0.97, 0.96]},
        "transfer": {10: [0.85, 0.87, 0.86], 100: [0.90, 0.92, 0.91]},
        "scratch": {10: [0.20, 0.30, 0.25], 100: [0.70, 0.73, 0.72]},
    })
    text = all_text(build(uri))
    assert ("No crossover within the measured range (10-100 training samples per class): scratch is still reliably "
            "behind at the largest size; finetune − scratch = +24.3 points at 100 per class (95% CI" in text)


def test_no_crossover_when_scratch_falls_behind_again(store, tmp_path):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    # caught up at 10 (interval includes 0), behind again at 50: no crossover
    _sweep(client, eid, {
        "transfer": {10: [0.50, 0.60, 0.55], 50: [0.90, 0.91, 0.92]},
        "scratch": {10: [0.55, 0.50, 0.58], 50: [0.60, 0.62, 0.61]},
    })
    assert "No crossover within the measured range" in all_text(build(uri))


def test_no_data_efficiency_without_different_sizes(store, tmp_path):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    # same --samples-per-class, but the measured size per class differs a little (like two class counts)
    log_fake_run(client, eid, strategy="transfer", val_acc=[0.8], train_size=1000)
    log_fake_run(client, eid, strategy="scratch", val_acc=[0.5], train_size=990)
    comparison = build(uri)
    assert comparison.efficiency is None
    assert not any(s.title.startswith("Data efficiency") for s in comparison.findings)


# ------------------------------------------------------------------------- files and MLflow
def test_run_compare_writes_every_format_and_logs_one_comparison_run(store, tmp_path):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    for seed in (1, 2):
        log_fake_run(client, eid, strategy="transfer", seed=seed, val_acc=[0.7, 0.9 - 0.02 * seed],
                     test_acc=0.9 - 0.02 * seed)
        log_fake_run(client, eid, strategy="scratch", seed=seed, val_acc=[0.3, 0.5 + 0.02 * seed],
                     test_acc=0.5 + 0.02 * seed)
    console = quiet()
    result = run_compare(EXP, tracking_uri=uri, output=tmp_path / "out", console=console)

    names = {p.name for p in result.files}
    assert {"comparison.md", "comparison.csv", "paired.csv", "report.html", "curves.png", "bars.png",
            "time_to_accuracy.png"} <= names
    assert "tuning.csv" not in names and "data_efficiency.csv" not in names
    for path in result.files:
        assert path.exists() and path.stat().st_size > 0
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv = pd.read_csv(tmp_path / "out" / "comparison.csv")
    assert csv.set_index("strategy").loc["transfer", "test_acc_mean"] == pytest.approx(0.87)
    assert csv.set_index("strategy").loc["transfer", "model"] == "efficientnet_lite0"
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert "| transfer | 2 | 87.0 ± 1.4 |" in md and "![Training curves](curves.png)" in md
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.count("src='data:image/png;base64,") == 3 and "<td>87.0 ± 1.4</td>" in html
    assert "Ranking on test accuracy: transfer 87.0%" in html
    printed = console.file.getvalue()
    assert "87.0 ± 1.4" in printed and "Ranking on test accuracy" in printed
    assert f"Logged to MLflow as run {result.run_id}" in printed

    logged = client.get_run(result.run_id)
    assert logged.info.status == "FINISHED"
    assert logged.data.tags["tlexp.kind"] == "comparison" and logged.data.tags["tlexp.experiment"] == EXP
    assert logged.data.tags["tlexp.runs_compared"] == "4"
    description = logged.data.tags["mlflow.note.content"]  # MLflow's UI shows it on the run overview
    assert description.startswith(f"# Comparison: {EXP}") and "Ranking on test accuracy: transfer 87.0%" in description
    assert {a.path for a in client.list_artifacts(result.run_id)} == names

    # Reading the experiment again ignores the comparison run and gives the same table.
    everything = load_runs(EXP, tracking_uri=uri, all_runs=True)
    runs, notes = compare.select_training_runs(everything, EXP)
    assert len(everything) == 5 and result.run_id not in set(runs["run_id"])
    assert any("1 earlier comparison run" in note for note in notes)
    pd.testing.assert_frame_equal(build(uri).table, result.comparison.table)


def test_the_comparison_run_is_updated_in_place(store, tmp_path, monkeypatch, no_charts):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    # What older tlexp left: one comparison run per compare. The newest is reused, the other deleted.
    older, newer = (client.create_run(eid, start_time=start, tags={"tlexp.kind": "comparison"}).info.run_id
                    for start in (1_000, 2_000))
    _sweep(client, eid, {"transfer": {5: [0.8, 0.82], 50: [0.9, 0.91]}, "scratch": {5: [0.3, 0.4], 50: [0.8, 0.9]}})
    first = run_compare(EXP, tracking_uri=uri, output=tmp_path / "out", console=quiet())
    first_tags = client.get_run(first.run_id).data.tags
    assert "data_efficiency.csv" in {a.path for a in client.list_artifacts(first.run_id)}
    assert first.run_id == newer and client.get_run(older).info.lifecycle_stage == "deleted"

    # New runs without sizes: the per-size files of the first report must not linger as artifacts.
    for run_id in load_runs(EXP, tracking_uri=uri)["run_id"]:
        client.delete_run(run_id)
    log_fake_run(client, eid, strategy="transfer", val_acc=[0.9], test_acc=0.9)
    log_fake_run(client, eid, strategy="scratch", val_acc=[0.5], test_acc=0.5)
    monkeypatch.setattr("tlexp.tracking.comparison.dt", _later_clock(first_tags["tlexp.generated_at"]))
    second = run_compare(EXP, tracking_uri=uri, output=tmp_path / "out", console=quiet())
    assert second.run_id == first.run_id
    artifacts = {a.path for a in client.list_artifacts(second.run_id)}
    assert artifacts == {p.name for p in second.files}
    assert "data_efficiency.csv" not in artifacts and "paired.csv" in artifacts
    tags = client.get_run(second.run_id).data.tags
    assert tags["tlexp.generated_at"] > first_tags["tlexp.generated_at"]
    assert "Ranking on test accuracy: transfer 90.0% (1 run), scratch 50.0% (1 run)" in tags["mlflow.note.content"]
    assert client.get_run(second.run_id).info.status == "FINISHED"
    comparison_runs = client.search_runs([eid], "tags.`tlexp.kind` = 'comparison'")
    assert [r.info.run_id for r in comparison_runs] == [first.run_id]


def _later_clock(after: str):
    """A stand-in for the datetime module whose now() is one minute after the ``after`` timestamp."""
    import datetime as dt

    class Clock:
        timezone = dt.timezone

        class datetime:
            @staticmethod
            def now(tz=None):
                return dt.datetime.strptime(after, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=tz) + dt.timedelta(minutes=1)
    return Clock


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
    ci = scipy_stats.ttest_rel([0.8, 0.82], [0.3, 0.4]).confidence_interval()
    assert f"| 5 | transfer − scratch | 2 | +46.0 | {100 * ci.low:.1f} to {100 * ci.high:.1f} |" in md


def test_a_reused_output_folder_loses_only_what_compare_wrote(store, tmp_path, no_charts):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    _sweep(client, eid, {"transfer": {5: [0.8, 0.82], 50: [0.9, 0.91]}, "scratch": {5: [0.3, 0.4], 50: [0.8, 0.9]}})
    out = tmp_path / "out"
    run_compare(EXP, tracking_uri=uri, output=out, log_to_mlflow=False, console=quiet())
    assert (out / "data_efficiency.csv").exists()
    (out / "my-notes.txt").write_text("mine")
    (out / "bars-by-hand.png").write_bytes(b"mine")
    for run_id in load_runs(EXP, tracking_uri=uri)["run_id"]:
        client.delete_run(run_id)
    log_fake_run(client, eid, strategy="scratch", val_acc=[0.5], test_acc=0.5)
    second = run_compare(EXP, tracking_uri=uri, output=out, log_to_mlflow=False, console=quiet())
    left = {p.name for p in out.iterdir()}
    assert left == {p.name for p in second.files} | {"my-notes.txt", "bars-by-hand.png", ".tlexp-compare.json"}
    assert not (out / "data_efficiency.csv").exists() and not (out / "paired.csv").exists()


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
    monkeypatch.setattr(compare.run.os, "access", lambda path, mode: Path(path) != tmp_path)
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
    with pytest.raises(TrackingError, match="report was written, but logging it to MLflow failed"):
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
    via_client = compare.history.history_from_client(MlflowClient(tracking_uri=uri), list(runs["run_id"]),
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
    lines = compare.findings.overfitting_findings(rows)
    assert not any("generalises best" in line for line in lines)
    assert any("negative gap" in line for line in lines)
    positive = compare.findings.overfitting_findings(rows.assign(train_val_gap_mean=[0.02, 0.08]))
    assert any(line.startswith("scratch generalises best") for line in positive)


# ------------------------------------------------------------------------------ terminal
def test_terminal_tables_fit_80_columns_without_splitting_words(store, tmp_path):
    from rich.console import Console

    from tlexp import report

    client, uri = store
    eid = new_experiment(client, tmp_path)
    _sweep(client, eid, {"transfer": {5: [0.8, 0.82], 50: [0.9, 0.91]}, "finetune": {5: [0.7, 0.8], 50: [0.9, 0.9]},
                         "scratch": {5: [0.3, 0.4], 50: [0.8, 0.9]}})
    comparison = build(uri)
    console = Console(file=io.StringIO(), width=80, record=True)
    report.print_report(compare.CompareResult(comparison, tmp_path / "out"), console=console)
    text = console.export_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    for group in ("accuracy", "cost"):
        frame = report.display_table(comparison, group=group)
        table, dropped = report.fitted_table(console, frame, title="t", text_columns=report.label_columns(comparison))
        shown = [c.header for c in table.columns]
        assert "Strategy" in shown and shown == [c for c in frame.columns if c not in dropped]
        for header in shown:
            for word in str(header).split():
                assert any(word in line.split() for line in lines), f"header word {word!r} was split"
    assert "left out at this width" in text  # the cost table has more columns than fit
    # on a wide terminal nothing is left out
    assert report.fitted_table(Console(width=300), report.display_table(comparison, group="cost"), title="t",
                               text_columns=report.label_columns(comparison))[1] == []


# ------------------------------------------------------------------ params as tlexp logs them
def test_full_logged_params_make_rows_by_identity(store, tmp_path):
    """Runs carrying every param a real run logs (TrainConfig.to_params and the data fingerprint):
    the lr splits rows, weights (none for scratch) does not split groups, and the run name, device and
    worker count (not part of the identity) change nothing."""
    from tlexp.config import TrainConfig

    client, uri = store
    eid = new_experiment(client, tmp_path)
    base = TrainConfig(model="tinycnn", data=str(tmp_path / "base"), image_size=8, epochs=1, weights="w.pt",
                       samples_per_class=3)
    for seed in range(3):
        for strategy in ("scratch", "finetune"):
            for lr, val in ((1e-3, 0.6), (1e-2, 0.7 if strategy == "scratch" else 0.5)):
                config = base.replace(strategy=strategy, lr=lr, seed=seed, run_name=f"r{seed}{lr}",
                                      num_workers=seed, device=("cpu", "auto", "cuda")[seed]).resolve()
                log_fake_run(client, eid, strategy=strategy, seed=seed, lr=lr, val_acc=[val], test_acc=val,
                             dataset="base", data_fingerprint="f00d" * 8,
                             params={**config.to_params(), "device_resolved": "cpu", "amp_dtype": "fp32"})
    comparison = build(uri)
    assert comparison.group_keys == [] and sorted(comparison.tuned_keys) == ["lr", "weights"]
    assert comparison.shared["data"] == "base@f00df00df0" and comparison.shared["samples_per_class"] == "3"
    assert len(comparison.table) == 4 and set(comparison.table["n_runs"]) == {3}
    headline = comparison.headline.set_index("strategy")
    assert headline.loc["scratch", "lr"] == "0.01" and headline.loc["finetune", "lr"] == "0.001"
    assert headline.loc["scratch", "weights"] == "none" and headline.loc["finetune", "weights"] == "w.pt"
    assert len(comparison.paired) == 1 and comparison.paired.iloc[0]["n"] == 3


def test_a_store_that_refuses_writes_keeps_the_report_and_says_so(store, tmp_path, monkeypatch, no_charts):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    log_fake_run(client, eid, strategy="scratch", val_acc=[0.3, 0.5])

    def read_only(*args, **kwargs):
        raise OSError("attempt to write a readonly database")

    monkeypatch.setattr(MlflowClient, "create_run", read_only)  # fails before any comparison run exists
    with pytest.raises(TrackingError, match=r"report was written, but logging it to MLflow failed \(OSError: "
                                            r"attempt to write a readonly database\)"):
        run_compare(EXP, tracking_uri=uri, output=tmp_path / "out", console=quiet())
    assert (tmp_path / "out" / "comparison.md").exists()


def test_report_and_plots_import_only_the_data_types_from_compare():
    """The report draws a Comparison; it does not reach into how it was computed (no import cycle)."""
    import ast

    import tlexp

    root = Path(tlexp.__file__).parent
    for module in ("report.py", "plots.py"):
        tree = ast.parse((root / module).read_text(encoding="utf-8"))
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        from_compare = {name for name in imported if "compare" in name}
        assert from_compare <= {"tlexp.compare.types"}, (module, from_compare)


def test_a_manifest_never_reaches_outside_the_output_folder(tmp_path):
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("keep")
    (out / "old.png").write_bytes(b"x")
    (out / ".tlexp-compare.json").write_text('{"files": ["old.png", "../victim.txt", "/etc/hostname", 7]}')
    compare.run.clear_previous(out)
    assert not (out / "old.png").exists() and victim.read_text() == "keep"
    (out / ".tlexp-compare.json").write_text("not json")
    compare.run.clear_previous(out)  # a damaged manifest clears nothing and raises nothing


def test_runs_without_a_fingerprint_are_named_when_others_have_one(store, tmp_path):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    log_fake_run(client, eid, strategy="scratch", seed=1, val_acc=[0.5], data_fingerprint="ab" * 16)
    log_fake_run(client, eid, strategy="scratch", seed=2, val_acc=[0.7])
    comparison = build(uri)
    assert len(comparison.table) == 2  # the same folder perhaps, but nothing proves it
    assert any("1 run logged no data fingerprint (older tlexp): it is grouped by the --data string" in n
               for n in comparison.notes)


def test_a_flipped_order_without_a_reliable_winner_is_not_a_new_verdict(store, tmp_path):
    client, uri = store
    eid = new_experiment(client, tmp_path)
    noise = (0.10, -0.08, 0.0)  # large against the differences: no interval excludes 0
    for seed, e in enumerate(noise):
        log_fake_run(client, eid, strategy="transfer", seed=seed, lr=1e-3, val_acc=[0.6], test_acc=0.62 + e)
        log_fake_run(client, eid, strategy="scratch", seed=seed, lr=1e-3, val_acc=[0.5], test_acc=0.60 - e)
        log_fake_run(client, eid, strategy="scratch", seed=seed, lr=1e-2, val_acc=[0.7], test_acc=0.64 - e)
    text = all_text(build(uri))
    assert ("no strategy is reliably ahead (transfer ranks first); tuned, no strategy is reliably ahead (scratch "
            "ranks first): tuning does not change the verdict, only the order.") in text
