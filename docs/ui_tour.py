"""What a person sees in the MLflow UI after a small tlexp study, seen through a real (headless) browser.

Used twice: ``tests/test_ui_browser.py`` drives it to check the UI, and ``python docs/ui_tour.py``
regenerates the README's screenshots (``docs/img/runs.png``, ``docs/img/comparison.png``).

It needs Debian's ``chromium`` package (``apt-get install chromium``) and Playwright for Python (the dev
extra). Playwright's own browser download (``playwright install``) is never used: the system browser is.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1400, "height": 900}
WAIT_MS = 60_000  # the first page load compiles MLflow's large JS bundle: slow on a busy 2-core machine


def chromium_path() -> str | None:
    """The system Chromium, if installed."""
    return CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_ui(tracking_uri: str, *, cwd: str | os.PathLike[str], timeout_s: float = 90.0) -> Iterator[str]:
    """``mlflow server`` (what ``mlflow ui`` runs) on 127.0.0.1 over ``tracking_uri``; yields its address and
    stops it on exit. One worker: the UI needs no more, and it starts in half the time of four."""
    port = _free_port()
    log = open(Path(cwd) / "mlflow-server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--workers", "1", "--host", "127.0.0.1",
                               "--port", str(port), "--backend-store-uri", tracking_uri],
                              cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start; see {log.name}") from None
                time.sleep(0.5)
        yield base
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@dataclass
class Seen:
    """What the tour saw: page texts and the screenshots it saved."""

    runs_table: str = ""
    charts: list[str] = field(default_factory=list)
    comparison: str = ""
    screenshots: list[Path] = field(default_factory=list)


def tour(base: str, *, experiment_id: str, comparison_run_id: str, run_names: list[str], out_dir: Path,
         chart_metric: str = "val_acc") -> Seen:
    """Open the runs table (grouped by strategy), its chart view filtered to ``chart_metric``, and the comparison
    run's page, as a newcomer would from tlexp's printed link; save a screenshot of each into ``out_dir``.

    Every step waits for what it shows (a run name, a chart title, the description) and raises
    playwright's TimeoutError when it does not appear.
    """
    from playwright.sync_api import sync_playwright

    out_dir.mkdir(parents=True, exist_ok=True)
    seen = Seen()
    runs_url = f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(WAIT_MS)
            page.goto(runs_url)
            for name in run_names:
                page.get_by_role("link", name=name, exact=True).wait_for()
            _close_assistant(page)
            page.get_by_role("button", name="Group by").click()
            page.get_by_text("strategy", exact=True).first.click()
            page.keyboard.press("Escape")
            page.get_by_text(re.compile(r"^Group: ")).first.wait_for()
            seen.runs_table = page.inner_text("main") if page.locator("main").count() else page.inner_text("body")
            seen.screenshots.append(_shot(page, out_dir / "runs-table.png"))

            page.locator("label").filter(has=page.locator("input[value='CHART']")).click()
            page.get_by_placeholder("Search metric charts").fill(chart_metric)
            chart = page.get_by_text(chart_metric, exact=True).first
            chart.wait_for()
            page.wait_for_timeout(1500)  # the chart's lines are drawn after its title
            seen.charts = [t.strip() for t in page.get_by_text(re.compile(chart_metric)).all_inner_texts()]
            seen.screenshots.append(_shot(page, out_dir / "runs.png"))

            page.goto(f"{base}/#/experiments/{experiment_id}/runs/{comparison_run_id}?workflowType=machine_learning")
            page.get_by_text("Description", exact=True).first.wait_for()
            _close_assistant(page)
            more = page.get_by_text("Show more", exact=True)
            if more.count():  # a long description starts folded
                more.first.click()
            findings = page.get_by_role("heading", name="Findings")
            findings.wait_for()
            findings.scroll_into_view_if_needed()
            page.wait_for_timeout(500)
            seen.comparison = page.inner_text("body")
            seen.screenshots.append(_shot(page, out_dir / "comparison.png"))
        finally:
            browser.close()
    return seen


def _close_assistant(page) -> None:
    """MLflow 3.17 opens its 'Assistant' side panel on a first visit; it hides half the page."""
    close = page.get_by_role("button", name="Close", exact=True)
    with contextlib.suppress(Exception):
        close.first.click(timeout=3000)


def _shot(page, path: Path) -> Path:
    page.screenshot(path=str(path))
    return path


def make_study(workdir: Path, *, data: str, weights: str, epochs: int = 2, image_size: int = 12) -> None:
    """2 strategies x 2 seeds of tinycnn and one ``tlexp compare``, into ``workdir/mlflow.db``."""
    from tlexp.cli import app

    common = ["--data", data, "--weights", weights, "--model", "tinycnn", "--image-size", str(image_size),
              "--epochs", str(epochs), "--quiet"]
    commands = [["train", "--strategy", "scratch,transfer", "--seed", seed, *common] for seed in ("0", "1")]
    commands.append(["compare", "--format", "md", "--output", str(workdir / "report")])
    for args in commands:
        code = app(args, standalone_mode=False)
        if code:
            raise RuntimeError(f"tlexp {' '.join(args)} exited with {code}")


def main() -> None:
    """Regenerate docs/img/runs.png and docs/img/comparison.png from a small digits study."""
    import tempfile

    import mlflow
    from mlflow.tracking import MlflowClient

    img_dir = Path(__file__).resolve().parent / "img"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.chdir(work)
        uri = f"sqlite:///{work / 'mlflow.db'}"
        os.environ["MLFLOW_TRACKING_URI"] = uri
        mlflow.set_tracking_uri(uri)
        import torch

        from tlexp.models import TinyCNN

        torch.save(TinyCNN().state_dict(), work / "weights.pt")  # stands in for pretrained weights
        with serve_ui(uri, cwd=work) as base:  # starts while the study trains
            make_study(work, data="digits", weights="weights.pt", epochs=4, image_size=16)
            client = MlflowClient()
            exp = client.get_experiment_by_name("tl-vs-scratch")
            runs = client.search_runs([exp.experiment_id])
            comparison = next(r for r in runs if r.data.tags.get("tlexp.kind") == "comparison")
            names = [r.info.run_name for r in runs if r.data.tags.get("tlexp.kind") == "train"]
            tour(base, experiment_id=exp.experiment_id, comparison_run_id=comparison.info.run_id,
                        run_names=names, out_dir=work / "shots")
        img_dir.mkdir(exist_ok=True)
        for name in ("runs.png", "comparison.png"):
            _save_small(work / "shots" / name, img_dir / name)
            print(img_dir / name, (img_dir / name).stat().st_size // 1024, "KB")


def _save_small(src: Path, dst: Path) -> None:
    """A README-sized PNG (< 300 KB): a 128-colour palette keeps UI screenshots sharp and small."""
    from PIL import Image

    Image.open(src).convert("RGB").quantize(colors=128).save(dst, optimize=True)


if __name__ == "__main__":
    main()
