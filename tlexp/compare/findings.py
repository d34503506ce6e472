"""Plain-language findings, every figure taken from the table, the curves or the paired statistics.

A claim that one strategy beats another quotes its 95% confidence interval and p-value; with fewer
than three pairs of seeds no winner is named and the finding says how many seeds to add.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd

from tlexp.compare.aggregate import curves_by_run, first_step_reaching, seconds_until
from tlexp.compare.stats import MIN_PAIRS, NO_TEST, PAIRED, crossover_points, crossover_size, oriented, winner
from tlexp.compare.types import (METRIC_WORDS, OVERFIT_GAP, SCRATCH, TARGET_FRACTION, Section, iter_groups,
                                 order_strategies, pct, plural, points)


def _seconds(value: float) -> str:
    return f"{value:,.1f} s"


def _p(value: float) -> str:
    if math.isnan(value):
        return "p n/a"
    return "p < 0.001" if value < 0.001 else f"p = {value:.3f}"


def interval(row: pd.Series) -> str:
    """'95% CI 8.1 to 16.5, paired over 5 seeds, p = 0.002' for one oriented paired row."""
    how = (f"paired over {plural(int(row['n']), 'seed')}" if row["test"] == PAIRED else
           f"Welch's t-test over {int(row['n_a'])} and {int(row['n_b'])} runs, seeds not paired")
    return f"95% CI {100 * row['ci_low']:.1f} to {100 * row['ci_high']:.1f}, {how}, {_p(row['p_value'])}"


def pair_finding(row: pd.Series) -> str:
    """One sentence on a pair of strategies: a winner with its interval, no reliable difference, or too
    few seeds (and how many to add)."""
    a, b = row["strategy_a"], row["strategy_b"]
    if row["mean_diff"] < 0:
        row = oriented(pd.DataFrame([row]), b, a)
        a, b = b, a
    diff = row["mean_diff"]
    if row["test"] == NO_TEST or row["n"] < MIN_PAIRS:
        missing = MIN_PAIRS - int(row["n"])
        have = (f"{plural(int(row['n']), 'seed')} paired" if row["test"] != "Welch t"
                else f"{int(row['n_a'])} and {int(row['n_b'])} runs")
        return (f"{a} vs {b}: {a} is {points(diff)} ahead, but with {have} the evidence is insufficient to name "
                f"a winner; add at least {plural(missing, 'more seed')} to both (a 95% confidence interval needs "
                f"{MIN_PAIRS} or more pairs).")
    if row["ci_low"] > 0:
        return f"{a} beats {b} by {points(diff)} ({interval(row)})."
    return (f"No reliable difference between {a} and {b}: {a} − {b} = {100 * diff:+.1f} points ({interval(row)}); "
            f"the interval includes 0.")


def accuracy_findings(rows: pd.DataFrame, paired: pd.DataFrame, metric: str) -> list[str]:
    """The ranking on the headline accuracy, then every pair of strategies with its interval."""
    words = METRIC_WORDS[metric]
    ranked = rows.sort_values(f"{metric}_mean", ascending=False, kind="stable")
    top = ranked.iloc[0]
    if len(ranked) == 1:
        return [f"Only {top.strategy} was run here: {words} {pct(top[f'{metric}_mean'])}"
                f"{_spread(top, metric)}; there is no other strategy to compare it with."]
    lines = [f"Ranking on {words}: " + ", ".join(
        f"{r.strategy} {pct(getattr(r, f'{metric}_mean'))}{_spread(pd.Series(r._asdict()), metric)}"
        for r in ranked.itertuples()) + "."]
    for _, row in paired.iterrows():
        lines.append(pair_finding(row))
    return lines


def _spread(row: pd.Series, metric: str) -> str:
    std = row[f"{metric}_std"]
    if math.isnan(std):
        return f" ({plural(int(row['n_runs']), 'run')})"
    return f" ± {100 * std:.1f} ({int(row['n_runs'])} runs)"


def _verdict(name: str | None, top: str) -> str:
    return f"{name} is reliably ahead" if name else f"no strategy is reliably ahead ({top} ranks first)"


def tuning_findings(rows: pd.DataFrame, default_rows: pd.DataFrame, tuned_keys: Sequence[str],
                    paired: pd.DataFrame, default_paired: pd.DataFrame, metric: str) -> list[str]:
    """The setting chosen per strategy on validation, and whether the verdict differs from the default's."""
    if not tuned_keys:
        return []

    def setting(r: Any) -> str:
        return ", ".join(f"{k}={getattr(r, k)}" for k in tuned_keys)

    lines = ["Chosen per strategy on mean validation accuracy (the test score of that choice is the headline): " +
             "; ".join(f"{r.strategy} {setting(r)} (val {pct(r.best_val_acc_mean)})" for r in rows.itertuples())
             + "."]
    tuned = winner(paired, rows.set_index("strategy")[f"{metric}_mean"])
    default = winner(default_paired, default_rows.set_index("strategy")[f"{metric}_mean"])
    defaults = "; ".join(f"{r.strategy} {setting(r)}" for r in default_rows.itertuples())
    top_tuned = rows.sort_values(f"{metric}_mean", ascending=False).iloc[0]["strategy"]
    top_default = default_rows.sort_values(f"{metric}_mean", ascending=False).iloc[0]["strategy"]
    if tuned != default:
        outcome = "tuning changes the verdict"
    elif top_tuned != top_default:
        outcome = "tuning does not change the verdict, only the order"
    else:
        outcome = "tuning does not change the verdict"
    lines.append(f"At the default settings ({defaults}) {_verdict(default, top_default)}; tuned, "
                 f"{_verdict(tuned, top_tuned)}: {outcome}.")
    return lines


