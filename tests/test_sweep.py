"""tlexp sweep: grid expansion, nesting under one parent, skip/resume after an interruption."""

import pytest
from helpers import tiny_weights
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from tlexp import experiment
from tlexp.cli import app
from tlexp.config import ConfigError, TrainConfig
from tlexp.sweep import SweepSpec, cell_id, plan, run_sweep


def _spec(tmp_path, **changes) -> SweepSpec:
    base = TrainConfig(model="tinycnn", image_size=12, epochs=1, weights=str(tiny_weights(tmp_path / "w.pt")),
                       head="linear")
    fields = dict(base=base, strategies=("scratch", "finetune"), seeds=(0,), samples_per_class=(2, 4))
    fields.update(changes)
    return SweepSpec(**fields)


def _runs(kind: str):
    client = MlflowClient()
    ids = [e.experiment_id for e in client.search_experiments()]
    return [r for r in client.search_runs(ids) if r.data.tags.get("tlexp.kind") == kind]


def test_grid_expands_seed_then_size_then_strategy(tmp_path):
    spec = _spec(tmp_path, seeds=(0, 1), samples_per_class=(5, None))
    cells = spec.cells()
    assert len(cells) == 8
    assert [(c.seed, c.samples_per_class, c.strategy) for c in cells[:4]] == [
        (0, 5, "scratch"), (0, 5, "finetune"), (0, None, "scratch"), (0, None, "finetune")]
    assert len({cell_id(c) for c in cells}) == 8
    assert cells[0].weights is None and cells[1].weights is not None  # scratch never loads weights
    assert spec.sweep_id() == _spec(tmp_path, seeds=(0, 1), samples_per_class=(5, None)).sweep_id()
    assert spec.sweep_id() != _spec(tmp_path, seeds=(0, 2), samples_per_class=(5, None)).sweep_id()
    assert cell_id(cells[0]) != cell_id(cells[0].replace(lr=0.01))
    assert cell_id(cells[0]) == cell_id(cells[0].replace(run_name="other", num_workers=7))


def test_duplicate_grid_values_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="--seeds lists a value twice"):
        _spec(tmp_path, seeds=(1, 1)).validate()


def test_children_nest_under_one_parent_and_a_rerun_skips_them(tracking_uri, tmp_path):
    spec = _spec(tmp_path)
    result = run_sweep(spec)
    assert [c.status for c in result.cells] == ["FINISHED"] * 4
    (parent,) = _runs("sweep")
    children = _runs("train")
    assert len(children) == 4 and parent.info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {c.data.tags["tlexp.sweep_id"] for c in children} == {spec.sweep_id()}
    assert parent.data.params["sweep_cells"] == "4"
    assert all(c.action == "skip" for c in plan(spec))
    again = run_sweep(spec)
    assert again.parent_run_id == parent.info.run_id and len(_runs("train")) == 4


def test_an_interrupted_sweep_resumes_without_rerunning_finished_cells(tracking_uri, tmp_path, monkeypatch):
    spec = _spec(tmp_path)
    real_fit = experiment.fit
    calls = []

    def fit_that_is_interrupted_in_cell_3(prep, logger, reporter, checkpoint):
        calls.append(prep.config.strategy)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_fit(prep, logger, reporter, checkpoint)

    monkeypatch.setattr(experiment, "fit", fit_that_is_interrupted_in_cell_3)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec)
    statuses = sorted(r.info.status for r in _runs("train"))
    assert statuses == ["FINISHED", "FINISHED", "KILLED"]  # only the cell in progress is lost
    assert _runs("sweep")[0].info.status == "KILLED"
    assert [c.action for c in plan(spec)] == ["skip", "skip", "rerun", "run"]

    calls.clear()
    result = run_sweep(spec)
    assert len(calls) == 2  # cells 3 and 4 only
    assert sorted(r.info.status for r in _runs("train")) == ["FINISHED"] * 4 + ["KILLED"]
    (parent,) = _runs("sweep")
    assert parent.info.run_id == result.parent_run_id and parent.info.status == "FINISHED"


