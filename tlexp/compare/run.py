"""``tlexp compare`` end to end: read the store, build the comparison, write the report, log one run.

Data flows one way:

    store --read/history--> pandas --aggregate/stats--> rows and intervals --findings--> words
          --report/plots--> files --tracking.comparison--> the experiment's one comparison run
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import pandas as pd

from tlexp.compare import aggregate, findings, stats
from tlexp.compare.history import load_history
from tlexp.compare.read import KIND_COMPARISON, client_for, load_all_runs, resolve_uri, select_training_runs
from tlexp.compare.types import FORMATS, CompareError, CompareResult, Comparison, Section, iter_groups, natural, plural
from tlexp.config import DEFAULT_EXPERIMENT

if TYPE_CHECKING:
    from rich.console import Console

MANIFEST = ".tlexp-compare.json"  # the files compare wrote into an output folder, so it can clear them next time


def build_comparison(experiment: str, runs: pd.DataFrame, history: pd.DataFrame,
                     notes: Sequence[str] = ()) -> Comparison:
    """Aggregate and interpret already-loaded runs (no I/O): the core of ``run_compare``."""
    notes = list(notes)
    per_run, repeat_notes = aggregate.run_stats(runs, history)
    notes += repeat_notes
    row_keys, shared = aggregate.varying_keys(per_run)
    group_keys = [k for k in row_keys if k not in aggregate.TUNED_KEYS]
    tuned_keys = [k for k in row_keys if k in aggregate.TUNED_KEYS]
    table = aggregate.choose(aggregate.summarize(per_run, row_keys), group_keys, tuned_keys)
    metric = "test_acc" if per_run["test_acc"].notna().all() else "best_val_acc"
    if metric != "test_acc":
        missing = int(per_run["test_acc"].isna().sum())
        notes.append(f"{plural(missing, 'run')} logged no test accuracy (trained before tlexp held out a test "
                     f"split), so every headline number is the best validation accuracy, which is optimistic: "
                     f"the epoch was chosen on those same images. Re-run them for a held-out test score.")
    chosen = aggregate.chosen_runs(per_run, table)
    paired = stats.paired_tests(chosen, group_keys, metric)
    per_strategy = table.groupby([*group_keys, "strategy"], sort=False)
    tuning = default_paired = None
    if (per_strategy.size() > 1).any():
        default_paired = stats.paired_tests(aggregate.chosen_runs(per_run, table, "default"), group_keys, metric)
        # the settings actually tuned: several values within one strategy (weights differ only between them)
        within = [k for k in tuned_keys if (per_strategy[k].nunique() > 1).any()]
        tuning = tuning_table(table, group_keys, within)
        notes.append(f"Runs differ in {', '.join(within)} within a strategy: the table shows, per group and "
                     f"strategy, the setting with the best mean validation accuracy (tuning.csv); comparison.csv "
                     f"keeps every row.")
    sections = []
    for label, group_table in iter_groups(table, group_keys):
        rows = group_table[group_table["chosen"]]
        ref = rows.iloc[0]
        group_pairs = _in_group(paired, group_keys, ref)
        sections += findings.group_findings(label, rows, group_pairs, metric, history,
                                            _in_group(chosen, group_keys, ref))
        if default_paired is not None and len(group_table) > len(rows):
            lines = findings.tuning_findings(rows, group_table[group_table["default"]], within, group_pairs,
                                             _in_group(default_paired, group_keys, ref), metric)
            sections.append(Section(f"Tuning ({label})" if label else "Tuning", lines))
    efficiency = stats.data_efficiency(chosen, group_keys, metric)
    if efficiency is not None:
        sections += findings.efficiency_findings(efficiency, paired, group_keys, metric)
    if group_keys:
        notes.append(f"Runs differ in {', '.join(group_keys)}; each row averages only runs with equal settings "
                     f"(over seeds).")
    short = per_run[per_run["epochs_logged"] < pd.to_numeric(per_run.get("epochs"), errors="coerce")]
    if len(short):
        notes.append(f"{plural(len(short), 'run')} logged fewer epochs than configured; curves are "
                     f"averaged per epoch over the runs that reached it.")
    return Comparison(experiment=experiment, runs=runs, history=history, stats=per_run, table=table,
                      row_keys=row_keys, group_keys=group_keys, shared=shared, findings=sections, notes=notes,
                      metric=metric, paired=paired if paired["strategy_a"].size else None, tuning=tuning,
                      efficiency=efficiency)


def _in_group(frame: pd.DataFrame, keys: Sequence[str], ref: pd.Series) -> pd.DataFrame:
    """The rows of ``frame`` whose ``keys`` equal those of ``ref``."""
    mask = pd.Series(True, index=frame.index)
    for k in keys:
        mask &= frame[k] == ref[k]
    return frame[mask]


def tuning_table(table: pd.DataFrame, group_keys: Sequence[str], tuned_keys: Sequence[str]) -> pd.DataFrame:
    """Per group and strategy: the chosen setting, its validation score, the candidates and the default."""
    rows = []
    for _, candidates in table.groupby([*group_keys, "strategy"], sort=False):
        best = candidates[candidates["chosen"]].iloc[0]
        default = candidates[candidates["default"]].iloc[0]
        rows.append({**{k: best[k] for k in group_keys}, "strategy": best["strategy"],
                     **{k: best[k] for k in tuned_keys}, "val_acc_mean": best["best_val_acc_mean"],
                     "test_acc_mean": best["test_acc_mean"], "n_runs": int(best["n_runs"]),
                     **{f"candidates_{k}": ",".join(sorted(set(candidates[k]), key=natural))
                        for k in tuned_keys},
                     **{f"default_{k}": default[k] for k in tuned_keys}})
    return pd.DataFrame(rows)


def default_output_dir(experiment: str) -> Path:
    """reports/<experiment>/ with the name made safe for a folder."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return Path("reports") / safe


