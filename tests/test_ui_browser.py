"""The MLflow UI in a real headless browser (Debian's chromium driven by Playwright): after a tiny study, a
person sees the strategy runs with their dataset, a validation-accuracy chart, and the comparison's findings.

Skipped only where Chromium or Playwright is absent, and never in CI (CI=true): there it fails instead.
"""

import os
import re
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from helpers import make_image_tree, tiny_weights

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))
import ui_tour  # noqa: E402  (docs/ui_tour.py: the same tour regenerates the README's screenshots)

SCREENSHOTS = ROOT / "tests" / ".artifacts" / "ui"


def _browser_or_skip() -> None:
    missing = []
    if ui_tour.chromium_path() is None:
        missing.append("Chromium (apt-get install chromium; .ci/run installs it)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("Playwright for Python (pip install -e '.[dev]')")
    if missing:
        reason = "browser test needs " + " and ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(reason + "; in CI it must run")
        pytest.skip(reason)


def _plain(markdown: str) -> str:
    """Markdown as the page shows it: without its markup characters, whitespace collapsed."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", markdown)
    return " ".join(re.sub(r"[#*_`>|]", " ", text).split())


@pytest.mark.slow
def test_a_person_sees_the_runs_their_dataset_a_chart_and_the_findings(tracking_uri, tmp_path):
    _browser_or_skip()
    data = make_image_tree(tmp_path / "pets", {"train": {"cat": 10, "dog": 10}, "val": {"cat": 5, "dog": 5}})
    weights = tiny_weights(tmp_path / "w.pt")
    with ui_tour.serve_ui(tracking_uri, cwd=tmp_path) as base:  # the server starts while the study trains
        ui_tour.make_study(tmp_path, data=str(data), weights=str(weights), epochs=2)
        client = MlflowClient()
        experiment = client.get_experiment_by_name("tl-vs-scratch")
        runs = client.search_runs([experiment.experiment_id])
        training = [r for r in runs if r.data.tags.get("tlexp.kind") == "train"]
        (comparison,) = [r for r in runs if r.data.tags.get("tlexp.kind") == "comparison"]
        names = sorted(r.info.run_name for r in training)
        assert len(names) == 4
        seen = ui_tour.tour(base, experiment_id=experiment.experiment_id,
                            comparison_run_id=comparison.info.run_id, run_names=names, out_dir=SCREENSHOTS)
    print(f"screenshots: {SCREENSHOTS}")

    # The runs table: every strategy run, grouped by strategy, with its dataset (name and digest).
    for name in names:
        assert name in seen.runs_table
    assert "Group: scratch" in seen.runs_table and "Group: transfer" in seen.runs_table
    digest = training[0].inputs.dataset_inputs[0].dataset.digest
    assert f"pets ({digest})" in seen.runs_table and "Training" in seen.runs_table
    # The chart view: a validation-accuracy chart.
    assert "val_acc" in seen.charts
    # The comparison run's page shows its findings as the run's description (tlexp compare sets it).
    note = comparison.data.tags.get("mlflow.note.content", "")
    assert note.strip(), "the comparison run has no description (mlflow.note.content)"
    lines = note.splitlines()
    findings = [line[2:] for line in lines[lines.index("## Findings"):] if line.startswith("- ")]
    assert findings, note
    shown = _plain(seen.comparison)
    assert "Findings" in shown and _plain(lines[0]) in shown  # the title and the (unfolded) findings
    assert [line for line in findings if _plain(line) not in shown] == [], shown
    assert all(path.stat().st_size > 10_000 for path in seen.screenshots)
