"""Matplotlib charts of a comparison, drawn from DataFrames (no MLflow, no globals).

Figures are built with ``matplotlib.figure.Figure`` on the Agg canvas, never through pyplot,
so nothing opens a window, no global figure list grows, and importing this module costs nothing.
Every chart takes ``colors``: strategy -> colour, whose order is the legend order, so one
strategy has the same colour in every chart.

Frames expected (as built by tlexp.compare):
- history: long format with run_id, strategy, metric, step, value (accuracies as fractions);
- table rows: strategy, <metric>_mean, <metric>_std;
- efficiency: size, strategy, mean, std, n.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# The seed's colours were steelblue (transfer) and coral (scratch); keep that association.
KNOWN_COLORS = {"transfer": "#1f77b4", "finetune": "#2ca02c", "scratch": "#d62728", "lpft": "#9467bd"}
_SPARE_COLORS = ("#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")
BAND_ALPHA = 0.18
DPI = 100


def strategy_colors(strategies: Iterable[str]) -> dict[str, str]:
    """A stable colour per strategy, in the given order (known strategies keep their colour)."""
    colors: dict[str, str] = {}
    spare = iter(_SPARE_COLORS * 4)
    for strategy in strategies:
        if strategy not in colors:
            colors[strategy] = KNOWN_COLORS.get(strategy) or next(spare)
    return colors


def _new_figure(width: float, height: float, **margins: float) -> "Figure":
    """A figure on the Agg canvas with fixed margins (fractions of the figure).

    Fixed margins instead of constrained layout: the labels are ours and short, and the layout
    solver doubled the drawing time, which matters when a sweep draws a dozen charts.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(**{"left": 0.08, "right": 0.98, "bottom": 0.1, "top": 0.86, **margins})
    return fig


def mean_band(history: pd.DataFrame, metric: str, strategy: str) -> pd.DataFrame:
    """Per step: mean, std and number of runs of ``metric`` for ``strategy``, aligned by epoch.

    Runs of different lengths are averaged over the runs that reached each epoch.
    """
    rows = history[(history["metric"] == metric) & (history["strategy"] == strategy)]
    return rows.groupby("step")["value"].agg(["mean", "std", "count"]).sort_index()


def _line_with_band(ax: "Axes", x: np.ndarray, mean: np.ndarray, std: np.ndarray, count: np.ndarray,
                    *, color: str, label: str, marker: str = "o") -> None:
    ax.plot(x, mean, color=color, marker=marker, markersize=3.5, linewidth=2, label=label)
    spread = count >= 2  # a band needs two runs; one run has no spread to show
    if spread.any():
        ax.fill_between(x, mean - np.nan_to_num(std), mean + np.nan_to_num(std), where=spread,
                        color=color, alpha=BAND_ALPHA, linewidth=0)


def _finish_axes(ax: "Axes", *, title: str, xlabel: str, ylabel: str, integer_x: bool = False,
                 grid: str = "both") -> None:
    from matplotlib.ticker import MaxNLocator

    if title:
        ax.set_title(title, fontsize=12, fontweight="bold")
    ax.set_xlabel(xlabel, fontsize=10)
    ax.set_ylabel(ylabel, fontsize=10)
    ax.grid(True, axis=grid, alpha=0.3)
    ax.set_axisbelow(True)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _runs_per_strategy(history: pd.DataFrame) -> dict[str, int]:
    return history.groupby("strategy")["run_id"].nunique().to_dict()


def _legend_label(strategy: str, runs: int) -> str:
    return f"{strategy} ({runs} run{'s' if runs != 1 else ''})"


def _band_note(history: pd.DataFrame) -> str:
    many = any(n > 1 for n in _runs_per_strategy(history).values())
    return "line: mean over seeds; band: ±1 std" if many else "one run per strategy"


