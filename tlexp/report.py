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

from tlexp import compare as cmp

if TYPE_CHECKING:
    from rich.console import Console


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
COLUMNS = (
    Column("Best val acc (%)", "best_val_acc", _PCT, "accuracy"),
    Column("Final val acc (%)", "final_val_acc", _PCT, "accuracy"),
    Column("Final train acc (%)", "final_train_acc", _PCT, "accuracy"),
    Column("Test acc (%)", "test_acc", _PCT, "accuracy"),
    Column("Train-val gap (points)", "train_val_gap", _PCT, "accuracy"),
    Column("Total time (s)", "total_time_s", _mean_std(1, 1, thousands=True), "cost"),
    Column("Epoch time (s)", "avg_epoch_time_s", _mean_std(1, 2, thousands=True), "cost"),
    Column(f"Epochs to {100 * cmp.TARGET_FRACTION:.0f}% of best", "epochs_to_target", _mean_std(1, 1), "cost"),
    Column(f"Seconds to {100 * cmp.TARGET_FRACTION:.0f}% of best", "seconds_to_target",
           _mean_std(1, 1, thousands=True), "cost"),
    Column("Trainable params", "params_trainable", _count, "cost"),
    Column("Total params", "params_total", _count, "cost"),
    Column("Trainable (%)", "trainable_fraction", _share, "cost"),
)


def display_table(comparison: cmp.Comparison, *, group: str | None = None) -> pd.DataFrame:
    """The table as strings, one row per (group, strategy); ``group`` picks the accuracy or cost columns."""
    table = comparison.table
    out = pd.DataFrame({key: [cmp.display_value(key, v) for v in table[key]] for key in comparison.group_keys})
    out["Strategy"] = table["strategy"].to_numpy()
    out["Runs"] = table["n_runs"].astype(int).astype(str)
    for col in COLUMNS:
        if group is not None and col.group != group:
            continue
        if table[f"{col.source}_mean"].isna().all():
            continue  # e.g. no run logged a test accuracy
        out[col.header] = [col.fmt(m, s) for m, s in zip(table[f"{col.source}_mean"], table[f"{col.source}_std"])]
    return out


def efficiency_display(comparison: cmp.Comparison) -> pd.DataFrame | None:
    """Per training-set size (rows) and strategy (columns): 'mean ± std (n=k)'."""
    eff = comparison.efficiency
    if eff is None:
        return None
    family_keys = [k for k in comparison.group_keys if k not in cmp.SIZE_KEYS]
    cells = eff.assign(cell=[f"{_PCT(m, s)} (n={n})" for m, s, n in zip(eff["mean"], eff["std"], eff["n"])])
    wide = cells.pivot_table(index=[*family_keys, "size"], columns="strategy", values="cell", aggfunc="first")
    wide = wide[cmp.order_strategies(wide.columns)].fillna("—").reset_index()
    wide["size"] = [f"{s:g}" for s in wide["size"]]
    return wide.rename(columns={"size": "Samples per class"})


def paired_display(comparison: cmp.Comparison) -> pd.DataFrame | None:
    paired = comparison.paired
    if paired is None or paired.empty:
        return None
    return pd.DataFrame({
        **{k: paired[k] for k in comparison.group_keys if k in paired and k not in cmp.SIZE_KEYS},
        "Samples per class": [f"{s:g}" for s in paired["size"]],
        "Comparison": [f"{a} − {b}" for a, b in zip(paired["strategy"], paired["versus"])],
        "Mean difference (points)": [_PCT(m, s) for m, s in zip(paired["mean_diff"], paired["std_diff"])],
        "Seeds paired": paired["n_pairs"].astype(str),
    })


# ----------------------------------------------------------------------------------- charts
@dataclass(frozen=True)
class Chart:
    title: str
    path: Path


