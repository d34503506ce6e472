"""tlexp.plots: charts drawn from small DataFrames, checked through the artists they contain."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex

from tlexp import plots

COLORS = plots.strategy_colors(["transfer", "scratch"])


def history(runs: dict[tuple[str, str], dict[str, list[float]]]) -> pd.DataFrame:
    """Long-format history from {(run_id, strategy): {metric: values per epoch}}."""
    rows = [(run_id, strategy, metric, step, value)
            for (run_id, strategy), curves in runs.items()
            for metric, values in curves.items()
            for step, value in enumerate(values, start=1)]
    return pd.DataFrame(rows, columns=["run_id", "strategy", "metric", "step", "value"])


def lines_by_label(ax) -> dict[str, object]:
    return {line.get_label().split(" (")[0]: line for line in ax.lines}


def band_colors(ax) -> list[str]:
    return [to_hex(c.get_facecolor()[0]) for c in ax.collections]


def test_strategy_colours_are_fixed_and_distinct():
    colors = plots.strategy_colors(["scratch", "mystery", "transfer", "finetune", "other"])
    assert colors["transfer"] == plots.KNOWN_COLORS["transfer"]
    assert colors["scratch"] == plots.KNOWN_COLORS["scratch"]
    assert len(set(colors.values())) == 5
    assert list(colors) == ["scratch", "mystery", "transfer", "finetune", "other"]  # legend order kept
    assert plots.strategy_colors(["transfer"])["transfer"] == colors["transfer"]


def test_curves_average_runs_of_different_lengths_by_epoch():
    frame = history({
        ("t1", "transfer"): {"val_acc": [0.5, 0.6, 0.7], "train_loss": [1.0, 0.5, 0.25]},
        ("t2", "transfer"): {"val_acc": [0.7, 0.8], "train_loss": [2.0, 1.5]},  # stopped after 2 epochs
        ("s1", "scratch"): {"val_acc": [0.1, 0.2, 0.3], "train_loss": [3.0, 2.0, 1.0]},
    })
    fig = plots.plot_curves(frame, colors=COLORS, title="epochs=3")
    train_loss, val_loss, train_acc, val_acc = fig.axes
    lines = lines_by_label(val_acc)
    assert list(lines["transfer"].get_xdata()) == [1, 2, 3]
    assert list(lines["transfer"].get_ydata()) == pytest.approx([60.0, 70.0, 70.0])  # %, mean where both ran
    assert list(lines["scratch"].get_ydata()) == pytest.approx([10.0, 20.0, 30.0])
    assert lines["transfer"].get_label() == "transfer (2 runs)"
    assert lines["transfer"].get_color() == COLORS["transfer"] and lines["scratch"].get_color() == COLORS["scratch"]
    # a band for transfer (two runs), none for scratch (one run has no spread)
    assert band_colors(val_acc) == [COLORS["transfer"]]
    assert list(lines_by_label(train_loss)["transfer"].get_ydata()) == pytest.approx([1.5, 1.0, 0.25])  # no %
    assert not val_loss.lines  # nothing logged: an empty panel, not an error
    assert val_acc.get_xlabel() == "Epoch" and val_acc.get_ylabel() == "Accuracy (%)"
    assert train_loss.get_ylabel() == "Loss" and val_acc.get_title() == "Validation accuracy"
    assert "epochs=3" in fig.get_suptitle() and "band: ±1 std" in fig.get_suptitle()


def test_time_to_accuracy_plots_cumulative_seconds():
    frame = history({
        ("t1", "transfer"): {"val_acc": [0.1, 0.2, 0.3], "epoch_time_s": [1.0, 2.0, 3.0]},
        ("t2", "transfer"): {"val_acc": [0.3, 0.4, 0.5], "epoch_time_s": [3.0, 2.0, 1.0]},
        ("s1", "scratch"): {"val_acc": [0.0, 0.1], "epoch_time_s": [5.0, 5.0]},
    })
    ax = plots.plot_time_to_accuracy(frame, colors=COLORS).axes[0]
    lines = lines_by_label(ax)
    assert list(lines["transfer"].get_xdata()) == pytest.approx([2.0, 4.0, 6.0])  # mean elapsed s per epoch
    assert list(lines["transfer"].get_ydata()) == pytest.approx([20.0, 30.0, 40.0])
    assert list(lines["scratch"].get_xdata()) == pytest.approx([5.0, 10.0])
    assert ax.get_xlim()[0] == 0  # the axis starts at 0 s, not at the end of the first epoch
    assert ax.get_xlabel().startswith("Training time (s") and ax.get_ylabel() == "Validation accuracy (%)"


def _table_rows() -> pd.DataFrame:
    rows = []
    for strategy, acc, secs in (("transfer", 0.9, 10.0), ("scratch", 0.6, 40.0)):
        row = {"strategy": strategy}
        for metric in ("best_val_acc", "final_val_acc", "final_train_acc"):
            row[f"{metric}_mean"], row[f"{metric}_std"] = acc, 0.01
        row["test_acc_mean"], row["test_acc_std"] = np.nan, np.nan
        row["total_time_s_mean"], row["total_time_s_std"] = secs, np.nan  # a single run: no error bar
        row["avg_epoch_time_s_mean"], row["avg_epoch_time_s_std"] = secs / 10, np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def test_bars_show_means_in_percent_and_seconds():
    fig = plots.plot_bars(_table_rows(), colors=COLORS)
    ax_acc, ax_total, ax_epoch = fig.axes
    from matplotlib.container import BarContainer

    heights = {c.get_label(): [p.get_height() for p in c.patches]
               for c in ax_acc.containers if isinstance(c, BarContainer)}
    assert heights["transfer"] == pytest.approx([90.0, 90.0, 90.0])  # test acc was not logged: 3 groups
    assert heights["scratch"] == pytest.approx([60.0, 60.0, 60.0])
    assert [t.get_text() for t in ax_acc.get_xticklabels()] == ["Best val acc", "Final val acc", "Final train acc"]
    assert [p.get_height() for p in ax_total.patches] == pytest.approx([10.0, 40.0])
    assert [p.get_height() for p in ax_epoch.patches] == pytest.approx([1.0, 4.0])
    assert [to_hex(p.get_facecolor()) for p in ax_total.patches] == [COLORS["transfer"], COLORS["scratch"]]
    assert ax_acc.get_ylabel() == "Accuracy (%)" and ax_total.get_ylabel() == "Seconds"


def test_bars_lead_with_the_headline_accuracy():
    rows = _table_rows().assign(test_acc_mean=[0.8, 0.5], test_acc_std=[0.02, 0.02])
    ax_acc = plots.plot_bars(rows, colors=COLORS).axes[0]
    assert [t.get_text() for t in ax_acc.get_xticklabels()][0] == "Test acc"
    ax_val = plots.plot_bars(rows, colors=COLORS, headline="best_val_acc").axes[0]
    assert [t.get_text() for t in ax_val.get_xticklabels()][:2] == ["Best val acc", "Test acc"]


def test_data_efficiency_is_log_scaled_with_one_line_per_strategy():
    eff = pd.DataFrame({
        "size": [5.0, 50.0, 500.0, 5.0, 50.0, 500.0],
        "strategy": ["transfer"] * 3 + ["scratch"] * 3,
        "mean": [0.8, 0.85, 0.9, 0.2, 0.6, 0.88],
        "std": [0.01, 0.02, 0.01, 0.05, 0.04, 0.01],
        "n": [3, 3, 3, 3, 3, 3],
    })
    ax = plots.plot_data_efficiency(eff, colors=COLORS, metric_label="Test accuracy").axes[0]
    assert ax.get_xscale() == "log"
    lines = lines_by_label(ax)
    assert list(lines["scratch"].get_xdata()) == [5.0, 50.0, 500.0]
    assert list(lines["scratch"].get_ydata()) == pytest.approx([20.0, 60.0, 88.0])
    assert lines["scratch"].get_color() == COLORS["scratch"]
    assert sorted(band_colors(ax)) == sorted([COLORS["transfer"], COLORS["scratch"]])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["5", "50", "500"]
    assert ax.get_ylabel() == "Test accuracy (%)" and "samples per class" in ax.get_xlabel()


def test_save_png_writes_a_png(tmp_path: Path):
    frame = history({("t1", "transfer"): {"val_acc": [0.5, 0.6]}})
    path = plots.save_png(plots.plot_curves(frame, colors=COLORS), tmp_path / "curves.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_group_bars_put_every_group_in_one_chart():
    rows = _table_rows()
    table = pd.concat([rows.assign(group="samples_per_class=5"),
                       rows.assign(group="samples_per_class=50", best_val_acc_mean=[0.95, 0.9])])
    fig = plots.plot_group_bars(table, colors=COLORS, accuracy="best_val_acc",
                                accuracy_label="Best validation accuracy")
    ax_acc, ax_total, _ = fig.axes
    from matplotlib.container import BarContainer

    heights = {c.get_label(): [p.get_height() for p in c.patches]
               for c in ax_acc.containers if isinstance(c, BarContainer)}
    assert heights == {"transfer": pytest.approx([90.0, 95.0]), "scratch": pytest.approx([60.0, 90.0])}
    assert [t.get_text() for t in ax_acc.get_xticklabels()] == ["samples_per_class=5", "samples_per_class=50"]
    assert ax_acc.get_title() == "Best validation accuracy" and ax_total.get_ylabel() == "Seconds"
