"""Render a Comparison: the rich terminal tables, comparison.md/.csv, report.html and the PNG charts.

Numbers are formatted here and nowhere else: accuracies as percentages with one decimal,
"mean ± std" where a row has several runs, just the mean where it has one.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import pandas as pd

from tlexp.compare.types import (FORMATS, METRIC_WORDS, SIZE_KEYS, TARGET_FRACTION, CompareResult, Comparison,
                                 display_value, iter_groups, key_label, order_strategies)

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table


@dataclass(frozen=True)
class Column:
    """One displayed column: header, the metric (stem of <metric>_mean/_std in the table), format."""

    header: str
    source: str
    fmt: Callable[[float, float], str]
    group: str  # "accuracy" or "cost": which of the two terminal tables shows it


def _mean_std(scale: float, digits: int, thousands: bool = False) -> Callable[[float, float], str]:
    spec = f"{',' if thousands else ''}.{digits}f"

    def fmt(mean: float, std: float) -> str:
        if mean is None or math.isnan(mean):
            return "—"
        text = format(scale * mean, spec)
        return text if std is None or math.isnan(std) else f"{text} ± {format(scale * std, spec)}"
    return fmt


def _count(mean: float, std: float) -> str:
    return "—" if math.isnan(mean) else f"{mean:,.0f}"


def _share(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "—"
    return f"{100 * mean:.2f}" if mean < 0.01 else f"{100 * mean:.1f}"


_PCT = _mean_std(100, 1)
# The first accuracy column is the headline (test accuracy, or best validation accuracy for runs that
# logged no test split); best validation accuracy stays as a diagnostic.
COLUMNS = (
    Column("Test acc (%)", "test_acc", _PCT, "accuracy"),
    Column("Best val acc (%)", "best_val_acc", _PCT, "accuracy"),
    Column("Final val acc (%)", "final_val_acc", _PCT, "accuracy"),
    Column("Final train acc (%)", "final_train_acc", _PCT, "accuracy"),
    Column("Train−val gap (pts)", "train_val_gap", _PCT, "accuracy"),
    Column("Total time (s)", "total_time_s", _mean_std(1, 1, thousands=True), "cost"),
    Column("Epoch time (s)", "avg_epoch_time_s", _mean_std(1, 2, thousands=True), "cost"),
    Column(f"Epochs to {100 * TARGET_FRACTION:.0f}%", "epochs_to_target", _mean_std(1, 1), "cost"),
    Column(f"Seconds to {100 * TARGET_FRACTION:.0f}%", "seconds_to_target", _mean_std(1, 1, thousands=True), "cost"),
    Column("Trainable params", "params_trainable", _count, "cost"),
    Column("Total params", "params_total", _count, "cost"),
    Column("Trainable (%)", "trainable_fraction", _share, "cost"),
)


def label_columns(comparison: Comparison) -> list[str]:
    """The displayed names of the columns that label a row (settings, strategy, tuned settings, runs)."""
    return [*(key_label(k) for k in comparison.group_keys), "Strategy", *(key_label(k) for k in comparison.tuned_keys),
            "Runs"]


def display_table(comparison: Comparison, *, group: str | None = None) -> pd.DataFrame:
    """The headline rows as strings, one per (group, strategy); ``group`` picks the accuracy or cost columns."""
    table = comparison.headline
    out = pd.DataFrame({key_label(k): [display_value(k, v) for v in table[k]] for k in comparison.group_keys})
    out["Strategy"] = table["strategy"].to_numpy()
    for key in comparison.tuned_keys:
        out[key_label(key)] = table[key].to_numpy()
    out["Runs"] = table["n_runs"].astype(int).astype(str).to_numpy()
    columns = list(COLUMNS)
    if comparison.metric != "test_acc":  # no held-out test score: the optimistic number leads, said in a note
        columns.sort(key=lambda c: c.source != comparison.metric)
    for col in columns:
        if group is not None and col.group != group:
            continue
        if table[f"{col.source}_mean"].isna().all():
            continue  # e.g. no run logged a test accuracy
        out[col.header] = [col.fmt(m, s) for m, s in zip(table[f"{col.source}_mean"], table[f"{col.source}_std"])]
    return out


def efficiency_display(comparison: Comparison) -> pd.DataFrame | None:
    """Per training-set size (rows) and strategy (columns): 'mean ± std (n=k)'."""
    eff = comparison.efficiency
    if eff is None:
        return None
    family_keys = [k for k in comparison.group_keys if k not in SIZE_KEYS]
    cells = eff.assign(cell=[f"{_PCT(m, s)} (n={n})" for m, s, n in zip(eff["mean"], eff["std"], eff["n"])])
    wide = cells.pivot_table(index=[*family_keys, "size"], columns="strategy", values="cell", aggfunc="first")
    wide = wide[order_strategies(wide.columns)].fillna("—").reset_index()
    wide["size"] = [f"{s:g}" for s in wide["size"]]
    return wide.rename(columns={"size": "Samples per class", **{k: key_label(k) for k in family_keys}})


def _ci(low: float, high: float) -> str:
    return "—" if math.isnan(low) else f"{100 * low:.1f} to {100 * high:.1f}"


def paired_display(comparison: Comparison) -> pd.DataFrame | None:
    """Per group and pair of strategies: pairs, mean difference, 95% CI, p-value and test."""
    paired = comparison.paired
    if paired is None or paired.empty:
        return None
    return pd.DataFrame({
        **{key_label(k): [display_value(k, v) for v in paired[k]] for k in comparison.group_keys},
        "Comparison": [f"{a} − {b}" for a, b in zip(paired["strategy_a"], paired["strategy_b"])],
        "n": paired["n"].astype(int).astype(str),
        "Mean diff (points)": [f"{100 * d:+.1f}" for d in paired["mean_diff"]],
        "95% CI (points)": [_ci(lo, hi) for lo, hi in zip(paired["ci_low"], paired["ci_high"])],
        "p": ["—" if math.isnan(p) else ("< 0.001" if p < 0.001 else f"{p:.3f}") for p in paired["p_value"]],
        "Test": paired["test"],
    })


def tuning_display(comparison: Comparison) -> pd.DataFrame | None:
    """Per group and strategy: the chosen setting, its validation score and the candidates."""
    tuning = comparison.tuning
    if tuning is None:
        return None
    out = pd.DataFrame({key_label(k): [display_value(k, v) for v in tuning[k]] for k in comparison.group_keys})
    out["Strategy"] = tuning["strategy"].to_numpy()
    for key in [c[len("candidates_"):] for c in tuning.columns if c.startswith("candidates_")]:
        out[f"Chosen {key_label(key)}"] = tuning[key].to_numpy()
        out[f"Tried {key_label(key)}"] = tuning[f"candidates_{key}"].to_numpy()
    out["Val acc (%)"] = [_PCT(v, math.nan) for v in tuning["val_acc_mean"]]
    return out


# ----------------------------------------------------------------------------------- charts
@dataclass(frozen=True)
class Chart:
    title: str
    path: Path


def write_charts(comparison: Comparison, out_dir: Path) -> list[Chart]:
    """All PNG charts, overview first.

    One group: curves, bars, time-to-accuracy. Several groups: one bar chart across the groups,
    then the data-efficiency chart of a sweep, then curves and time-to-accuracy per group.
    """
    from tlexp import plots

    keys = comparison.group_keys
    metric = comparison.metric
    colors = plots.strategy_colors(order_strategies(comparison.runs["strategy"]))
    headline = comparison.headline
    chosen = comparison.stats[comparison.stats["row_key"].isin(headline["row_key"])]  # the tuned choice only
    runs_of = dict(iter_groups(chosen, keys))
    groups = list(iter_groups(headline, keys))
    charts: list[Chart] = []

    def save(fig: Any, name: str, title: str, label: str = "") -> None:
        charts.append(Chart(f"{title}{' — ' + label if label else ''}", plots.save_png(fig, out_dir / name)))

    if len(groups) > 1:  # one bar chart across groups instead of one per group
        table = pd.concat([rows.assign(group=label) for label, rows in groups])
        save(plots.plot_group_bars(table, colors=colors, accuracy=metric,
                                   accuracy_label=METRIC_WORDS[metric].capitalize()),
             "bars.png", "Accuracy and time per group")
    if comparison.efficiency is not None:
        family_keys = [k for k in keys if k not in SIZE_KEYS]
        families = list(iter_groups(comparison.efficiency, family_keys))
        metric_label = METRIC_WORDS[metric].capitalize()
        for label, eff in families:
            suffix = f"_{_slug(label)}" if len(families) > 1 else ""
            save(plots.plot_data_efficiency(eff, colors=colors, metric_label=metric_label, title=label),
                 f"data_efficiency{suffix}.png", "Data efficiency", label)
    for label, rows in groups:
        suffix = f"_{_slug(label)}" if len(groups) > 1 else ""
        history = comparison.history[comparison.history["run_id"].isin(runs_of[label]["run_id"])]
        group_colors = {s: c for s, c in colors.items() if s in set(rows["strategy"])}
        save(plots.plot_curves(history, colors=group_colors, title=label), f"curves{suffix}.png",
             "Training curves", label)
        if len(groups) == 1:
            save(plots.plot_bars(rows, colors=group_colors, title=label, headline=metric), "bars.png",
                 "Accuracy and time", label)
        save(plots.plot_time_to_accuracy(history, colors=group_colors, title=label),
             f"time_to_accuracy{suffix}.png", "Validation accuracy against training time", label)
    return charts


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "-", label.replace("=", "-")).strip("-") or "all"


# ------------------------------------------------------------------------------ file formats
def write_report(comparison: Comparison, out_dir: Path, *, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Write the charts and the chosen formats into ``out_dir`` (which must exist); return the files."""
    charts = write_charts(comparison, out_dir)
    files = [c.path for c in charts]
    if "csv" in formats:
        files.append(_write(out_dir / "comparison.csv", csv_table(comparison).to_csv(index=False)))
        for name, frame in (("paired.csv", comparison.paired), ("tuning.csv", comparison.tuning),
                            ("data_efficiency.csv", comparison.efficiency)):
            if frame is not None:
                files.append(_write(out_dir / name, frame.to_csv(index=False)))
    if "md" in formats:
        files.append(_write(out_dir / "comparison.md", render_markdown(comparison, charts)))
    if "html" in formats:
        files.append(_write(out_dir / "report.html", render_html(comparison, charts)))
    return files


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def csv_table(comparison: Comparison) -> pd.DataFrame:
    """Every row (each tuned setting too), raw numbers (accuracies as fractions), every setting as a column;
    ``chosen`` marks the headline rows, ``default`` the rows at the default settings."""
    table = comparison.table.drop(columns="row_key")
    for key, value in reversed(list(comparison.shared.items())):
        table.insert(0, key, value)
    return table


