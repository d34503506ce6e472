"""Statistics of a comparison, from scipy: strategies compared pairwise per group, paired by seed.

For each group of settings and each pair of strategies: the number of pairs, the mean difference,
its 95% confidence interval (t distribution) and the p-value of the paired t-test; Welch's t-test
when the runs cannot be paired (fewer than two seeds in common). Differences are in accuracy
fractions, strategy_a minus strategy_b, with strategy_a first in table order (scratch last).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np
import pandas as pd

from tlexp.compare.types import SCRATCH, SIZE_KEYS, iter_groups, order_strategies, sort_key

CONFIDENCE = 0.95
MIN_PAIRS = 3  # below this, a finding names no winner and asks for more seeds
PAIRED, WELCH, NO_TEST = "paired t", "Welch t", "none"
PAIRED_COLUMNS = ["strategy_a", "strategy_b", "n", "n_a", "n_b", "mean_a", "mean_b", "mean_diff", "ci_low",
                  "ci_high", "p_value", "test"]


def compare_two(a: pd.Series, b: pd.Series) -> dict[str, Any]:
    """a − b for two strategies' scores indexed by seed: paired t-test on the seeds both have (two or
    more), else Welch's t-test (two or more runs each), else the plain difference of means.

    ``n`` is the number of pairs (paired) or the smaller number of runs (Welch, none).
    """
    from scipy import stats

    a, b = a.dropna().astype(float), b.dropna().astype(float)
    common = a.index.intersection(b.index)
    out: dict[str, Any] = {"n_a": len(a), "n_b": len(b), "mean_a": a.mean(), "mean_b": b.mean(),
                           "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan}
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        # Identical differences on every seed make scipy warn about precision; its answer stands.
        warnings.simplefilter("ignore", RuntimeWarning)
        if len(common) >= 2:
            x, y = a[common].to_numpy(), b[common].to_numpy()
            result = stats.ttest_rel(x, y)
            ci = result.confidence_interval(CONFIDENCE)
            return {**out, "n": len(common), "mean_diff": float(np.mean(x - y)), "ci_low": float(ci.low),
                    "ci_high": float(ci.high), "p_value": float(result.pvalue), "test": PAIRED}
        if len(a) >= 2 and len(b) >= 2:
            result = stats.ttest_ind(a.to_numpy(), b.to_numpy(), equal_var=False)
            ci = result.confidence_interval(CONFIDENCE)
            return {**out, "n": min(len(a), len(b)), "mean_diff": float(a.mean() - b.mean()),
                    "ci_low": float(ci.low), "ci_high": float(ci.high), "p_value": float(result.pvalue),
                    "test": WELCH}
    return {**out, "n": len(common) if len(common) else min(len(a), len(b)),
            "mean_diff": float(a.mean() - b.mean()) if len(a) and len(b) else math.nan, "test": NO_TEST}


def paired_tests(runs: pd.DataFrame, group_keys: Sequence[str], metric: str) -> pd.DataFrame:
    """One row per group and pair of strategies: the group's settings, then PAIRED_COLUMNS.

    ``runs`` holds one run per strategy and seed in each group (the chosen rows of the table).
    """
    rows = []
    for _, group in iter_groups(runs, group_keys):
        scores = {s: g.set_index("seed")[metric] for s, g in group.groupby("strategy", sort=False)}
        strategies = order_strategies(scores)
        settings = {k: group.iloc[0][k] for k in group_keys}
        for i, first in enumerate(strategies):
            for second in strategies[i + 1:]:
                rows.append({**settings, "strategy_a": first, "strategy_b": second,
                             **compare_two(scores[first], scores[second])})
    frame = pd.DataFrame(rows, columns=[*group_keys, *PAIRED_COLUMNS])
    return frame.sort_values([*group_keys, "strategy_a", "strategy_b"], key=sort_key, ignore_index=True)


def oriented(paired: pd.DataFrame, a: str, b: str) -> pd.Series | None:
    """The row comparing ``a`` with ``b`` in ``paired`` (one group), as a − b (flipped if stored b − a)."""
    same = paired[(paired["strategy_a"] == a) & (paired["strategy_b"] == b)]
    if len(same):
        return same.iloc[0]
    swapped = paired[(paired["strategy_a"] == b) & (paired["strategy_b"] == a)]
    if swapped.empty:
        return None
    row = swapped.iloc[0].copy()
    row["strategy_a"], row["strategy_b"] = a, b
    row["mean_a"], row["mean_b"], row["n_a"], row["n_b"] = row["mean_b"], row["mean_a"], row["n_b"], row["n_a"]
    row["mean_diff"] = -row["mean_diff"]
    row["ci_low"], row["ci_high"] = -row["ci_high"], -row["ci_low"]
    return row


def winner(paired: pd.DataFrame, means: pd.Series) -> str | None:
    """The strategy with the highest mean whose interval against every other lies above 0 with at least
    MIN_PAIRS pairs; None when no strategy is reliably ahead. ``means``: strategy -> mean score."""
    if len(means) < 2:
        return None
    top = means.idxmax()
    for other in means.index:
        if other == top:
            continue
        row = oriented(paired, top, other)
        if row is None or row["n"] < MIN_PAIRS or not row["ci_low"] > 0:
            return None
    return str(top)


def data_efficiency(runs: pd.DataFrame, group_keys: Sequence[str], metric: str) -> pd.DataFrame | None:
    """Per family (the group without its size), size and strategy: mean, std and n of ``metric`` and
    ``size``, the mean training samples per class (the chart's x). None unless sizes differ."""
    size_keys = [k for k in group_keys if k in SIZE_KEYS]
    if not size_keys:
        return None
    family_keys = [k for k in group_keys if k not in SIZE_KEYS]
    tables = []
    for _, family in iter_groups(runs, family_keys):
        if family.groupby(size_keys).ngroups < 2:
            continue
        per_size = family.groupby([*size_keys, "strategy"], sort=False).agg(
            mean=(metric, "mean"), std=(metric, "std"), n=(metric, "count"),
            size=("train_samples_per_class", "mean")).reset_index()
        for k in family_keys:
            per_size.insert(0, k, family.iloc[0][k])
        tables.append(per_size)
    if not tables:
        return None
    table = pd.concat(tables, ignore_index=True)
    # Without a logged size (old runs), fall back to the setting itself when it is a number.
    fallback = pd.to_numeric(table[size_keys[0]], errors="coerce")
    table["size"] = table["size"].fillna(fallback).round(6)
    return table.sort_values([*family_keys, "size", "strategy"], key=sort_key, ignore_index=True)


def crossover_points(per_size: pd.DataFrame, paired: pd.DataFrame, size_keys: Sequence[str]) -> pd.DataFrame:
    """Per measured size of one family: the best pretrained strategy there and its difference to scratch.

    Columns: size, best, then PAIRED_COLUMNS from n on (best − scratch), and status ('behind': the
    interval lies above 0, scratch is still behind; 'caught up': it includes 0 or lies below; 'unknown':
    no interval).
    """
    rows = []
    for size, here in per_size.groupby("size", sort=True):
        scratch = here[here["strategy"] == SCRATCH]
        pretrained = here[here["strategy"] != SCRATCH]
        if scratch.empty or pretrained.empty:
            continue
        best = pretrained.sort_values("mean", ascending=False, kind="stable").iloc[0]
        match = paired
        for k in size_keys:
            match = match[match[k] == best[k]]
        row = oriented(match, str(best["strategy"]), SCRATCH)
        if row is None:
            continue
        status = "unknown" if math.isnan(row["ci_low"]) else ("behind" if row["ci_low"] > 0 else "caught up")
        rows.append({"size": size, "best": best["strategy"], **{k: row[k] for k in PAIRED_COLUMNS[2:]},
                     "status": status})
    return pd.DataFrame(rows, columns=["size", "best", *PAIRED_COLUMNS[2:], "status"])


def crossover_size(points: pd.DataFrame) -> float | None:
    """The smallest size from which on, at every larger measured size too, scratch has caught up."""
    found = None
    for row in points.sort_values("size", ascending=False).itertuples():
        if row.status != "caught up":
            break
        found = row.size
    return found
