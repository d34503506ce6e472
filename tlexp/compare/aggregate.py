"""From runs to rows: each run's identity, duplicates counted once, per-run numbers, one row per identity,
and the row chosen per group and strategy (the tuned comparison).

A run's identity is ``TrainConfig.identity`` (every setting that can change a result, except the seed),
rebuilt from its params, with the data's content fingerprint in place of the ``--data`` string when the
run logged one. Runs are averaged over seeds only within one identity.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from tlexp.compare.types import TARGET_FRACTION, natural, plural, sort_key
from tlexp.config import NOT_IDENTITY, TrainConfig, digest

# Settings tuned per strategy: they make rows, not groups. In each group the row of each strategy with
# the best mean validation accuracy is chosen (Kornblith et al., CVPR 2019: tune each setting on validation).
NOT_READ = "n/a"  # the identity value of a setting the run's strategy does not read
TUNED_KEYS = ("lr", "backbone_lr_mult", "lp_epochs", "weights", "feature_cache", "feature_cache_views")
# What the table aggregates per row: mean and std over seeds of each per-run number.
TABLE_METRICS = ("test_acc", "best_val_acc", "final_val_acc", "final_train_acc", "total_time_s",
                 "avg_epoch_time_s", "params_trainable", "params_total", "trainable_fraction",
                 "epochs_to_target", "seconds_to_target", "train_val_gap", "train_samples_per_class")
_CONFIG_FIELDS = frozenset(TrainConfig.__dataclass_fields__)


def run_identity(params: dict[str, str], dataset: str = "") -> dict[str, str]:
    """The identity of one run, from its logged params (strategy included, seed excluded).

    ``data`` is the content fingerprint (``data_fingerprint``, shown as ``<dataset>@<first 10 hex>``) when
    the run logged one, else the ``--data`` string: older runs group by what they were given.
    """
    fingerprint = params.get("data_fingerprint") or None
    try:
        identity = TrainConfig.from_params(params).identity(data_id=fingerprint)
    except (ValueError, TypeError):  # a run tlexp can no longer parse (an unknown choice): its raw params
        identity = {k: v for k, v in params.items() if k in _CONFIG_FIELDS and k not in NOT_IDENTITY}
    identity.pop("dataset", None)  # derived from data
    if fingerprint:
        identity["data"] = f"{dataset or 'data'}@{fingerprint[:10]}"
    return identity


def identities(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run: run_id and every identity setting as a string column (NOT_READ where the run's
    strategy does not read the setting, e.g. scratch's lp_epochs)."""
    rows = [{"run_id": run_id, **run_identity(params if isinstance(params, dict) else {}, dataset)}
            for run_id, params, dataset in zip(runs["run_id"], runs["params"], runs["dataset"])]
    frame = pd.DataFrame(rows).set_index("run_id")
    return frame.drop(columns=["strategy"], errors="ignore").fillna(NOT_READ).astype(str)


def drop_repeats(runs: pd.DataFrame, row_key: pd.Series) -> tuple[pd.DataFrame, list[str]]:
    """Keep the newest finished run per identity and seed (``row_key`` added as a column); name the
    others in a note."""
    keyed = runs.assign(row_key=row_key.to_numpy())
    keyed = keyed.sort_values(["start_time", "run_id"], kind="stable")
    newest = ~keyed.duplicated(["row_key", "seed"], keep="last")
    notes = []
    for (_, seed), rows in keyed[keyed.duplicated(["row_key", "seed"], keep=False)].groupby(["row_key", "seed"]):
        kept, older = rows.iloc[-1], rows.iloc[:-1]
        names = ", ".join(f"{r.run_name} ({r.run_id[:8]})" for r in older.itertuples())
        notes.append(f"{names} repeat{'s' if len(older) == 1 else ''} the settings and seed {seed} of "
                     f"{kept.run_name} ({kept.run_id[:8]}), which is newer: only the newest counts.")
    kept = keyed[newest]
    return kept.sort_values(["strategy", "seed", "run_id"], key=sort_key, ignore_index=True), notes