def _markdown_table(frame: pd.DataFrame) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in frame.columns) + " |",
             "|" + "|".join("---" for _ in frame.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _context(comparison: Comparison, *, brief: bool = False) -> str:
    """One sentence on what the table holds; ``brief`` lists only the shared settings not at their default."""
    from tlexp.config import TrainConfig

    defaults = TrainConfig().to_params() if brief else {}
    shared = ", ".join(f"{k}={display_value(k, v)}" for k, v in comparison.shared.items()
                       if k in ("model", "data") or defaults.get(k) != v)
    n = len(comparison.stats)
    return (f"{n} finished training run{'s' if n != 1 else ''}; headline: {METRIC_WORDS[comparison.metric]}; "
            f"accuracies in %, mean ± std over seeds where a row has several runs. Shared settings: "
            f"{shared or 'none'}{' (others at their defaults)' if brief else ''}.")


@dataclass(frozen=True)
class Extra:
    """A table after the findings: title, one sentence on what it holds, the frame, its label columns."""

    title: str
    intro: str
    frame: pd.DataFrame
    text_columns: int


def extra_tables(comparison: Comparison) -> list[Extra]:
    extras = []
    paired = paired_display(comparison)
    if paired is not None:
        extras.append(Extra("Strategies compared (paired by seed)", f"Difference of {METRIC_WORDS[comparison.metric]} "
                            "in points, strategy on the left minus the right; 95% confidence interval from the t "
                            "distribution; paired t-test on the seeds both have, Welch's t-test when they share "
                            "fewer than two.", paired, len(comparison.group_keys) + 1))
    tuning = tuning_display(comparison)
    if tuning is not None:
        extras.append(Extra("Tuning", "The setting of each strategy with the best mean validation accuracy; its "
                            "test accuracy is the headline.", tuning, tuning.shape[1] - 1))
    eff = efficiency_display(comparison)
    if eff is not None:
        extras.append(Extra("Accuracy per training-set size", f"{METRIC_WORDS[comparison.metric].capitalize()} (%), "
                            f"mean ± std (n runs).", eff, eff.shape[1] - comparison.efficiency["strategy"].nunique()))
    return extras


def render_markdown(comparison: Comparison, charts: Sequence[Chart]) -> str:
    """comparison.md: table, findings, the paired/tuning/size tables, chart links and notes."""
    parts = [render_description(comparison, notes=False)]
    for extra in extra_tables(comparison):
        parts += [f"## {extra.title}", "", extra.intro, "", _markdown_table(extra.frame), ""]
    parts += ["## Charts", ""] + [f"![{c.title}]({c.path.name})\n" for c in charts]
    if comparison.notes:
        parts += ["## Notes", "", *[f"- {note}" for note in comparison.notes], ""]
    return "\n".join(parts)


def render_description(comparison: Comparison, *, notes: bool = True) -> str:
    """Markdown: the headline table and the findings (the comparison run's description in MLflow's UI)."""
    parts = [f"# Comparison: {comparison.experiment}", "", _context(comparison), "",
             _markdown_table(display_table(comparison)), "", "## Findings", ""]
    for section in comparison.findings:
        parts += [f"### {section.title}", "", *[f"- {line}" for line in section.lines], ""]
    if notes and comparison.notes:
        parts += ["## Notes", "", *[f"- {note}" for note in comparison.notes], ""]
    return "\n".join(parts)


def run_summary(comparison: Comparison) -> dict[str, str]:
    """Short facts about a comparison, logged with the comparison run."""
    return {"runs_compared": str(len(comparison.stats)),
            "strategies": ",".join(order_strategies(comparison.stats["strategy"])),
            "group_keys": ",".join(comparison.group_keys) or "none",
            "tuned_keys": ",".join(comparison.tuned_keys) or "none",
            "headline_metric": comparison.metric}


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1200px;color:#222;
 padding:0 1rem;line-height:1.45}
