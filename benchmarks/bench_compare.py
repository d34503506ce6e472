"""Time `tlexp compare` on a store of many runs (default 200 runs x 30 epochs), without training.

    .venv/bin/python benchmarks/bench_compare.py                 # 200 runs x 30 epochs, sweep-shaped
    .venv/bin/python benchmarks/bench_compare.py --shape flat    # one group: 3 strategies x many seeds
    .venv/bin/python benchmarks/bench_compare.py --runs 500 --store /tmp/big   # keep/reuse a store

The store is written directly with MlflowClient.log_batch (tests/fake_store.py). The headline
figure is the end-to-end wall time of a fresh Python process that runs ``run_compare`` (imports,
reading, aggregation, charts, report files, and logging the comparison run), i.e. what a user of
``tlexp compare`` waits for. The in-process breakdown follows, including how long the naive
one-request-per-run-per-metric history fetch would take on the same store, for contrast.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

EXPERIMENT = "bench-compare"
SIZES = (5, 10, 25, 50, 100)  # samples per class in the sweep-shaped store
STRATEGIES = ("transfer", "finetune", "scratch")


def build_store(folder: Path, *, runs: int, epochs: int, shape: str) -> str:
    """Write ``runs`` fake runs of ``epochs`` epochs into a new SQLite store in ``folder``."""
    from mlflow import MlflowClient

    from fake_store import log_fake_run, log_sweep_parent, new_store

    uri = new_store(folder)
    client = MlflowClient(tracking_uri=uri)
    eid = client.create_experiment(EXPERIMENT, artifact_location=str(folder / "artifacts"))
    rng = random.Random(0)
    parent = log_sweep_parent(client, eid, experiment_tag=EXPERIMENT) if shape == "sweep" else None
    for i in range(runs):
        strategy = STRATEGIES[i % 3]
        size = SIZES[(i // 3) % len(SIZES)] if shape == "sweep" else None
        top = {"transfer": 0.9, "finetune": 0.93, "scratch": 0.5 + 0.004 * (size or 100)}[strategy]
        speed = {"transfer": 0.5, "finetune": 0.3, "scratch": 0.1}[strategy]
        val = [min(1.0, top * (1 - (1 - speed) ** (e + 1)) + rng.gauss(0, 0.01)) for e in range(epochs)]
        log_fake_run(client, eid, strategy=strategy, seed=i // 15, val_acc=val, samples_per_class=size,
                     epoch_time_s=[1.0 + rng.random() for _ in range(epochs)], test_acc=top - 0.01,
                     parent_run_id=parent, experiment_tag=EXPERIMENT)
    return uri


def end_to_end(uri: str, out: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of a fresh process running run_compare, as `tlexp compare` would.

    CPU seconds (user + system) are reported too because wall time on a shared machine
    depends on what else runs; the process is single-threaded apart from I/O.
    """
    code = ("import io, rich.console as rc; from tlexp.compare import run_compare; "
            f"run_compare({EXPERIMENT!r}, tracking_uri={uri!r}, output={str(out)!r}, "
            "console=rc.Console(file=io.StringIO()))")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def breakdown(uri: str, out: Path) -> list[tuple[str, float]]:
    """Seconds per phase, in-process (imports already paid)."""
    from mlflow import MlflowClient

    from tlexp import compare, report
    from tlexp.compare.history import history_from_client
    from tlexp.compare.types import FORMATS
    from tlexp.tracking.comparison import log_comparison_run

    timings = []

    def timed(name, fn):
        start = time.perf_counter()
        value = fn()
        timings.append((name, time.perf_counter() - start))
        return value

    runs = timed("load_runs (search)", lambda: compare.load_runs(EXPERIMENT, tracking_uri=uri))
    history = timed("load_history (bulk SQL)", lambda: compare.load_history(EXPERIMENT, tracking_uri=uri, runs=runs))
    client = MlflowClient(tracking_uri=uri)
    ids, keys = list(runs["run_id"]), list(compare.PER_EPOCH_METRICS)
    timed(f"  for contrast: {len(ids) * len(keys)} get_metric_history calls, 8 threads",
          lambda: history_from_client(client, ids, keys))
    timed(f"  for contrast: {len(ids) * len(keys)} get_metric_history calls, sequential",
          lambda: [client.get_metric_history(r, k) for r in ids for k in keys])
    comparison = timed("build_comparison", lambda: compare.build_comparison(EXPERIMENT, runs, history))
    out.mkdir(parents=True, exist_ok=True)
    files = timed("write_report (charts, md, csv, html)",
                  lambda: report.write_report(comparison, out, formats=FORMATS))
    timings.append(("  files written", float(len(files))))
    timed("log_comparison_run", lambda: log_comparison_run(
        client, experiment=EXPERIMENT, files=files, description=report.render_description(comparison),
        params=report.run_summary(comparison)))
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--shape", choices=("sweep", "flat"), default="sweep")
    parser.add_argument("--store", type=Path, help="folder to keep (and reuse) the store in")
    parser.add_argument("--repeat", type=int, default=3, help="end-to-end repetitions")
    args = parser.parse_args()

    folder = args.store or Path(tempfile.mkdtemp(prefix="tlexp-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / "mlflow.db"
    if db.exists():
        uri = f"sqlite:///{db}"
        print(f"reusing {uri}")
    else:
        start = time.perf_counter()
        uri = build_store(folder, runs=args.runs, epochs=args.epochs, shape=args.shape)
        print(f"built {uri}: {args.runs} runs x {args.epochs} epochs ({args.shape}) "
              f"in {time.perf_counter() - start:.1f} s")
    try:
        load = os.getloadavg()[0]
        for attempt in range(1, args.repeat + 1):
            wall, cpu = end_to_end(uri, folder / "report-e2e")
            print(f"end to end (fresh process, run_compare) #{attempt}: {wall:.2f} s wall, {cpu:.2f} s CPU "
                  f"(load average before: {load:.1f} on {os.cpu_count()} CPUs)")
            load = os.getloadavg()[0]
        print("\nbreakdown (in-process, seconds):")
        for name, value in breakdown(uri, folder / "report"):
            print(f"  {name:<58} {value:8.2f}")
    finally:
        if args.store is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