def parse_formats(formats: str | Sequence[str]) -> tuple[str, ...]:
    """'md,csv' or ['md', 'csv'] -> ('md', 'csv'); CompareError names an unknown one."""
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    chosen = tuple(dict.fromkeys(f.strip().lower() for f in items if f.strip()))
    bad = [f for f in chosen if f not in FORMATS]
    if bad or not chosen:
        raise CompareError(f"Unknown report format {', '.join(map(repr, bad)) or repr('')}; "
                           f"expected a comma-separated list of: {', '.join(FORMATS)}.")
    return chosen


def check_output_dir(path: Path) -> None:
    """Raise CompareError unless ``path`` is, or can be created as, a writable directory."""
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise CompareError(f"Cannot write the report to {str(path)!r}: {str(probe)!r} is a file, not a folder; "
                           f"pass --output a writable folder.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CompareError(f"Cannot write the report to {str(path)!r}: {str(probe)!r} is not writable; "
                           f"pass --output a writable folder.")


def clear_previous(out_dir: Path) -> None:
    """Remove the files an earlier ``tlexp compare`` wrote into ``out_dir`` (listed in its manifest), and
    nothing else: a reused folder must not keep last time's charts of groups that no longer exist."""
    manifest = out_dir / MANIFEST
    try:
        names = json.loads(manifest.read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError, AttributeError):
        return
    for name in names:
        if isinstance(name, str) and name == Path(name).name and name not in ("", ".", ".."):
            (out_dir / name).unlink(missing_ok=True)


def write_manifest(out_dir: Path, files: Sequence[Path]) -> Path:
    path = out_dir / MANIFEST
    path.write_text(json.dumps({"written_by": "tlexp compare", "files": sorted(p.name for p in files)}, indent=1),
                    encoding="utf-8")
    return path


def run_compare(experiment: str = DEFAULT_EXPERIMENT, *, output: str | os.PathLike[str] | None = None,
                formats: str | Sequence[str] = FORMATS, tracking_uri: str | None = None,
                log_to_mlflow: bool = True, console: "Console | None" = None) -> CompareResult:
    """Compare the strategies of ``experiment``: table, charts, findings, report files, MLflow run.

    Reads only the tracking store. Writes the report to ``output`` (default reports/<experiment>/),
    replacing the files an earlier compare wrote there, prints the table and findings to ``console``
    (default: stdout), and updates the experiment's one comparison run (tlexp.kind=comparison) unless
    ``log_to_mlflow`` is False. Raises CompareError for a bad format, an unwritable output folder
    (before anything is written), an unknown experiment, or one without finished training runs.
    """
    from tlexp import report
    from tlexp.tracking.comparison import log_comparison_run

    chosen = parse_formats(formats)
    out_dir = Path(output) if output is not None else default_output_dir(experiment)
    check_output_dir(out_dir)
    client = client_for(tracking_uri)
    all_runs = load_all_runs(client, experiment)
    runs, notes = select_training_runs(all_runs, experiment)
    history = load_history(experiment, tracking_uri=resolve_uri(tracking_uri), runs=runs)
    comparison = build_comparison(experiment, runs, history, notes)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        clear_previous(out_dir)
        files = report.write_report(comparison, out_dir, formats=chosen)
        write_manifest(out_dir, files)
    except OSError as exc:
        raise CompareError(f"Cannot write the report to {str(out_dir)!r} ({exc.strerror or exc}); "
                           f"pass --output a writable folder.") from exc
    result = CompareResult(comparison=comparison, output_dir=out_dir, files=files)
    console = report.print_report(result, console=console)  # before logging: a store error keeps the report
    if log_to_mlflow:
        result.run_id = log_comparison_run(client, experiment=experiment, files=files,
                                           description=report.render_description(comparison),
                                           params=report.run_summary(comparison))
        console.print(f"Logged to MLflow as run {result.run_id} (the experiment's {KIND_COMPARISON} run, "
                      f"updated in place).", highlight=False)
    return result