def convergence_findings(rows: pd.DataFrame, history: pd.DataFrame, stats: pd.DataFrame,
                         *, target_fraction: float = TARGET_FRACTION) -> list[str]:
    """Epochs and seconds to 95% of each strategy's own best, and to one common target."""
    share = f"{100 * target_fraction:.0f}%"
    rows = rows[rows["epochs_to_target_mean"].notna()]
    if rows.empty:
        return ["No validation curve was logged, so convergence cannot be measured."]
    parts = []
    for r in rows.itertuples():
        secs = "" if math.isnan(r.seconds_to_target_mean) else f", {_seconds(r.seconds_to_target_mean)}"
        parts.append(f"{r.strategy} {r.epochs_to_target_mean:.1f} epochs{secs}")
    lines = [f"Epochs (and training seconds) until validation accuracy first reaches {share} of the run's "
             f"own best, mean over seeds: " + "; ".join(parts) + "."]
    if len(rows) > 1:
        lines.append(_fastest(rows, "epochs_to_target_mean", "in the fewest epochs", lambda v: f"{v:.1f} epochs"))
        if rows["seconds_to_target_mean"].notna().all():
            lines.append(_fastest(rows, "seconds_to_target_mean", "in the least training time", _seconds))
        lines.extend(_common_target(rows, history, stats, target_fraction))
    return [line for line in lines if line]


def _fastest(rows: pd.DataFrame, column: str, how: str, fmt: Any) -> str:
    ordered = rows.sort_values(column, kind="stable")
    best = ordered[column].iloc[0]
    tied = ordered[ordered[column] == best]
    rest = ordered[ordered[column] != best]
    if rest.empty:
        return f"All strategies get there equally fast ({fmt(best)})."
    others = ", ".join(f"{s} {fmt(v)}" for s, v in zip(rest["strategy"], rest[column]))
    who = " and ".join(tied["strategy"])
    verb = "gets" if len(tied) == 1 else "get"
    return f"{who} {verb} there {how} ({fmt(best)}, against {others})."


