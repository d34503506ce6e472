"""An 8-cell digits sweep, `--executor local` against `--executor ray` (2 cells at a time, 1 torch thread
each), and Ray's fixed start-up cost.

Each sweep runs as its own `python -m tlexp sweep` process into its own temporary SQLite store (the decoded
digits cache is shared; the local sweep runs first and decodes it, in well under a second). The start-up
cost is what a fresh process pays before Ray runs its first task: `ray.init()` of a local instance plus
the first trivial task's round trip (a worker process started).

    nice .venv/bin/python benchmarks/ray_sweep.py --image-size 32 --epochs 5 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

STARTUP = """
import time
t0 = time.perf_counter()
import ray
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
t1 = time.perf_counter()
ray.get(ray.remote(lambda: 1).remote())
t2 = time.perf_counter()
print(f"{t1 - t0:.2f} {t2 - t1:.2f}")
ray.shutdown()
"""


def sweep_seconds(executor: str, args: argparse.Namespace, tmp: str, repeat: int) -> float:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/{executor}{repeat}.db",
           "TLEXP_CACHE_DIR": os.path.join(tmp, "cache"), "RAY_AUTH_MODE": "disabled"}
    command = [sys.executable, "-m", "tlexp", "sweep", "--executor", executor, "--strategies", "scratch",
               "--seeds", args.seeds, "--samples-per-class", args.sizes, "--model", "tinycnn", "--data", "digits",
               "--image-size", str(args.image_size), "--epochs", str(args.epochs), "--experiment", "bench",
               "--quiet"]
    if executor == "ray":
        command += ["--cpus-per-cell", "1"]
    t0 = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--sizes", default="50,all")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="pairs, in alternating order (the machine is shared)")
    args = parser.parse_args()
    times: dict[str, list[float]] = {"local": [], "ray": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for executor in ("local", "ray") if repeat % 2 == 0 else ("ray", "local"):
                times[executor].append(sweep_seconds(executor, args, tmp, repeat))
                print(f"{executor}: {times[executor][-1]:.1f} s", flush=True)
    local, on_ray = (sum(times[k]) / len(times[k]) for k in ("local", "ray"))
    print(f"mean local {local:.1f} s, mean ray (2 cells at a time, 1 torch thread each) {on_ray:.1f} s")
    init_s, first_task_s = map(float, subprocess.run(
        [sys.executable, "-c", STARTUP], check=True, capture_output=True, text=True,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"}).stdout.split()[-2:])
    print(f"speed-up local/ray: {local / on_ray:.2f}x")
    print(f"Ray start-up: ray.init {init_s:.1f} s + first task {first_task_s:.1f} s = {init_s + first_task_s:.1f} s")


if __name__ == "__main__":
    main()
