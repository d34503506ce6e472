"""tlexp sweep --lrs: a learning-rate axis in the grid (strategies x seeds x sizes x lrs), in the sweep id,
the cell ids and the time estimate."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from helpers import all_runs, tiny_weights
from tlexp.cli import app
from tlexp.config import ConfigError, TrainConfig
from tlexp.sweep import Cell, SweepSpec, cell_id, estimate_seconds_left


def _spec(**changes) -> SweepSpec:
    fields = dict(base=TrainConfig(model="tinycnn", image_size=12, epochs=2), strategies=("scratch", "transfer"),
                  seeds=(0, 1, 2), samples_per_class=(10,), lrs=(1e-3, 1e-2))
    fields.update(changes)
    return SweepSpec(**fields)


def _runs(kind: str) -> list:
    return [r for r in all_runs() if r.data.tags.get("tlexp.kind") == kind]


def test_the_lr_axis_multiplies_the_grid_and_enters_every_id():
    spec = _spec()
    cells = spec.cells()
    assert len(cells) == 12
    assert sorted({c.lr for c in cells}) == [1e-3, 1e-2]
    assert len({cell_id(c) for c in cells}) == 12  # cell ids tell the lrs apart
    assert spec.grid_params()["sweep_cells"] == "12" and spec.grid_params()["sweep_lrs"] == "0.001,0.01"
    assert spec.sweep_id() != _spec(lrs=(1e-3, 3e-2)).sweep_id()
    # The base --lr does not matter once there is an axis; without one it is the study's lr.
    assert spec.sweep_id() == _spec(base=spec.base.replace(lr=0.5)).sweep_id()
    plain = _spec(lrs=())
    assert len(plain.cells()) == 6 and {c.lr for c in plain.cells()} == {1e-3}
    assert plain.sweep_id() != _spec(lrs=(), base=spec.base.replace(lr=0.5)).sweep_id()
    with pytest.raises(ConfigError, match="--lrs lists a value twice"):
        _spec(lrs=(1e-3, 0.001)).validate()
    with pytest.raises(ConfigError, match="--lr must be a finite number"):
        _spec(lrs=(1e-3, float("inf"))).validate()


def test_the_time_estimate_groups_cells_by_lr_too():
    base = TrainConfig()
    done = [Cell(1, base.replace(lr=1e-3), "a", "run", seconds=10.0),
            Cell(2, base.replace(lr=1e-2), "b", "run", seconds=100.0)]
    assert estimate_seconds_left(done, [Cell(3, base.replace(lr=1e-2, seed=1), "c", "run")]) == 100.0
    assert estimate_seconds_left(done, [Cell(3, base.replace(lr=1e-3, seed=1), "c", "run")]) == 10.0


def test_one_lr_in_lrs_is_the_same_study_as_lr_and_both_together_are_refused(schema_store):
    def plan_lines(*args):
        result = CliRunner().invoke(app, ["sweep", "--strategies", "scratch", "--seeds", "0",
                                          "--samples-per-class", "10", "--model", "tinycnn", *args, "--dry-run"])
        return result

    both = plan_lines("--lr", "0.01", "--lrs", "1e-3,1e-2")
    assert both.exit_code == 2
    assert both.output.strip() == ("Error: Give either --lr (one learning rate) or --lrs (a learning-rate axis), "
                                   "not both.")
    bad = plan_lines("--lrs", "1e-3,fast")
    assert bad.exit_code == 2 and "--lrs takes numbers such as 1e-3, got 'fast'" in bad.output
    assert "0.01" in plan_lines("--lrs", "0.01").output


def test_sweep_with_an_lr_axis_runs_every_cell_once(schema_store, tmp_path):
    """The acceptance command of issue 9: 2 strategies x 3 seeds x 2 lrs = 12 runs."""
    weights = tiny_weights(tmp_path / "w.pt")
    args = ["sweep", "--strategies", "scratch,transfer", "--seeds", "0,1,2", "--lrs", "1e-3,1e-2",
            "--samples-per-class", "10", "--epochs", "2", "--model", "tinycnn", "--image-size", "12",
            "--weights", str(weights), "--no-system-metrics", "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    children = _runs("train")
    assert len(children) == 12 and {r.info.status for r in children} == {"FINISHED"}
    combos = {(r.data.params["strategy"], r.data.params["seed"], float(r.data.params["lr"])) for r in children}
    assert len(combos) == 12 and {lr for *_, lr in combos} == {1e-3, 1e-2}
    (parent,) = _runs("sweep")
    assert parent.data.params["sweep_lrs"] == "0.001,0.01" and parent.data.params["sweep_cells"] == "12"
    again = CliRunner().invoke(app, [*args[:-1], "--dry-run"])
    assert "12 cells: 12 already finished, 0 to run." in again.output