def _common_target(rows: pd.DataFrame, history: pd.DataFrame, stats: pd.DataFrame,
                   target_fraction: float) -> list[str]:
    """Time to one accuracy every strategy can reach: own-best targets favour low plateaus."""
    target = target_fraction * rows["best_val_acc_mean"].min()
    run_ids = stats.loc[stats["strategy"].isin(rows["strategy"]) & stats["run_id"].isin(history["run_id"]),
                        ["run_id", "strategy"]]
    if run_ids.empty:
        return []
    curves = dict(curves_by_run(history[history["run_id"].isin(run_ids["run_id"])]))
    parts = []
    for strategy in order_strategies(run_ids["strategy"]):
        epochs, seconds, missed = [], [], 0
        for run_id in run_ids.loc[run_ids["strategy"] == strategy, "run_id"]:
            curve = curves.get(run_id)
            if curve is None or "val_acc" not in curve:
                continue
            val = curve["val_acc"].dropna()
            if val.empty or val.max() < target - 1e-12:
                missed += 1
                continue
            step = first_step_reaching(val, target)
            epochs.append(step)
            if "epoch_time_s" in curve:
                seconds.append(seconds_until(curve["epoch_time_s"], step))
        if not epochs:
            parts.append(f"{strategy} never reaches it")
            continue
        secs = [s for s in seconds if not math.isnan(s)]
        text = f"{strategy} {np.mean(epochs):.1f} epochs"
        if secs and len(secs) == len(epochs):
            text += f" ({_seconds(float(np.mean(secs)))})"
        if missed:
            text += f", but {missed} of {missed + len(epochs)} runs never reach it"
        parts.append(text)
    return [f"To a common target of {pct(target)} validation accuracy ({100 * target_fraction:.0f}% of the "
            f"lowest strategy's best): " + "; ".join(parts) + "."]


def cost_findings(rows: pd.DataFrame) -> list[str]:
    """Seconds per epoch, total time and trainable parameters, with a ratio only when it is defined."""
    lines = []
    timed = rows[rows["avg_epoch_time_s_mean"].notna()].sort_values("avg_epoch_time_s_mean", kind="stable")
    if not timed.empty:
        lines.append("Average time per epoch: " + ", ".join(
            f"{r.strategy} {_seconds(r.avg_epoch_time_s_mean)} (total {_seconds(r.total_time_s_mean)})"
            for r in timed.itertuples()) + ".")
        cheap, dear = timed.iloc[0], timed.iloc[-1]
        if len(timed) > 1 and cheap.avg_epoch_time_s_mean > 0 and dear.strategy != cheap.strategy:
            ratio = dear.avg_epoch_time_s_mean / cheap.avg_epoch_time_s_mean
            if ratio >= 1.05:
                lines.append(f"{cheap.strategy} is {ratio:.1f}x cheaper per epoch than {dear.strategy}.")
            else:
                lines.append("Per-epoch cost is about the same for every strategy (within 5%).")
    counted = rows[rows["params_trainable_mean"].notna()]
    if not counted.empty:
        parts = []
        for r in counted.itertuples():
            frac = r.trainable_fraction_mean
            if math.isnan(frac) and r.params_total_mean > 0:
                frac = r.params_trainable_mean / r.params_total_mean
            share = "" if math.isnan(frac) else f" ({100 * frac:.1f}% of {r.params_total_mean:,.0f})"
            parts.append(f"{r.strategy} {r.params_trainable_mean:,.0f}{share}")
        lines.append("Trainable parameters: " + ", ".join(parts) + ".")
    return lines


def overfitting_findings(rows: pd.DataFrame) -> list[str]:
    """The train-val gap at the last epoch: who generalises best and who overfits."""
    gaps = rows[rows["train_val_gap_mean"].notna()].sort_values("train_val_gap_mean", kind="stable")
    if gaps.empty:
        return []
    lines = ["Train-val accuracy gap at the last epoch: " + ", ".join(
        f"{r.strategy} {points(r.train_val_gap_mean)}" for r in gaps.itertuples()) + "."]
    if len(gaps) > 1:
        best, worst = gaps.iloc[0], gaps.iloc[-1]
        if best.train_val_gap_mean < 0:
            # Training accuracy is measured on augmented images with dropout on, so a negative gap
            # says the regularisation is strong, not that one strategy generalises "better".
            lines.append("A negative gap means validation accuracy is above training accuracy, which is "
                         "measured on augmented images with dropout on: no sign of overfitting.")
        elif worst.train_val_gap_mean - best.train_val_gap_mean >= 5e-4:
            lines.append(f"{best.strategy} generalises best (smallest gap); {worst.strategy} has the largest.")
    over = gaps[gaps["train_val_gap_mean"] > OVERFIT_GAP]
    if not over.empty:
        lines.append(f"{' and '.join(over['strategy'])} overfit{'s' if len(over) == 1 else ''}: a gap above "
                     f"{points(OVERFIT_GAP)} means the model fits the training set much better than new images.")
    elif len(gaps):
        lines.append(f"No strategy overfits noticeably (every gap is at most {points(OVERFIT_GAP)}).")
    return lines