# ------------------------------------------------------------------------------- per-run numbers
def run_stats(runs: pd.DataFrame, history: pd.DataFrame, *,
              target_fraction: float = TARGET_FRACTION) -> tuple[pd.DataFrame, list[str]]:
    """One row per counted run: its identity settings, ``row_key`` (a hash of identity and strategy),
    every TABLE_METRICS number and epochs_logged; and notes on runs counted once or grouped by path.

    Summary metrics are used when logged; the per-epoch history fills the gaps and gives what
    the summary cannot: epochs and seconds until val acc first reaches ``target_fraction`` of
    the run's own best.
    """
    settings = identities(runs)
    row_key = pd.Series([digest({**settings.loc[run_id].to_dict(), "strategy": strategy})
                         for run_id, strategy in zip(runs["run_id"], runs["strategy"])], index=runs.index)
    runs, notes = drop_repeats(runs, row_key)
    has_fingerprint = runs["params"].map(lambda p: bool(isinstance(p, dict) and p.get("data_fingerprint")))
    if has_fingerprint.any() and not has_fingerprint.all():
        notes.append(f"{plural(int((~has_fingerprint).sum()), 'run')} logged no data fingerprint (older tlexp): "
                     f"{'it is' if (~has_fingerprint).sum() == 1 else 'they are'} grouped by the --data string, "
                     f"apart from the runs identified by their data's content.")
    stats = runs[["run_id", "strategy", "seed", "row_key"]].join(settings, on="run_id")
    derived = pd.DataFrame([_curve_stats(run_id, curves, target_fraction)
                            for run_id, curves in curves_by_run(history)])
    derived = derived.set_index("run_id").reindex(runs["run_id"]) if not derived.empty else pd.DataFrame()

    def logged(name: str) -> np.ndarray:
        return _numeric_param(runs, name).to_numpy(dtype=float)

    def from_curves(name: str) -> np.ndarray:
        return derived[name].to_numpy(dtype=float) if name in derived else np.full(len(runs), np.nan)

    for name in ("best_val_acc", "final_val_acc", "final_train_acc", "total_time_s", "avg_epoch_time_s"):
        summary = logged(name)  # the summary wins; the curves fill runs that did not log it
        stats[name] = np.where(np.isnan(summary), from_curves(name), summary)
    for name in ("test_acc", "params_trainable", "params_total", "trainable_fraction"):
        stats[name] = logged(name)
    for name in ("epochs_to_target", "seconds_to_target", "epochs_logged"):
        stats[name] = from_curves(name)
    stats["train_val_gap"] = stats["final_train_acc"] - stats["final_val_acc"]
    per_class = logged("train_samples_per_class")
    with np.errstate(divide="ignore", invalid="ignore"):
        from_sizes = logged("train_size") / logged("num_classes")
    stats["train_samples_per_class"] = np.where(np.isnan(per_class), from_sizes, per_class)
    stats["train_samples_per_class"] = stats["train_samples_per_class"].replace([np.inf, -np.inf], np.nan)
    return stats, notes


def _numeric_param(runs: pd.DataFrame, name: str) -> pd.Series:
    """A param or metric column as floats ('none', missing column -> NaN)."""
    if name not in runs:
        return pd.Series(np.nan, index=runs.index)
    return pd.to_numeric(runs[name], errors="coerce").astype(float)


def curves_by_run(history: pd.DataFrame) -> Iterable[tuple[str, pd.DataFrame]]:
    """(run_id, wide frame indexed by step with one column per metric) for every run."""
    if history.empty:
        return []
    wide = history.pivot_table(index=["run_id", "step"], columns="metric", values="value", aggfunc="last")
    return ((run_id, frame.droplevel(0)) for run_id, frame in wide.groupby(level=0))