table{border-collapse:collapse;margin:.5rem 0 1.5rem;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.3rem .6rem;text-align:right;white-space:nowrap}
th{background:#f3f3f3} .t{text-align:left}
.scroll{overflow-x:auto} img{max-width:100%;border:1px solid #eee;margin:.5rem 0 1.5rem}
.meta{color:#555} li{margin:.2rem 0}
"""


def render_html(comparison: Comparison, charts: Sequence[Chart]) -> str:
    """report.html: self-contained (CSS inline, charts as base64 PNG), readable offline or as an artifact."""
    esc = html.escape
    title = f"Comparison: {comparison.experiment}"
    generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [f"<h1>{esc(title)}</h1>", f"<p class='meta'>{esc(_context(comparison))} Generated {generated}.</p>",
            "<h2>Summary</h2>", _html_table(display_table(comparison), text_columns=len(label_columns(comparison)) - 1),
            "<h2>Findings</h2>"]
    for section in comparison.findings:
        body.append(f"<h3>{esc(section.title)}</h3><ul>" +
                    "".join(f"<li>{esc(line)}</li>" for line in section.lines) + "</ul>")
    for extra in extra_tables(comparison):
        body += [f"<h2>{esc(extra.title)}</h2>", f"<p>{esc(extra.intro)}</p>",
                 _html_table(extra.frame, text_columns=extra.text_columns)]
    body.append("<h2>Charts</h2>")
    for chart in charts:
        data = base64.b64encode(chart.path.read_bytes()).decode("ascii")
        body.append(f"<h3>{esc(chart.title)}</h3><img alt='{esc(chart.title, quote=True)}' "
                    f"src='data:image/png;base64,{data}'>")
    if comparison.notes:
        body.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in comparison.notes) + "</ul>")
    return (f"<!doctype html>\n<html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>{_CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def _html_table(frame: pd.DataFrame, *, text_columns: int = 1) -> str:
    """A plain HTML table; the first ``text_columns`` columns are labels (left-aligned), the rest numbers."""
    def cls(i: int) -> str:
        return " class='t'" if i < text_columns else ""

    head = "".join(f"<th{cls(i)}>{html.escape(str(c))}</th>" for i, c in enumerate(frame.columns))
    rows = "".join("<tr>" + "".join(f"<td{cls(i)}>{html.escape(str(v))}</td>" for i, v in enumerate(row)) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>"


# ----------------------------------------------------------------------------------- terminal
def print_report(result: CompareResult, *, console: "Console | None" = None) -> "Console":
    """The table (as two rich tables that fit a terminal), the findings, the notes and where files went.

    Returns the console used (a new stdout console when none is given).
    """
    from rich.console import Console
    from rich.markup import escape

    console = console or Console()
    comparison = result.comparison
    console.print(f"[bold]Comparison: {escape(comparison.experiment)}[/bold]  "
                  f"[dim]{escape(_context(comparison, brief=True))}[/dim]")
    labels = label_columns(comparison)
    for group, title in (("accuracy", "Accuracy"), ("cost", "Cost and convergence")):
        _print_fitted(console, display_table(comparison, group=group), title=title, text_columns=labels)
    eff = efficiency_display(comparison)
    if eff is not None:
        _print_fitted(console, eff, title="Accuracy per training-set size (%)",
                      text_columns=[c for c in eff.columns if c not in set(comparison.efficiency["strategy"])])
    for section in comparison.findings:
        console.print(f"[bold]{escape(section.title)}[/bold]", highlight=False)
        for line in section.lines:
            console.print(f"  • {line}", highlight=False, markup=False)
    for note in comparison.notes:
        console.print(f"[dim]Note: {escape(note)}[/dim]", highlight=False)
    console.print(f"Report written to {result.output_dir}/ ({', '.join(p.name for p in result.files)})",
                  highlight=False, markup=False)
    return console


def fitted_table(console: "Console", frame: pd.DataFrame, *, title: str,
                 text_columns: Sequence[str]) -> tuple["Table", list[str]]:
    """A rich table of ``frame`` no wider than the console, and the columns left out to get there.

    Rich squeezes a table that is too wide by breaking words ("Strate / gy"); instead, no cell and no
    header word is ever split: headers wrap at spaces, and when even that is too wide, columns are
    dropped from the right (label columns last).
    """
    from rich.table import Table

    columns = list(frame.columns)
    dropped: list[str] = []
    while True:
        cells = {c: [str(v) for v in frame[c]] for c in columns}
        # the narrowest a column can be without splitting a word, and its width on one line
        narrow = {c: max([len(v) for v in cells[c]] + [len(w) for w in str(c).split()]) for c in columns}
        natural = {c: max([len(v) for v in cells[c]] + [len(str(c))]) for c in columns}
        chrome = 3 * len(columns) + 1  # one space each side of a cell, and a border between and around
        room = console.width - chrome - sum(narrow.values())
        droppable = [c for c in columns if c not in text_columns] or columns[1:]
        if room >= 0 or not droppable:
            break
        dropped.insert(0, droppable[-1])
        columns.remove(droppable[-1])
    widths = dict(narrow)
    for c in columns:  # spare room unwraps headers, left to right
        extra = min(max(room, 0), natural[c] - widths[c])
        widths[c] += extra
        room -= extra
    table = Table(title=title, title_justify="left", header_style="bold")
    for c in columns:
        table.add_column(str(c), justify="left" if c in text_columns else "right", width=widths[c],
                         overflow="fold")
    for row in frame[columns].itertuples(index=False):
        table.add_row(*[str(v) for v in row])
    return table, dropped


def _print_fitted(console: "Console", frame: pd.DataFrame, *, title: str, text_columns: Sequence[str]) -> None:
    table, dropped = fitted_table(console, frame, title=title, text_columns=text_columns)
    console.print(table)
    if dropped:
        console.print(f"({len(dropped)} column{'s' if len(dropped) > 1 else ''} left out at this width: "
                      f"{', '.join(dropped)}; see comparison.md)", style="dim", highlight=False, markup=False)


__all__ = ["write_report", "write_charts", "render_markdown", "render_html", "render_description", "print_report",
           "display_table", "fitted_table", "csv_table", "run_summary", "COLUMNS"]
