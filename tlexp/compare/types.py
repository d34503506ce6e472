"""The data types a comparison is made of, and the display helpers the report shares with the findings.

Kept free of reading, statistics and MLflow so that ``tlexp.report`` and ``tlexp.plots`` can import
what they draw without importing how it was computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

SCRATCH = "scratch"
# Table and legend order; strategies not listed here follow, sorted by name.
STRATEGY_ORDER = ("transfer", "finetune", "lpft", "scratch")
FORMATS = ("md", "csv", "html")
TARGET_FRACTION = 0.95  # "converged" = reached 95% of the run's own best validation accuracy
OVERFIT_GAP = 0.10  # a final train-val gap above 10 points is called overfitting
SIZE_KEYS = ("samples_per_class", "train_fraction")  # the settings a data-efficiency sweep varies
METRIC_WORDS = {"test_acc": "test accuracy", "best_val_acc": "best validation accuracy"}
# Short column names for settings that differ between runs (a terminal has 80 columns).
KEY_LABELS = {
    "samples_per_class": "n/class", "train_fraction": "train frac", "image_size": "img px",
    "backbone_lr_mult": "bb lr×", "batch_size": "batch", "val_fraction": "val frac", "test_fraction": "test frac",
    "split_seed": "split seed", "feature_cache": "feat cache", "feature_cache_views": "feat views",
    "lp_epochs": "lp epochs", "channels_last": "ch last", "precision": "precision",
}


class CompareError(ValueError):
    """The experiment or an option cannot be compared. The message is one sentence for the user."""


@dataclass
class Section:
    """A titled list of plain-language findings."""

    title: str
    lines: list[str]


@dataclass
class Comparison:
    """Everything the report shows, computed from the store without side effects.

    Rows of ``table`` are identities (every setting but the seed, ``TrainConfig.identity``); a group is
    an identity without the strategy and the settings tuned per strategy (``lr``...). In each group and
    for each strategy one row is ``chosen``: the best mean validation accuracy. The headline numbers,
    the statistics and the charts use the chosen rows only.
    """

    experiment: str
    runs: pd.DataFrame  # finished training runs, one row each (load_runs)
    history: pd.DataFrame  # per-epoch metrics, long format (load_history)
    stats: pd.DataFrame  # one row per counted run: settings, row_key, group_key, the numbers of TABLE_METRICS
    table: pd.DataFrame  # one row per identity: settings, strategy, n_runs, seeds, <metric>_mean/_std, chosen
    row_keys: list[str]  # settings that differ between rows (table columns), strategy excluded
    group_keys: list[str]  # the row_keys that make groups (the others are tuned per strategy)
    shared: dict[str, str]  # settings every run has in common, and their value
    findings: list[Section]
    notes: list[str]
    metric: str = "test_acc"  # the headline accuracy: test_acc, or best_val_acc for runs without a test split
    paired: pd.DataFrame | None = None  # per group and strategy pair: n, mean_diff, ci_low, ci_high, p_value, test
    tuning: pd.DataFrame | None = None  # per group and strategy: the chosen lr and its validation score
    efficiency: pd.DataFrame | None = None  # per family, size and strategy: mean, std, n of the headline

    @property
    def headline(self) -> pd.DataFrame:
        """The chosen rows: one per group and strategy."""
        return self.table[self.table["chosen"]].reset_index(drop=True)

    @property
    def tuned_keys(self) -> list[str]:
        """The row keys tuned per strategy (shown beside the strategy, not as groups)."""
        return [k for k in self.row_keys if k not in self.group_keys]

    @property
    def size_keys(self) -> list[str]:
        return [k for k in self.group_keys if k in SIZE_KEYS]


@dataclass
class CompareResult:
    """What ``run_compare`` did: the comparison, where it wrote it, and the MLflow run it logged."""

    comparison: Comparison
    output_dir: Path
    files: list[Path] = field(default_factory=list)
    run_id: str | None = None


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def natural(value: Any) -> tuple[int, float, str]:
    """Sort key: numbers as numbers ('5' < '15'), then text."""
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def sort_key(values: pd.Series) -> pd.Series:
    """Sort strategies in STRATEGY_ORDER and numeric strings as numbers (for DataFrame.sort_values)."""
    if values.name in ("strategy", "strategy_a", "strategy_b"):
        return values.map(lambda s: (STRATEGY_ORDER.index(s), "") if s in STRATEGY_ORDER else (99, s))
    return values.map(natural)


def order_strategies(strategies: Iterable[str]) -> list[str]:
    """Unique strategies in table/legend order."""
    unique = set(strategies)
    return [s for s in STRATEGY_ORDER if s in unique] + sorted(unique - set(STRATEGY_ORDER))


def key_label(key: str) -> str:
    """The short display name of a setting."""
    return KEY_LABELS.get(key, key)


def display_value(key: str, value: Any) -> str:
    if key == "samples_per_class" and value in ("none", "None"):
        return "all"
    return str(value)


def group_label(row: pd.Series | dict[str, Any], keys: Sequence[str]) -> str:
    """'epochs=15, samples_per_class=all' for the varying keys of one group ('' when none vary)."""
    return ", ".join(f"{k}={display_value(k, row[k])}" for k in keys)


def iter_groups(frame: pd.DataFrame, keys: Sequence[str]) -> Iterable[tuple[str, pd.DataFrame]]:
    """(label, rows) per group of ``keys``, in frame order; one unnamed group when keys is empty."""
    if not keys:
        yield "", frame
        return
    for _, rows in frame.groupby(list(keys), sort=False):
        yield group_label(rows.iloc[0], keys), rows


def pct(fraction: float) -> str:
    return f"{100 * fraction:.1f}%"


def points(fraction: float) -> str:
    """A difference of accuracies in percentage points."""
    return f"{100 * fraction:.1f} points"