def test_dry_run_lists_cells_and_writes_no_run(tracking_uri):
    result = CliRunner().invoke(app, ["sweep", "--strategies", "scratch,transfer", "--seeds", "0,1",
                                      "--samples-per-class", "5,all", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "8 cells: 0 already finished, 8 to run." in result.output
    assert _runs("train") == [] and _runs("sweep") == []


def test_bad_grid_value_is_one_line_and_trains_nothing(tracking_uri):
    result = CliRunner().invoke(app, ["sweep", "--seeds", "0,x"])
    assert result.exit_code == 2
    assert "--seeds takes integers, got 'x'" in result.output
    assert _runs("sweep") == []


def test_time_left_uses_cells_of_the_same_strategy_and_size(tmp_path):
    from tlexp.sweep import Cell, estimate_seconds_left

    cells = [Cell(i, cfg, "", "run") for i, cfg in enumerate(_spec(tmp_path, samples_per_class=(2, None)).cells())]
    # order: (2, scratch), (2, finetune), (all, scratch), (all, finetune)
    for cell, seconds in zip(cells, (1.0, 2.0, 10.0, 20.0)):
        cell.seconds = seconds
    assert estimate_seconds_left([], cells) is None
    assert estimate_seconds_left(cells[:1], cells[1:]) == 3.0  # nothing like them yet: the overall mean
    assert estimate_seconds_left(cells, cells) == 33.0
    assert estimate_seconds_left(cells[:3], cells[3:]) == 2.0  # finetune's mean so far


def test_preflight_prepares_each_strategy_and_each_seed_once_at_the_largest_size(tmp_path, monkeypatch):
    prepared = []
    monkeypatch.setattr(experiment, "prepare", lambda cfg, reporter=None: prepared.append(cfg))
    from tlexp.sweep import preflight

    spec = _spec(tmp_path, strategies=("scratch", "transfer", "finetune"), seeds=(0, 1), samples_per_class=(2, None, 4))
    preflight(spec)
    assert len(spec.cells()) == 18
    assert {c.samples_per_class for c in prepared} == {4}  # a size fails only by being too large
    assert {c.strategy for c in prepared} == {"scratch", "transfer", "finetune"}
    assert {c.seed for c in prepared} == {0, 1}
    assert len(prepared) == 4  # not one per cell
    prepared.clear()
    preflight(_spec(tmp_path, samples_per_class=(None,)))
    assert [(c.strategy, c.samples_per_class) for c in prepared] == [("scratch", None), ("finetune", None)]


def test_a_study_named_with_quotes_runs_resumes_and_prints_a_pasteable_hint(tracking_uri, tmp_path):
    import shlex

    name = "bob's \"big\" study"
    args = ["sweep", "--experiment", name, "--strategies", "scratch", "--seeds", "0", "--samples-per-class", "2",
            "--model", "tinycnn", "--image-size", "12", "--epochs", "1", "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (child,) = _runs("train")
    assert child.data.tags["tlexp.experiment"] == name and child.info.status == "FINISHED"
    hint = next(line for line in result.output.splitlines() if "tlexp compare" in line)
    command = hint.split("`")[1]
    assert shlex.split(command) == ["tlexp", "compare", "--experiment", name]
    again = CliRunner().invoke(app, args + ["--dry-run"])  # the finished cell is found again by its tags
    assert again.exit_code == 0 and "1 cells: 1 already finished, 0 to run." in again.output, again.output


def test_tag_filters_match_exactly_whatever_quotes_a_value_holds(tracking_uri):
    from tlexp import tracking

    client = MlflowClient()
    exp = client.create_experiment("quotes")
    values = ["plain", "bob's study", 'say "hi"', "it's \"x\"", "it_s \"x\"", "back\\slash'", "50% café"]
    for value in values:
        client.create_run(exp, tags={"k": value})
    for value in values:
        found = tracking.search_tagged(client, [exp], {"k": value})
        assert [r.data.tags["k"] for r in found] == [value]
    assert tracking.tag_equals("k", "bob's") == "tags.`k` = \"bob's\""