def group_findings(label: str, rows: pd.DataFrame, paired: pd.DataFrame, metric: str, history: pd.DataFrame,
                   runs: pd.DataFrame) -> list[Section]:
    """The findings of one group: accuracy, convergence, cost, overfitting."""
    prefix = f" ({label})" if label else ""
    group_history = history[history["run_id"].isin(runs["run_id"])]
    return [s for s in (Section(f"Accuracy{prefix}", accuracy_findings(rows, paired, metric)),
                        Section(f"Convergence{prefix}", convergence_findings(rows, group_history, runs)),
                        Section(f"Compute cost{prefix}", cost_findings(rows)),
                        Section(f"Overfitting{prefix}", overfitting_findings(rows))) if s.lines]


def crossover(per_size: pd.DataFrame, paired: pd.DataFrame, size_keys: Sequence[str], metric: str) -> str:
    """The smallest training-set size from which on the 95% CI of (best pretrained − scratch) includes 0
    or lies below it, at every larger measured size too; otherwise 'not within the measured range'."""
    words = METRIC_WORDS[metric]
    sizes = sorted(per_size["size"].unique())
    measured = f"{sizes[0]:g}-{sizes[-1]:g} training samples per class"
    strategies = set(per_size["strategy"])
    if SCRATCH not in strategies or strategies == {SCRATCH}:
        missing = "scratch" if SCRATCH not in strategies else "pretrained (transfer, finetune or lpft)"
        return f"No crossover can be computed: the sweep has no {missing} runs."
    found = crossover_points(per_size, paired, size_keys)
    if found.empty:
        return f"No crossover can be computed: scratch and pretrained runs share no training-set size ({measured})."
    size = crossover_size(found)
    last = found.sort_values("size").iloc[-1]
    detail = (f"{last['best']} − scratch = {100 * last['mean_diff']:+.1f} points at {last['size']:g} per class"
              + ("" if last["status"] == "unknown" else f" ({interval(last)})"))
    if size is not None:
        row = found[found["size"] == size].iloc[0]
        return (f"Crossover at {size:g} training samples per class: from there on the 95% CI of "
                f"(best pretrained − scratch) on {words} includes 0 or lies below it "
                f"({row['best']} − scratch = {100 * row['mean_diff']:+.1f} points, 95% CI "
                f"{100 * row['ci_low']:.1f} to {100 * row['ci_high']:.1f} at {size:g}).")
    unknown = found[found["status"] == "unknown"]
    if last["status"] == "unknown":
        return (f"The crossover cannot be placed: at {', '.join(f'{s:g}' for s in unknown['size'])} per class "
                f"fewer than 2 seeds are paired, so there is no interval; add seeds ({detail}).")
    return (f"No crossover within the measured range ({measured}): scratch is still reliably behind at the "
            f"largest size; {detail}.")


def efficiency_findings(efficiency: pd.DataFrame, paired: pd.DataFrame, group_keys: Sequence[str],
                        metric: str) -> list[Section]:
    """One 'Data efficiency' section per family: the crossover, and pretrained − scratch at the ends."""
    size_keys = [k for k in group_keys if k in ("samples_per_class", "train_fraction")]
    family_keys = [k for k in group_keys if k not in size_keys]
    sections = []
    for label, per_size in iter_groups(efficiency, family_keys):
        family_paired = paired
        for k in family_keys:
            family_paired = family_paired[family_paired[k] == per_size.iloc[0][k]]
        lines = [crossover(per_size, family_paired, size_keys, metric)]
        found = crossover_points(per_size, family_paired, size_keys).sort_values("size")
        if len(found) > 1:
            ends = found.iloc[[0, -1]]
            lines.append("Best pretrained − scratch: " + " and ".join(
                f"{r.best} {100 * r.mean_diff:+.1f} points at {r.size:g} per class"
                + ("" if math.isnan(r.ci_low) else f" (95% CI {100 * r.ci_low:.1f} to {100 * r.ci_high:.1f})")
                for r in ends.itertuples()) + ".")
        sections.append(Section(f"Data efficiency ({label})" if label else "Data efficiency", lines))
    return sections