def _curve_stats(run_id: str, curves: pd.DataFrame, target_fraction: float) -> dict[str, Any]:
    row: dict[str, Any] = {"run_id": run_id, "epochs_logged": int(curves.index.max())}
    val = curves["val_acc"].dropna() if "val_acc" in curves else pd.Series(dtype=float)
    times = curves["epoch_time_s"] if "epoch_time_s" in curves else pd.Series(np.nan, index=curves.index)
    if "train_acc" in curves and curves["train_acc"].notna().any():
        row["final_train_acc"] = curves["train_acc"].dropna().iloc[-1]
    if times.notna().any():
        row["total_time_s"] = times.sum()
        row["avg_epoch_time_s"] = times.mean()
    if not val.empty:
        row["best_val_acc"] = val.max()
        row["final_val_acc"] = val.iloc[-1]
        step = first_step_reaching(val, target_fraction * val.max())
        row["epochs_to_target"] = float(step)
        row["seconds_to_target"] = seconds_until(times, step)
    return row


def first_step_reaching(val_acc: pd.Series, target: float) -> int:
    """First step (epoch) whose value reaches ``target``; the series is indexed by step.

    The target is at most the series' maximum, so it is always reached; a run that never
    improves reaches 95% of its flat best in its first epoch, which is the honest answer.
    """
    reached = val_acc.index[val_acc.to_numpy() >= target - 1e-12]
    return int(reached[0]) if len(reached) else int(val_acc.index[-1])


def seconds_until(epoch_time_s: pd.Series, step: int) -> float:
    """Training seconds from the start until the end of epoch ``step`` (NaN if a time is missing)."""
    upto = epoch_time_s[epoch_time_s.index <= step]
    if upto.empty or upto.isna().any():
        return math.nan
    return float(upto.sum())



def varying_keys(stats: pd.DataFrame) -> tuple[list[str], dict[str, str]]:
    """Split the identity settings into those that differ between runs and those shared (with their value)."""
    keys = [c for c in stats.columns if c in _CONFIG_FIELDS and c not in ("strategy", "seed")]
    # A setting some strategies do not read varies only if the runs that read it differ.
    varying = [k for k in keys if stats.loc[stats[k] != NOT_READ, k].nunique() > 1]
    shared = {k: str(read.iloc[0]) for k in keys if k not in varying
              for read in [stats.loc[stats[k] != NOT_READ, k]] if len(read)}
    return varying, shared


def summarize(stats: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """One row per identity: the ``keys`` settings, strategy, row_key, n_runs, seeds, <metric>_mean / _std.

    Only runs of one identity are averaged (over seeds); std is NaN for a single run.
    """
    by = [*keys, "strategy", "row_key"]
    grouped = stats.groupby(by, sort=False)
    agg = grouped[list(TABLE_METRICS)].agg(["mean", "std"])
    agg.columns = [f"{metric}_{stat}" for metric, stat in agg.columns]
    agg.insert(0, "n_runs", grouped.size())
    agg.insert(1, "seeds", grouped["seed"].agg(lambda s: ",".join(sorted(s, key=natural))))
    table = agg.reset_index()
    return table.sort_values([*keys, "strategy"], key=sort_key, ignore_index=True)


def choose(table: pd.DataFrame, group_keys: Sequence[str], tuned_keys: Sequence[str]) -> pd.DataFrame:
    """Mark per group and strategy the ``chosen`` row (best mean validation accuracy) and the ``default``
    row (the tuned settings at TrainConfig's defaults, else the row with the most runs)."""
    defaults = TrainConfig().to_params()
    table = table.copy()
    table["chosen"] = False
    table["default"] = False
    for _, rows in table.groupby([*group_keys, "strategy"], sort=False):
        at_default = sum((rows[k] == defaults.get(k)).astype(int) for k in tuned_keys) if tuned_keys else 0
        preference = pd.DataFrame({"default": at_default, "n": rows["n_runs"]}, index=rows.index)
        default = preference.sort_values(["default", "n"], ascending=False, kind="stable").index[0]
        # Ties on validation go to the default, so tuning never moves without a reason.
        val = rows["best_val_acc_mean"].fillna(-math.inf)
        best = val[val == val.max()].index
        table.loc[default if default in best else best[0], "chosen"] = True
        table.loc[default, "default"] = True
    return table


def chosen_runs(stats: pd.DataFrame, table: pd.DataFrame, column: str = "chosen") -> pd.DataFrame:
    """The runs of the rows marked in ``column`` (chosen, or default)."""
    return stats[stats["row_key"].isin(table.loc[table[column], "row_key"])]
