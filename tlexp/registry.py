"""Register the winner: from a comparison to ``models:/NAME@champion``.

The rule, kept simple on purpose:

1. the winning strategy is the headline row (``Comparison.headline``: per group and strategy, the
   setting chosen on validation) with the best mean headline accuracy (test accuracy; best validation
   accuracy for runs without a test split). With several groups (a data-size sweep) it is the best
   headline row across them;
2. among that row's runs (its seeds), the model registered is the one with the best *validation*
   accuracy (``best_val_acc``), never chosen on test: its test score stays an honest estimate.

The MLflow writes (version, tags, description, alias) live in ``tracking.registry``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .compare import CompareError, Comparison
from .compare.types import METRIC_WORDS, group_label, pct

ALIAS = "champion"


@dataclass
class Champion:
    """The run whose model is registered, and why."""

    strategy: str
    run_id: str
    metric: str  # the headline metric: test_acc or best_val_acc
    headline_acc: float  # the strategy's mean headline accuracy over its runs in that row
    run_val_acc: float  # the chosen run's best validation accuracy (what chose it among the seeds)
    n_runs: int
    model: str
    dataset: str
    group: str  # '' or 'samples_per_class=20, ...' when there are several groups
    finding: str  # one sentence: the headline finding

    def tags(self, comparison_run_id: str | None) -> dict[str, str]:
        tags = {"strategy": self.strategy, "model": self.model, "dataset": self.dataset,
                "headline_metric": self.metric, "headline_accuracy": f"{self.headline_acc:.4f}",
                "val_accuracy": f"{self.run_val_acc:.4f}", "source_run_id": self.run_id}
        if comparison_run_id:
            tags["comparison_run_id"] = comparison_run_id
        if self.group:
            tags["group"] = self.group
        return tags


def choose_champion(comparison: Comparison) -> Champion:
    """The run to register (see the module's rule). Raises CompareError when there is none."""
    metric = comparison.metric
    rows = comparison.headline
    column = f"{metric}_mean"
    rows = rows[rows[column].notna()] if column in rows else rows.iloc[0:0]
    if rows.empty:
        raise CompareError(f"Experiment {comparison.experiment!r} has no finished training run with a "
                           f"{METRIC_WORDS[metric]}; nothing was registered.")
    best = rows.sort_values(column, ascending=False, kind="stable").iloc[0]
    runs = _row_runs(comparison, best)
    scores = comparison.runs.set_index("run_id")["best_val_acc"].reindex(runs)
    if scores.notna().any():
        run_id = str(scores.idxmax())
    else:
        run_id = runs[0]
    run = comparison.runs.set_index("run_id").loc[run_id]
    group = group_label(best, comparison.group_keys) if comparison.group_keys else ""
    others = rows[rows.strategy != best.strategy]
    if len(others) and not comparison.group_keys:
        runner = others.sort_values(column, ascending=False, kind="stable").iloc[0]
        finding = (f"{best.strategy} wins on mean {METRIC_WORDS[metric]}: {pct(best[column])} over "
                   f"{int(best.n_runs)} run(s), against {runner.strategy} {pct(runner[column])}.")
    else:
        finding = (f"{best.strategy} has the best mean {METRIC_WORDS[metric]}: {pct(best[column])} over "
                   f"{int(best.n_runs)} run(s){f' ({group})' if group else ''}.")
    return Champion(strategy=str(best.strategy), run_id=run_id, metric=metric, headline_acc=float(best[column]),
                    run_val_acc=float(scores.get(run_id, float("nan"))), n_runs=len(runs),
                    model=str(run.get("model", "")), dataset=str(run.get("dataset", "")), group=group,
                    finding=finding)


def _row_runs(comparison: Comparison, row: Any) -> list[str]:
    """The run ids counted in one table row (same identity: its seeds)."""
    stats = comparison.stats
    if "row_key" in row.index and "row_key" in stats:
        chosen = stats[stats["row_key"] == row["row_key"]]
    else:  # the same strategy and the same value of every setting that differs between rows
        chosen = stats[stats["strategy"] == row["strategy"]]
        for key in comparison.row_keys:
            chosen = chosen[chosen[key].astype(str) == str(row[key])]
    return [str(r) for r in chosen["run_id"]]


def describe(champion: Champion, experiment: str) -> str:
    """The model version's description (markdown): the headline finding and how the run was chosen."""
    return (f"Champion of experiment **{experiment}**. {champion.finding}\n\n"
            f"Registered run {champion.run_id} ({champion.strategy}, {champion.model} on {champion.dataset}): the "
            f"best validation accuracy ({pct(champion.run_val_acc)}) among the {champion.n_runs} run(s) of the "
            f"winning strategy; chosen on validation, never on test.")


def register_winner(experiment: str, *, name: str | None = None, tracking_uri: str | None = None,
                    comparison: Comparison | None = None, comparison_run_id: str | None = None) -> Any:
    """Register the champion of ``experiment`` as ``name`` (default: the experiment's name) with the alias
    ``champion``; returns ``tracking.registry.Registered``. Raises CompareError/TrackingError (one line) with
    nothing registered when there is no finished run, the run has no image model, or no registry."""
    from .compare import build_comparison, load_history, load_runs
    from .tracking.registry import check_registry, comparison_run, register_model_version

    check_registry(tracking_uri)  # before reading every run
    if comparison is None:
        runs = load_runs(experiment, tracking_uri=tracking_uri)
        comparison = build_comparison(experiment, runs, load_history(experiment, tracking_uri=tracking_uri,
                                                                     runs=runs))
    champion = choose_champion(comparison)
    if comparison_run_id is None:
        comparison_run_id = comparison_run(experiment, tracking_uri=tracking_uri)
    return register_model_version(name or experiment, run_id=champion.run_id, alias=ALIAS,
                                  tags=champion.tags(comparison_run_id), description=describe(champion, experiment),
                                  champion=champion, tracking_uri=tracking_uri)