def write_charts(comparison: cmp.Comparison, out_dir: Path) -> list[Chart]:
    """All PNG charts, overview first.

    One group: curves, bars, time-to-accuracy. Several groups: one bar chart across the groups,
    then the data-efficiency chart of a sweep, then curves and time-to-accuracy per group.
    """
    from tlexp import plots

    keys = comparison.group_keys
    colors = plots.strategy_colors(cmp.order_strategies(comparison.runs["strategy"]))
    runs_of = dict(cmp.iter_groups(comparison.stats, keys))
    groups = list(cmp.iter_groups(comparison.table, keys))
    charts: list[Chart] = []

    def save(fig: Any, name: str, title: str, label: str = "") -> None:
        charts.append(Chart(f"{title}{' — ' + label if label else ''}", plots.save_png(fig, out_dir / name)))

    if len(groups) > 1:  # one bar chart across groups instead of one per group
        metric = cmp.accuracy_metric(comparison.table)
        table = pd.concat([rows.assign(group=label) for label, rows in groups])
        save(plots.plot_group_bars(table, colors=colors, accuracy=metric,
                                   accuracy_label=cmp.METRIC_WORDS[metric].capitalize()),
             "bars.png", "Accuracy and time per group")
    if comparison.efficiency is not None:
        family_keys = [k for k in keys if k not in cmp.SIZE_KEYS]
        families = list(cmp.iter_groups(comparison.efficiency, family_keys))
        metric_label = cmp.METRIC_WORDS[comparison.efficiency_metric].capitalize()
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
            save(plots.plot_bars(rows, colors=group_colors, title=label), "bars.png", "Accuracy and time", label)
        save(plots.plot_time_to_accuracy(history, colors=group_colors, title=label),
             f"time_to_accuracy{suffix}.png", "Validation accuracy against training time", label)
    return charts


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "-", label.replace("=", "-")).strip("-") or "all"


# ------------------------------------------------------------------------------ file formats
def write_report(comparison: cmp.Comparison, out_dir: Path, *, formats: Sequence[str] = cmp.FORMATS) -> list[Path]:
    """Write the charts and the chosen formats into ``out_dir`` (which must exist); return the files."""
    charts = write_charts(comparison, out_dir)
    files = [c.path for c in charts]
    if "csv" in formats:
        files.append(_write(out_dir / "comparison.csv", csv_table(comparison).to_csv(index=False)))
        if comparison.efficiency is not None:
            files.append(_write(out_dir / "data_efficiency.csv", comparison.efficiency.to_csv(index=False)))
            files.append(_write(out_dir / "paired.csv", comparison.paired.to_csv(index=False)))
    if "md" in formats:
        files.append(_write(out_dir / "comparison.md", render_markdown(comparison, charts)))
    if "html" in formats:
        files.append(_write(out_dir / "report.html", render_html(comparison, charts)))
    return files


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def csv_table(comparison: cmp.Comparison) -> pd.DataFrame:
    """The table with raw numbers (accuracies as fractions) and every grouping key as a column."""
    table = comparison.table.copy()
    for key, value in reversed(list(comparison.shared.items())):
        table.insert(0, key, value)
    order = [k for k in cmp.GROUP_KEYS if k in table]
    return table[[*order, *[c for c in table.columns if c not in order]]]


def _markdown_table(frame: pd.DataFrame) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in frame.columns) + " |",
             "|" + "|".join("---" for _ in frame.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _context(comparison: cmp.Comparison) -> str:
    shared = ", ".join(f"{k}={cmp.display_value(k, v)}" for k, v in comparison.shared.items())
    n = len(comparison.runs)
    return (f"{n} finished training run{'s' if n != 1 else ''}; accuracies in %, mean ± std over seeds where a "
            f"row has several runs. Shared settings: {shared or 'none'}.")


def render_markdown(comparison: cmp.Comparison, charts: Sequence[Chart]) -> str:
    """comparison.md: table, findings, sweep tables, chart links and notes."""
    parts = [f"# Comparison: {comparison.experiment}", "", _context(comparison), "",
             _markdown_table(display_table(comparison)), "", "## Findings", ""]
    for section in comparison.findings:
        parts += [f"### {section.title}", "", *[f"- {line}" for line in section.lines], ""]
    eff, paired = efficiency_display(comparison), paired_display(comparison)
    if eff is not None:
        parts += ["## Accuracy per training-set size", "",
                  f"{cmp.METRIC_WORDS[comparison.efficiency_metric].capitalize()} (%), mean ± std (n runs).", "",
                  _markdown_table(eff), ""]
    if paired is not None:
        parts += ["## Paired by seed", "", "Same seed and training-set size, different strategy: the mean "
                  "difference over seeds ± its std.", "", _markdown_table(paired), ""]
    parts += ["## Charts", ""] + [f"![{c.title}]({c.path.name})\n" for c in charts]
    if comparison.notes:
        parts += ["## Notes", "", *[f"- {note}" for note in comparison.notes], ""]
    return "\n".join(parts)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1200px;color:#222;
 padding:0 1rem;line-height:1.45}