def plot_curves(history: pd.DataFrame, *, colors: Mapping[str, str], title: str = "") -> "Figure":
    """The seed's 2x2 figure: train/val loss and accuracy per epoch, mean with a band over seeds."""
    fig = _new_figure(12, 8.8, left=0.06, right=0.985, bottom=0.06, top=0.87, wspace=0.17, hspace=0.3)
    axes = fig.subplots(2, 2)
    panels = (("train_loss", "Training loss", "Loss", 1.0), ("val_loss", "Validation loss", "Loss", 1.0),
              ("train_acc", "Training accuracy", "Accuracy (%)", 100.0),
              ("val_acc", "Validation accuracy", "Accuracy (%)", 100.0))
    runs = _runs_per_strategy(history)
    for ax, (metric, panel_title, ylabel, scale) in zip(axes.flat, panels):
        for strategy, color in colors.items():
            band = mean_band(history, metric, strategy)
            if band.empty:
                continue
            _line_with_band(ax, band.index.to_numpy(), scale * band["mean"].to_numpy(),
                            scale * band["std"].to_numpy(), band["count"].to_numpy(),
                            color=color, label=_legend_label(strategy, runs.get(strategy, 0)))
        _finish_axes(ax, title=panel_title, xlabel="Epoch", ylabel=ylabel, integer_x=True)
    # One legend for the four panels (same colours everywhere), on top where it hides no curve.
    handles, labels = next(((ax.get_legend_handles_labels()) for ax in axes.flat if ax.lines), ([], []))
    if handles:
        fig.legend(handles, labels, loc="center", fontsize=10, ncol=len(handles), frameon=False,
                   bbox_to_anchor=(0.5, 0.915))
    fig.suptitle(_title("Training curves", title, _band_note(history)), fontsize=13, y=0.995)
    return fig


