"""Private memory of `tlexp train` on two datasets whose decoded caches differ 4x: the pixels are memory-mapped.

For each dataset (synthetic JPEGs, N and 4N images, same size) it runs `tlexp train --strategy scratch
--model tinycnn` twice in a fresh process: first with an empty cache directory (decoding, written straight
into the mapped cache file), then again (reading the cache). While the process runs, its `RssAnon` (private,
anonymous memory: what a second process on the node cannot share) is read from /proc/PID/status every 10 ms;
the peak is reported. With `--baseline-src DIR` (a checkout of an older tlexp) the same runs are made with
that code too, for contrast.

    nice .venv/bin/python benchmarks/memory_mmap.py --images 1000 --image-size 128
    nice .venv/bin/python benchmarks/memory_mmap.py --baseline-src /tmp/tlexp-before   # + the old code
    nice .venv/bin/python benchmarks/memory_mmap.py --speed      # epoch time: pixels in memory vs mapped

``--speed`` times training epochs (tlexp's own batching, augmentation and step) on the digits,
once from pixels in private memory and once from the same pixels memory-mapped from a ``.npy`` file as
the decoded cache now is, alternating, and prints the ratio of the medians.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np


def make_jpegs(root: str, n_images: int, *, classes: int = 4, side: int = 160, seed: int = 0) -> None:
    """``n_images`` random-texture JPEGs of ``side`` x ``side`` * 3/4 px in ``classes`` class folders."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n_images):
        folder = os.path.join(root, f"class{i % classes}")
        os.makedirs(folder, exist_ok=True)
        small = rng.integers(0, 256, (side * 3 // 32, side // 8, 3), dtype=np.uint8)  # blocky: realistic JPEG sizes
        img = Image.fromarray(small).resize((side, side * 3 // 4), Image.NEAREST)
        img.save(os.path.join(folder, f"{i:06d}.jpg"), quality=90)


def peak_rss_anon(cmd: list[str], env: dict[str, str]) -> tuple[int, float, int]:
    """Run ``cmd``; return (peak RssAnon in bytes, wall seconds, exit code)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as fh:
                for line in fh:
                    if line.startswith("RssAnon:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
        except OSError:
            pass
        time.sleep(0.01)
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        print(err[-2000:], file=sys.stderr)
    return peak, time.perf_counter() - t0, proc.returncode


def speed(*, model_name: str, epochs: int, image_size: int, work: str) -> None:
    """Median epoch time, pixels in memory vs memory-mapped (copy-on-write, as tlexp reads its cache)."""
    import statistics

    import torch

    from tlexp.data import TrainPreset, load_data
    from tlexp.engine import DeviceSettings, iterate_batches, train_one_epoch
    from tlexp.models import build_model

    data = load_data("digits", image_size=image_size)
    path = os.path.join(work, f"digits{image_size}.npy")
    np.save(path, data.images.numpy())
    sources = {"memory": data.images.clone(), "mmap": torch.from_numpy(np.load(path, mmap_mode="c"))}
    settings = DeviceSettings(device=torch.device("cpu"), channels_last=True)
    index = torch.arange(len(data.labels))
    times: dict[str, list[float]] = {k: [] for k in sources}
    for epoch in range(epochs + 1):  # epoch 0 warms up both
        for name, images in sources.items():
            torch.manual_seed(0)
            model = build_model(model_name, num_classes=10, pretrained=False, head="mlp").to(
                memory_format=torch.channels_last)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
            gen, aug = torch.Generator().manual_seed(epoch), torch.Generator().manual_seed(epoch + 99)
            batches = iterate_batches(images, data.labels, index, batch_size=32, settings=settings,
                                      transform=TrainPreset(), shuffle=True, generator=gen, transform_generator=aug)
            t0 = time.perf_counter()
            train_one_epoch(model, batches, optimizer, settings=settings)
            if epoch:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{model_name}, digits {image_size} px, {len(index)} images, batch 32, {epochs} epochs each, torch threads "
          f"{torch.get_num_threads()}: median epoch memory {med['memory']:.2f} s, mmap {med['mmap']:.2f} s, "
          f"mmap / memory = {med['mmap'] / med['memory']:.3f}  (all: {times})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="images of the small dataset (the big has 4x)")
    parser.add_argument("--image-size", type=int, default=128, help="decoded size (--speed: the digits' size)")
    parser.add_argument("--baseline-src", default=None, help="a directory holding an older tlexp package")
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--speed", action="store_true", help="time epochs from memory vs from the mapping instead")
    parser.add_argument("--model", default="tinycnn", help="--speed: the model to train")
    parser.add_argument("--epochs", type=int, default=3, help="--speed: timed epochs per side")
    args = parser.parse_args()

    work = args.work_dir or tempfile.mkdtemp(prefix="tlexp-mmap-")
    if args.speed:
        speed(model_name=args.model, epochs=args.epochs, image_size=args.image_size, work=work)
        return
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sources = [("mmap (this tree)", repo)] + ([("before", args.baseline_src)] if args.baseline_src else [])
    datasets = {"small": args.images, "big": 4 * args.images}
    for name, n in datasets.items():
        root = os.path.join(work, name)
        if not os.path.isdir(root):
            print(f"writing {n} JPEGs to {root} ...", flush=True)
            make_jpegs(root, n)

    rows = []
    for label, src in sources:
        for name, n in datasets.items():
            cache = os.path.join(work, f"cache-{label.split()[0]}-{name}")
            env = {**os.environ, "PYTHONPATH": src, "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow-{label.split()[0]}.db",
                   "TLEXP_CACHE_DIR": cache, "OMP_NUM_THREADS": "2"}
            cmd = [sys.executable, "-m", "tlexp", "train", "--strategy", "scratch", "--model", "tinycnn",
                   "--data", os.path.join(work, name), "--image-size", str(args.image_size), "--epochs", "1",
                   "--samples-per-class", "20", "--device", "cpu", "--quiet", "--experiment", "mmap-bench"]
            for run in ("first (decoding)", "second (cache)"):
                peak, wall, rc = peak_rss_anon(cmd, env)
                cache_mib = n * 3 * args.image_size ** 2 / 2**20
                rows.append((label, name, n, cache_mib, run, peak / 2**20, wall, rc))
                print(f"{label:18s} {name:5s} {n:6d} images  cache {cache_mib:7.1f} MiB  {run:17s} "
                      f"peak RssAnon {peak / 2**20:7.1f} MiB  {wall:5.1f} s  rc={rc}", flush=True)

    print("\n| code | dataset | images | decoded cache | run | peak RssAnon | wall |")
    print("|---|---|---:|---:|---|---:|---:|")
    for label, name, n, cache_mib, run, peak, wall, rc in rows:
        print(f"| {label} | {name} | {n} | {cache_mib:.0f} MiB | {run} | {peak:.0f} MiB | {wall:.1f} s |")
    for label, _ in sources:
        for run in ("first (decoding)", "second (cache)"):
            small, big = (r[5] for r in rows if r[0] == label and r[4] == run)
            print(f"{label}, {run}: big / small peak RssAnon = {big / small:.3f}")


if __name__ == "__main__":
    main()