table{border-collapse:collapse;margin:.5rem 0 1.5rem;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.3rem .6rem;text-align:right;white-space:nowrap}
th{background:#f3f3f3} .t{text-align:left}
.scroll{overflow-x:auto} img{max-width:100%;border:1px solid #eee;margin:.5rem 0 1.5rem}
.meta{color:#555} li{margin:.2rem 0}
"""


def render_html(comparison: cmp.Comparison, charts: Sequence[Chart]) -> str:
    """report.html: self-contained (CSS inline, charts as base64 PNG), readable offline or as an artifact."""
    esc = html.escape
    title = f"Comparison: {comparison.experiment}"
    generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [f"<h1>{esc(title)}</h1>", f"<p class='meta'>{esc(_context(comparison))} Generated {generated}.</p>",
            "<h2>Summary</h2>", _html_table(display_table(comparison), text_columns=len(comparison.group_keys) + 1),
            "<h2>Findings</h2>"]
    for section in comparison.findings:
        body.append(f"<h3>{esc(section.title)}</h3><ul>" +
                    "".join(f"<li>{esc(line)}</li>" for line in section.lines) + "</ul>")
    eff, paired = efficiency_display(comparison), paired_display(comparison)
    if eff is not None:
        eff_strategies = comparison.efficiency["strategy"].nunique()
        body += ["<h2>Accuracy per training-set size</h2>",
                 f"<p>{esc(cmp.METRIC_WORDS[comparison.efficiency_metric].capitalize())} (%), "
                 f"mean ± std (n runs).</p>", _html_table(eff, text_columns=eff.shape[1] - eff_strategies)]
    if paired is not None:
        body += ["<h2>Paired by seed</h2>", "<p>Same seed and training-set size, different strategy: the mean "
                 "difference over seeds ± its std.</p>", _html_table(paired, text_columns=paired.shape[1] - 2)]
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
def print_report(result: cmp.CompareResult, *, console: "Console | None" = None) -> "Console":
    """The table (as two rich tables that fit a terminal), the findings, the notes and where files went.

    Returns the console used (a new stdout console when none is given).
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    comparison = result.comparison
    console.print(f"[bold]Comparison: {escape(comparison.experiment)}[/bold]  "
                  f"[dim]{escape(_context(comparison))}[/dim]")
    for group, title in (("accuracy", "Accuracy"), ("cost", "Cost and convergence")):
        frame = display_table(comparison, group=group)
        table = Table(title=title, title_justify="left", header_style="bold")
        for column in frame.columns:
            text = column in comparison.group_keys or column == "Strategy"
            table.add_column(str(column), justify="left" if text else "right", overflow="fold")
        for row in frame.itertuples(index=False):
            table.add_row(*[str(v) for v in row])
        console.print(table)
    eff = efficiency_display(comparison)
    if eff is not None:
        table = Table(title="Accuracy per training-set size (%)", title_justify="left", header_style="bold")
        for column in eff.columns:
            table.add_column(str(column), justify="right")
        for row in eff.itertuples(index=False):
            table.add_row(*[str(v) for v in row])
        console.print(table)
    for section in comparison.findings:
        console.print(f"[bold]{escape(section.title)}[/bold]", highlight=False)
        for line in section.lines:
            console.print(f"  • {line}", highlight=False, markup=False)
    for note in comparison.notes:
        console.print(f"[dim]Note: {escape(note)}[/dim]", highlight=False)
    console.print(f"Report written to {result.output_dir}/ ({', '.join(p.name for p in result.files)})",
                  highlight=False, markup=False)
    return console


__all__ = ["write_report", "write_charts", "render_markdown", "render_html", "print_report", "display_table",
           "csv_table", "COLUMNS"]