def plot_time_to_accuracy(history: pd.DataFrame, *, colors: Mapping[str, str], title: str = "") -> "Figure":
    """Validation accuracy against cumulative training seconds (mean over seeds at each epoch)."""
    fig = _new_figure(8, 5.5)
    ax = fig.subplots()
    runs = _runs_per_strategy(history)
    wide = history[history["metric"].isin(["val_acc", "epoch_time_s"])].pivot_table(
        index=["strategy", "run_id", "step"], columns="metric", values="value")
    if {"val_acc", "epoch_time_s"} <= set(wide.columns):
        # Wall-clock at the end of each epoch, per run, then averaged per epoch over seeds.
        wide["elapsed_s"] = wide.groupby(level=["strategy", "run_id"])["epoch_time_s"].cumsum()
        for strategy, color in colors.items():
            if strategy not in wide.index.get_level_values("strategy"):
                continue
            per_step = wide.loc[strategy].dropna(subset=["val_acc", "elapsed_s"]).groupby(level="step")
            agg = per_step.agg(x=("elapsed_s", "mean"), mean=("val_acc", "mean"), std=("val_acc", "std"),
                               count=("val_acc", "count"))
            _line_with_band(ax, agg["x"].to_numpy(), 100 * agg["mean"].to_numpy(), 100 * agg["std"].to_numpy(),
                            agg["count"].to_numpy(), color=color,
                            label=_legend_label(strategy, runs.get(strategy, 0)))
    _finish_axes(ax, title="", xlabel="Training time (s, cumulative epoch time)",
                 ylabel="Validation accuracy (%)")
    ax.set_xlim(left=0)  # time starts at 0: an axis starting at the first epoch's end hides its cost
    if ax.lines:
        ax.legend(fontsize=9, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no epoch_time_s / val_acc logged", transform=ax.transAxes, ha="center")
    fig.suptitle(_title("Validation accuracy against training time", title, _band_note(history)), fontsize=12)
    return fig


BAR_ACCURACIES = (("test_acc", "Test acc"), ("best_val_acc", "Best val acc"), ("final_val_acc", "Final val acc"),
                  ("final_train_acc", "Final train acc"))


def _grouped_bars(ax: "Axes", categories: Sequence[str], values: Mapping[str, tuple[np.ndarray, np.ndarray]],
                  colors: Mapping[str, str], fmt: str) -> None:
    """One cluster of bars per category, one bar per strategy, ±1 std error bars, values on top."""
    width = 0.8 / max(len(values), 1)
    x = np.arange(len(categories))
    for i, (strategy, (means, stds)) in enumerate(values.items()):
        means, stds = np.nan_to_num(means), np.nan_to_num(stds)  # a single run has no std: no error bar
        bars = ax.bar(x + (i - (len(values) - 1) / 2) * width, means, width, yerr=stds, capsize=3,
                      color=colors[strategy], label=strategy)
        ax.bar_label(bars, labels=[format(m, fmt) for m in means], fontsize=8, padding=2)
    ax.set_xticks(x, list(categories))


def plot_bars(rows: pd.DataFrame, *, colors: Mapping[str, str], title: str = "",
              headline: str = "test_acc") -> "Figure":
    """The seed's bar charts for one group: accuracies, total time and time per epoch (±1 std).

    The ``headline`` accuracy comes first. Unlike the seed, minutes and seconds do not share one axis:
    each time has its own panel.
    """
    fig = _new_figure(14, 5, left=0.05, right=0.99, bottom=0.2, top=0.8, wspace=0.22)
    ax_acc, ax_total, ax_epoch = fig.subplots(1, 3, width_ratios=[2.2, 1, 1])
    rows = rows.set_index("strategy")
    strategies = [s for s in colors if s in rows.index]
    metrics = sorted(((m, label) for m, label in BAR_ACCURACIES if rows[f"{m}_mean"].notna().any()),
                     key=lambda item: item[0] != headline)
    _grouped_bars(ax_acc, [label for _, label in metrics], {
        s: (100 * rows.loc[s, [f"{m}_mean" for m, _ in metrics]].to_numpy(dtype=float),
            100 * rows.loc[s, [f"{m}_std" for m, _ in metrics]].to_numpy(dtype=float)) for s in strategies},
        colors, ".1f")
    ax_acc.set_ylim(0, 105)
    _finish_axes(ax_acc, title="Accuracy", xlabel="", ylabel="Accuracy (%)", grid="y")
    # Below the axis: inside, it would hide bars whatever the corner.
    ax_acc.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=max(len(strategies), 1))
    for ax, metric, panel_title in ((ax_total, "total_time_s", "Total training time"),
                                    (ax_epoch, "avg_epoch_time_s", "Time per epoch")):
        means = np.nan_to_num(rows.loc[strategies, f"{metric}_mean"].to_numpy(dtype=float))
        stds = np.nan_to_num(rows.loc[strategies, f"{metric}_std"].to_numpy(dtype=float))
        bars = ax.bar(strategies, means, yerr=stds, capsize=3, color=[colors[s] for s in strategies])
        ax.bar_label(bars, labels=[f"{m:,.1f}" for m in means], fontsize=8, padding=2)
        _finish_axes(ax, title=panel_title, xlabel="Strategy", ylabel="Seconds", grid="y")
    fig.suptitle(_title("Accuracy and training time", title, "error bars: ±1 std over seeds"), fontsize=13)
    return fig


def plot_group_bars(table: pd.DataFrame, *, colors: Mapping[str, str], accuracy: str, accuracy_label: str,
                    title: str = "") -> "Figure":
    """The bar charts when runs fall into several groups (a sweep, several models): one cluster per group.

    ``table`` rows carry a ``group`` label; ``accuracy`` is the headline metric stem (e.g. best_val_acc).
    One chart instead of one per group keeps the groups comparable at a glance.
    """
    groups = list(dict.fromkeys(table["group"]))
    strategies = [s for s in colors if s in set(table["strategy"])]
    width = min(14.0, max(9.0, 0.8 * len(groups) * max(len(strategies), 1) + 3))
    fig = _new_figure(width, 10.5, left=0.08, right=0.99, bottom=0.07, top=0.87, hspace=0.55)
    axes = fig.subplots(3, 1)
    wide = table.set_index(["strategy", "group"])
    for ax, metric, scale, fmt, panel_title, ylabel in (
            (axes[0], accuracy, 100.0, ".1f", accuracy_label, "Accuracy (%)"),
            (axes[1], "total_time_s", 1.0, ",.1f", "Total training time", "Seconds"),
            (axes[2], "avg_epoch_time_s", 1.0, ",.2f", "Time per epoch", "Seconds")):
        values = {}
        for s in strategies:
            means = [wide[f"{metric}_mean"].get((s, g), np.nan) for g in groups]
            stds = [wide[f"{metric}_std"].get((s, g), np.nan) for g in groups]
            values[s] = (scale * np.asarray(means, dtype=float), scale * np.asarray(stds, dtype=float))
        _grouped_bars(ax, [g.replace(", ", "\n") for g in groups], values, colors, fmt)
        _finish_axes(ax, title=panel_title, xlabel="", ylabel=ylabel, grid="y")
        ax.margins(y=0.18)  # room for the value labels under the panel title
        ax.set_ylim(bottom=0)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center", fontsize=10, ncol=max(len(handles), 1), frameon=False,
               bbox_to_anchor=(0.5, 0.915))
    fig.suptitle(_title("Accuracy and training time per group", title, "error bars: ±1 std over seeds"),
                 fontsize=13, y=0.995)
    return fig


def plot_data_efficiency(efficiency: pd.DataFrame, *, colors: Mapping[str, str], metric_label: str,
                         title: str = "") -> "Figure":
    """Accuracy against training samples per class (log x), one line per strategy, band over seeds."""
    from matplotlib.ticker import FixedLocator, NullLocator

    fig = _new_figure(8, 5.5)
    ax = fig.subplots()
    for strategy, color in colors.items():
        rows = efficiency[efficiency["strategy"] == strategy].sort_values("size")
        if rows.empty:
            continue
        n = rows["n"].to_numpy()
        runs = f"{int(n.min())}-{int(n.max())}" if n.min() != n.max() else f"{int(n.min())}"
        label = f"{strategy} ({runs} run{'s' if n.max() > 1 else ''} per size)"
        _line_with_band(ax, rows["size"].to_numpy(dtype=float), 100 * rows["mean"].to_numpy(dtype=float),
                        100 * rows["std"].to_numpy(dtype=float), n, color=color, label=label)
    ax.set_xscale("log")
    sizes = np.sort(efficiency["size"].unique().astype(float))
    ax.xaxis.set_major_locator(FixedLocator(sizes))  # label the measured sizes, not powers of ten
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{s:g}" for s in sizes])
    _finish_axes(ax, title="", xlabel="Training samples per class (log scale)",
                 ylabel=f"{metric_label} (%)")
    if ax.lines:
        ax.legend(fontsize=9, loc="lower right")
    many = efficiency["n"].max() > 1 if len(efficiency) else False
    fig.suptitle(_title("Accuracy against training-set size", title,
                        "line: mean over seeds; band: ±1 std" if many else "one run per point"), fontsize=12)
    return fig


def _title(what: str, group: str, note: str) -> str:
    return f"{what}{' — ' + group if group else ''}\n({note})"


def save_png(fig: "Figure", path: Path, *, dpi: int = DPI) -> Path:
    """Write ``fig`` as a PNG and release it."""
    fig.savefig(path, format="png", dpi=dpi)
    fig.clear()
    return path


__all__ = ["strategy_colors", "mean_band", "plot_curves", "plot_time_to_accuracy", "plot_bars", "plot_group_bars",
           "plot_data_efficiency", "save_png", "KNOWN_COLORS"]


def confusion_figure(cm: np.ndarray, classes: Sequence[str], *, title: str) -> "Figure":
    """A confusion matrix, rows = true class, columns = predicted class, counts written in the cells."""
    n = len(classes)
    size = min(12.0, 2.5 + 0.45 * n)
    fig = _new_figure(size, size, left=0.18, bottom=0.18, right=0.97, top=0.92)
    ax = fig.add_subplot()
    ax.imshow(cm, cmap="Blues")
    ax.set(xticks=range(n), yticks=range(n), xlabel="Predicted class", ylabel="True class", title=title)
    if n <= 30:  # beyond that, labels and counts are unreadable anyway
        ax.set_xticklabels(classes, rotation=45, ha="right")
        ax.set_yticklabels(classes)
        top = cm.max() if cm.size else 0
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if cm[i, j] > top / 2 else "black")
    return fig
