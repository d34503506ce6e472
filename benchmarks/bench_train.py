"""``python benchmarks/bench_train.py DATA``: tlexp against the seed notebook's loop, side by side, in one process.

Everything below runs on the same data, model, image size, batch size and machine:

1. **seed loop** -- the notebook's ``train_epoch``/``validate_epoch`` re-implemented faithfully
   (``seed_loop.py``, beside this file);
2. **tlexp** -- the same epochs through tlexp's own code: ``experiment.prepare`` and ``experiment.fit``,
   the loop every ``tlexp train`` runs (decoded once, augmented on batched tensors, frozen-backbone
   features cached for transfer), with tracking off;
3. **model only** -- the same model, memory format and precision stepping on synthetic tensors already
   on the device (the speed limit), plus the other formats and precisions for comparison;
4. **tracking** -- the same tlexp scratch epochs through ``experiment.train`` logging to a temporary
   SQLite MLflow store, against the run without tracking (3.); and the cost per epoch of tracking on
   the cheapest epochs there are (transfer from cached features), where it weighs most.

Times are wall-clock (``time.perf_counter``); on CUDA every timed span ends with a synchronising call.
The seed loop runs first, before tlexp changes any process-wide setting (cuDNN autotuning).
``--cache-accuracy`` instead trains ``transfer`` with and without the feature cache over several seeds
and compares validation accuracy.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import platform
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Optional

import typer

from seed_loop import LR, SEED, run_seed_loop, steady  # beside this script (sys.path[0])


# ------------------------------------------------------------ measurement helpers
class PeakRSS:
    """Peak growth of this process's resident memory inside a ``with`` block (Linux; sampled every ms)."""

    def __init__(self) -> None:
        self.peak_bytes: int | None = None
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int | None:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None

    def _sample(self, base: int) -> None:
        top = base
        while not self._stop.wait(0.001):
            top = max(top, self._rss() or top)
        top = max(top, self._rss() or top)
        self.peak_bytes = top - base

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        base = self._rss()
        self._thread = threading.Thread(target=self._sample, args=(base,), daemon=True) if base else None
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()


class LoopClock:
    """A reporter that timestamps the epoch loop: from the first epoch's start to the end of the last."""

    def __init__(self) -> None:
        self.first_start: float | None = None
        self.end: float | None = None

    def stage(self, message: str) -> None:
        pass

    def epoch_start(self, epoch: int, epochs: int, batches: int) -> None:
        if self.first_start is None:
            self.first_start = time.perf_counter()

    def batch(self, stats: Callable[[], tuple[float, float]]) -> None:
        pass

    def epoch_end(self, epoch: int, epochs: int, metrics: dict[str, float]) -> None:
        pass

    def done(self) -> None:
        self.end = time.perf_counter()

    @property
    def loop_s(self) -> float:
        return (self.end or math.nan) - (self.first_start or math.nan)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------ tlexp
def _config(strategy: str, *, data_path: str, model: str, device: str, epochs: int, batch_size: int,
            image_size: int, cache_dir: str, seed: int = SEED, **changes: Any) -> Any:
    from tlexp.config import TrainConfig

    return TrainConfig(strategy=strategy, model=model, data=data_path, epochs=epochs, batch_size=batch_size,
                       seed=seed, image_size=image_size, device=device, cache_dir=cache_dir, lr=LR,
                       experiment="tlexp-bench", **changes)


@dataclass
class TlexpRun:
    history: list[dict[str, float]]
    fit_s: float  # the whole of experiment.fit: feature cache, epochs, final evaluation, result tables
    loop_s: float  # first epoch start -> last epoch end, logging and checkpoint copies included
    feature_cache_s: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def epoch_s(self) -> list[float]:
        return [h["epoch_time_s"] for h in self.history]

    @property
    def steady_train_samples_per_s(self) -> float:
        return steady([h["train_samples_per_s"] for h in self.history])


def run_tlexp(config: Any, data: Any, *, cold: bool = True) -> TlexpRun:
    """One run through tlexp's real loop with tracking off (``cold``: compute the frozen-backbone features)."""
    from tlexp import experiment, features, tracking

    if cold:
        features.clear()
    prep = experiment.prepare(config, data=data)
    logger, clock = tracking.NullLogger(), LoopClock()
    t0 = time.perf_counter()
    result = experiment.fit(prep, logger, clock, None)
    _sync(prep.settings.device)
    fit_s = time.perf_counter() - t0
    return TlexpRun(history=result["history"], fit_s=fit_s, loop_s=clock.loop_s,
                    feature_cache_s=float(logger.metrics.get("feature_cache_time_s", 0.0)), metrics=result["metrics"])


def run_tlexp_tracked(config: Any, data: Any, store_dir: str, *, cold: bool = True) -> tuple[float, float]:
    """The same run through ``experiment.train`` into a SQLite store in ``store_dir``: (epoch-loop s, call s)."""
    import mlflow

    from tlexp import experiment, features

    if cold:
        features.clear()
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    uri = f"sqlite:///{os.path.join(store_dir, 'mlflow.db')}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    try:
        clock = LoopClock()
        t0 = time.perf_counter()
        experiment.train(config, reporter=clock, data=data)
        return clock.loop_s, time.perf_counter() - t0
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous
        mlflow.set_tracking_uri(previous)


def run_model_only(config: Any, data: Any, *, steps: int, channels_last: bool | None = None,
                   precision: str | None = None) -> float:
    """Training samples/s of the bare model on synthetic batches already on the device (tlexp's step code)."""
    import torch

    from tlexp import experiment
    from tlexp.engine import train_one_epoch

    changes = {k: v for k, v in (("channels_last", channels_last), ("precision", precision)) if v is not None}
    prep = experiment.prepare(config.replace(**changes), data=data)
    settings = prep.settings
    gen = torch.Generator().manual_seed(0)
    b, s = config.batch_size, data.image_size
    x = settings.to_device(torch.rand(b, 3, s, s, generator=gen))
    y = settings.to_device(torch.randint(0, data.num_classes, (b,), generator=gen))
    optimizer = torch.optim.Adam(prep.param_groups, lr=LR)
    model = torch.compile(prep.model) if config.compile else prep.model
    train_one_epoch(model, iter([(x, y)] * 2), optimizer, settings=settings)  # warm-up
    _sync(settings.device)
    result = train_one_epoch(model, iter([(x, y)] * steps), optimizer, settings=settings)
    return float(result["samples_per_s"])


# ------------------------------------------------------------------ the benchmark
def _machine(device: Any) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                            "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    with contextlib.suppress(OSError):
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "")
    return info


def run_benchmark(*, data_path: str, model: str, device_name: str, epochs: int, seed_epochs: int,
                  scratch_epochs: int, batch_size: int, image_size: int, finetune: bool,
                  model_only_steps: int | None, work_dir: str,
                  say: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure everything (caches and tracking stores go in ``work_dir``); returns the figures (``--json``)."""
    import torch

    from tlexp import data as data_mod
    from tlexp.data import load_data, make_splits
    from tlexp.engine import resolve_device, resolve_precision

    device = resolve_device(device_name)
    root = os.path.abspath(os.path.expanduser(data_path))
    tmp = work_dir
    cache_dir = os.path.join(tmp, "cache")
    fig: dict[str, Any] = {"device": str(device), "model": model, "image_size": image_size,
                           "batch_size": batch_size, "epochs": epochs, "seed_epochs": seed_epochs,
                           "scratch_epochs": scratch_epochs, "data": root, "machine": _machine(device)}
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[resolve_precision("auto", device)]
    fig["tlexp_precision"] = precision
    started = time.perf_counter()

    # 1. Decode once (a cold cache directory), then read back the on-disk cache.
    say(f"decoding {root} at {image_size}px once ...")
    data_mod.clear_memory()
    with PeakRSS() as decode_mem:
        t0 = time.perf_counter()
        data = load_data(root, image_size=image_size, cache_dir=cache_dir, num_workers=2)
        decode_s = time.perf_counter() - t0
    raw_bytes = data.images.numel() * data.images.element_size()
    data_mod.clear_memory()
    with PeakRSS() as read_mem:
        t0 = time.perf_counter()
        data = load_data(root, image_size=image_size, cache_dir=cache_dir, num_workers=2)
        read_s = time.perf_counter() - t0
    splits = make_splits(data, val_fraction=0.2, split_seed=SEED)
    fig.update(train_size=len(splits.train), val_size=len(splits.val), decode_s=decode_s, cache_read_s=read_s,
               raw_pixel_bytes=raw_bytes, decode_peak_bytes=decode_mem.peak_bytes, cache_read_peak_bytes=read_mem.peak_bytes)
    if decode_mem.peak_bytes is not None and read_mem.peak_bytes is not None:
        # The cache itself: what a run holds once the decoded images exist (every run after the first).
        fig["cache_bytes_ratio"] = read_mem.peak_bytes / raw_bytes
        # The first decode on top: the decoder's full-size images in flight (PIL, exactly as the seed decodes).
        fig["decode_peak_bytes_ratio"] = decode_mem.peak_bytes / raw_bytes

    cfg = lambda strategy, n, **kw: _config(strategy, data_path=root, model=model, device=device_name,  # noqa: E731
                                            epochs=n, batch_size=batch_size, image_size=image_size,
                                            cache_dir=cache_dir, **kw)

    # 2. The seed loop.
    say(f"seed loop: transfer, {seed_epochs} epochs ...")
    seed_tr = run_seed_loop("transfer", root=root, data=data, splits=splits, model_name=model,
                            batch_size=batch_size, epochs=seed_epochs, device=device)
    say(f"seed loop: scratch, {scratch_epochs} epochs ...")
    seed_sc = run_seed_loop("scratch", root=root, data=data, splits=splits, model_name=model,
                            batch_size=batch_size, epochs=scratch_epochs, device=device)

    # 3. tlexp: the same epochs through its own loop.
    say(f"tlexp: transfer, {epochs} epochs (feature cache on) ...")
    tl_tr = run_tlexp(cfg("transfer", epochs, feature_cache="on"), data)
    say(f"tlexp: scratch, {scratch_epochs} epochs ...")
    tl_sc = run_tlexp(cfg("scratch", scratch_epochs), data)
    tl_ft = None
    if finetune:
        say(f"tlexp: finetune, {scratch_epochs} epochs ...")
        tl_ft = run_tlexp(cfg("finetune", scratch_epochs), data)

    # 4. Model only: the speed limit, in tlexp's settings and the alternatives.
    # One epoch's worth of steps in tlexp's settings (more on a GPU, where a step is short); fewer for the others.
    steps = model_only_steps or max(math.ceil(len(splits.train) / batch_size), 50 if device.type == "cuda" else 0)
    other_steps = steps if device.type == "cuda" else max(3, steps // 2)
    say(f"model only: {steps} steps in tlexp's settings, {other_steps} per other variant ...")
    variants = [("fp32", True), ("fp32", False), ("bf16", True)] + ([("bf16", False)] if device.type == "cuda" else [])
    tlexp_variant = (precision, cfg("scratch", 1).channels_last and device.type != "mps")
    name = lambda prec, cl: f"{prec}, {'channels_last' if cl else 'contiguous'}"  # noqa: E731
    fig["model_only_tlexp_variant"] = tlexp_key = name(*tlexp_variant)
    model_only = {tlexp_key: run_model_only(cfg("scratch", 1), data, steps=steps)}
    for prec, cl in variants:
        if (prec, cl) != tlexp_variant:
            model_only[name(prec, cl)] = run_model_only(cfg("scratch", 1), data, steps=other_steps,
                                                        channels_last=cl, precision=prec)
    model_only_ft = (run_model_only(cfg("finetune", 1), data, steps=steps) if finetune else None)

    # 5. Tracking on vs off.
    say("tracking: scratch epochs logged to a temporary SQLite store ...")
    tracked_loop_s, tracked_call_s = run_tlexp_tracked(cfg("scratch", scratch_epochs), data, tmp)
    say("tracking: cached transfer epochs, on and off ...")
    run_tlexp(cfg("transfer", 1, feature_cache="on"), data)  # features back in memory for the runs below
    cheap_on, cheap_off = [], []
    for _ in range(3):  # features computed above and kept: only the epochs differ; min of 3 each
        cheap_off.append(run_tlexp(cfg("transfer", epochs, feature_cache="on"), data, cold=False).loop_s)
        cheap_on.append(run_tlexp_tracked(cfg("transfer", epochs, feature_cache="on"), data, tmp, cold=False)[0])

    # Figures.
    seed_first, seed_steady = seed_tr.epoch_s[0], steady(seed_tr.epoch_s)
    seed_run_s = seed_first + (epochs - 1) * seed_steady  # measured when seed_epochs >= epochs
    tlexp_run_s = decode_s + tl_tr.fit_s
    fig.update({
        "seed_transfer_epoch_s": seed_tr.epoch_s, "seed_scratch_epoch_s": seed_sc.epoch_s,
        "seed_transfer_run_s": seed_run_s, "seed_transfer_run_extrapolated": len(seed_tr.epoch_s) < epochs,
        "tlexp_transfer_epoch_s": tl_tr.epoch_s, "tlexp_transfer_feature_cache_s": tl_tr.feature_cache_s,
        "tlexp_transfer_fit_s": tl_tr.fit_s, "tlexp_transfer_run_s": tlexp_run_s,
        "transfer_epoch_ratio": steady(tl_tr.epoch_s) / seed_steady,
        "transfer_run_ratio": tlexp_run_s / seed_run_s,
        "transfer_val_acc": {"seed": seed_tr.val_acc, "tlexp": [h["val_acc"] for h in tl_tr.history]},
        "seed_scratch_train_samples_per_s": seed_sc.steady_train_samples_per_s,
        "tlexp_scratch_train_samples_per_s": tl_sc.steady_train_samples_per_s,
        "tlexp_scratch_epoch_s": tl_sc.epoch_s,
        "model_only_samples_per_s": model_only,
        "scratch_vs_model_only": tl_sc.steady_train_samples_per_s / model_only[tlexp_key],
        "scratch_vs_seed": tl_sc.steady_train_samples_per_s / seed_sc.steady_train_samples_per_s,
        "scratch_epoch_vs_seed": steady(seed_sc.epoch_s) / steady(tl_sc.epoch_s),
        "tracked_train_call_s": tracked_call_s,
    })
    # Tracking: its cost per epoch is resolvable only where epochs are short (cached transfer, min of 3 runs
    # each way); a scratch epoch is so long that one run with and one without differ by the machine's noise.
    cost_s = max(0.0, (min(cheap_on) - min(cheap_off)) / epochs)
    fig.update({
        "tracking_cached_transfer_loop_s": {"on": min(cheap_on), "off": min(cheap_off)},
        "tracking_cost_per_epoch_ms": 1000 * cost_s,
        "tracking_overhead_ratio": 1 + cost_s / steady(tl_sc.epoch_s),
        "tracking_overhead_ratio_cached_transfer": min(cheap_on) / min(cheap_off),
        "tracking_scratch_loop_s": {"on": tracked_loop_s, "off": tl_sc.loop_s},
        "tracking_overhead_ratio_scratch_wall": tracked_loop_s / tl_sc.loop_s,
    })
    if tl_ft is not None and model_only_ft:
        fig.update({
            "tlexp_finetune_train_samples_per_s": tl_ft.steady_train_samples_per_s,
            "model_only_finetune_samples_per_s": model_only_ft,
            "finetune_vs_model_only": tl_ft.steady_train_samples_per_s / model_only_ft,
            "finetune_vs_seed": tl_ft.steady_train_samples_per_s / seed_sc.steady_train_samples_per_s,
        })
    if device.type == "cuda":
        fast, slow = model_only["bf16, channels_last"], model_only["fp32, contiguous"]
        fig["bf16_channels_last_vs_fp32_speedup"] = fast / slow
    fig["machine"]["load_average_1min_after"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    fig["bench_wall_s"] = time.perf_counter() - started
    return fig


TARGETS = (  # (key, comparison, target, what)
    ("transfer_epoch_ratio", "<=", 0.05, "transfer: tlexp / seed time per epoch (after the first)"),
    ("transfer_run_ratio", "<=", 0.25, "transfer: tlexp / seed time for the whole run"),
    ("scratch_vs_model_only", ">=", 0.90, "scratch: tlexp train samples/s / model only"),
    ("scratch_vs_seed", ">=", 1.2, "scratch: tlexp train samples/s / seed loop"),
    ("finetune_vs_model_only", ">=", 0.90, "finetune: tlexp train samples/s / model only"),
    ("finetune_vs_seed", ">=", 1.2, "finetune: tlexp train samples/s / seed loop (scratch)"),
    ("tracking_overhead_ratio", "<=", 1.01, "tracking: scratch epoch with / without MLflow (its cost per epoch)"),
    ("cache_bytes_ratio", "<=", 1.1, "uint8 cache: peak memory loading it / raw pixel bytes"),
)


def format_report(fig: dict[str, Any]) -> str:
    """The settings, a table of figures and the ratios against their targets."""
    m = fig["machine"]
    where = m.get("gpu") or m.get("cpu", "")
    lines = [
        f"tlexp benchmark -- {fig['model']} at {fig['image_size']}px, batch {fig['batch_size']}, "
        f"data {fig['data']} (train {fig['train_size']} / val {fig['val_size']})",
        f"device {fig['device']} ({where}); torch {m['torch']}, {m['cpu_threads']} CPU threads of {m['cpu_count']}; "
        f"load average {m.get('load_average_1min')} before, {m.get('load_average_1min_after')} after; "
        f"tlexp precision {fig['tlexp_precision']}",
        f"epochs: transfer {fig['epochs']} (tlexp, measured); seed loop transfer {fig['seed_epochs']}, "
        f"scratch {fig['scratch_epochs']} (both sides). " + (
            f"The seed's {fig['epochs']}-epoch transfer run is EXTRAPOLATED as its first epoch + "
            f"{fig['epochs'] - 1} x its mean later epoch." if fig["seed_transfer_run_extrapolated"] else ""),
        "",
        f"{'':34}{'seed loop':>12}{'tlexp':>12}{'model only':>12}",
    ]
    row = lambda name, a, b, c="": lines.append(f"{name:34}{a:>12}{b:>12}{c:>12}")  # noqa: E731
    s = lambda v: f"{v:.2f}s"  # noqa: E731
    row("transfer: first epoch", s(fig["seed_transfer_epoch_s"][0]), s(fig["tlexp_transfer_epoch_s"][0]))
    row("transfer: later epoch (mean)", s(steady(fig["seed_transfer_epoch_s"])), s(steady(fig["tlexp_transfer_epoch_s"])))
    row("transfer: feature cache (once)", "-", s(fig["tlexp_transfer_feature_cache_s"]))
    row(f"transfer: whole {fig['epochs']}-epoch run", s(fig["seed_transfer_run_s"]), s(fig["tlexp_transfer_run_s"]))
    row("scratch: epoch (after the first)", s(steady(fig["seed_scratch_epoch_s"])), s(steady(fig["tlexp_scratch_epoch_s"])))
    row("scratch: train samples/s", f"{fig['seed_scratch_train_samples_per_s']:.1f}",
        f"{fig['tlexp_scratch_train_samples_per_s']:.1f}",
        f"{fig['model_only_samples_per_s'][fig['model_only_tlexp_variant']]:.1f}")
    if "tlexp_finetune_train_samples_per_s" in fig:
        row("finetune: train samples/s", "-", f"{fig['tlexp_finetune_train_samples_per_s']:.1f}",
            f"{fig['model_only_finetune_samples_per_s']:.1f}")
    lines.append("")
    lines.append("model only, train samples/s: " + ", ".join(
        f"{k}{' (tlexp)' if k == fig['model_only_tlexp_variant'] else ''} {v:.1f}"
        for k, v in fig["model_only_samples_per_s"].items()))
    lines.append(f"decode once: {fig['decode_s']:.2f}s cold, {fig['cache_read_s']:.2f}s from the on-disk cache; "
                 f"raw pixels {fig['raw_pixel_bytes'] / 2**20:.1f} MiB, peak memory growth "
                 f"{(fig['cache_read_peak_bytes'] or 0) / 2**20:.1f} MiB loading the cache, "
                 f"{(fig['decode_peak_bytes'] or 0) / 2**20:.1f} MiB decoding the originals the first time "
                 f"(full-size images in flight)")
    on, off = fig["tracking_cached_transfer_loop_s"]["on"], fig["tracking_cached_transfer_loop_s"]["off"]
    lines.append(f"tracking: {fig['tracking_cost_per_epoch_ms']:.1f} ms per epoch (cached transfer, {fig['epochs']} "
                 f"epochs: {on:.2f}s with MLflow, {off:.2f}s without, x{fig['tracking_overhead_ratio_cached_transfer']:.2f}"
                 f"); scratch, one run each: {fig['tracking_scratch_loop_s']['on']:.1f}s with, "
                 f"{fig['tracking_scratch_loop_s']['off']:.1f}s without (x{fig['tracking_overhead_ratio_scratch_wall']:.2f},"
                 f" machine noise); a whole tracked `train` call {fig['tracked_train_call_s']:.1f}s")
    if "bf16_channels_last_vs_fp32_speedup" in fig:
        lines.append(f"bf16 + channels_last vs fp32 contiguous (model only): "
                     f"{fig['bf16_channels_last_vs_fp32_speedup']:.2f}x")
    lines += ["", f"{'ratio':25}{'value':>8}  {'target':9}{'':8}what"]
    for key, op, target, what in TARGETS:
        if key not in fig:
            continue
        value = fig[key]
        ok = value <= target if op == "<=" else value >= target
        lines.append(f"{key:25}{value:>8.3f}  {op + ' ' + str(target):9}{'met' if ok else 'MISSED':8}{what}")
    lines.append(f"\nbenchmark wall time {fig['bench_wall_s']:.0f}s")
    return "\n".join(lines)


# --------------------------------------------------------------- cache accuracy
def cache_accuracy(*, data_path: str, model: str, device_name: str, epochs: int, seeds: list[int],
                   batch_size: int, image_size: int, work_dir: str,
                   say: Callable[[str], None] = print) -> dict[str, Any]:
    """Transfer with and without the feature cache, per seed: best and final validation accuracy."""
    from tlexp.data import load_data

    root = os.path.abspath(os.path.expanduser(data_path))
    cache_dir = os.path.join(work_dir, "cache")
    data = load_data(root, image_size=image_size, cache_dir=cache_dir)
    rows = []
    for seed in seeds:
        for mode in ("on", "off"):
            say(f"transfer seed {seed}, feature cache {mode}, {epochs} epochs ...")
            config = _config("transfer", data_path=root, model=model, device=device_name, epochs=epochs,
                             batch_size=batch_size, image_size=image_size, cache_dir=cache_dir,
                             seed=seed, feature_cache=mode)
            run = run_tlexp(config, data)
            rows.append({"seed": seed, "feature_cache": mode, "best_val_acc": run.metrics["best_val_acc"],
                         "final_val_acc": run.metrics["final_val_acc"], "fit_s": run.fit_s})
    summary = {}
    for mode in ("on", "off"):
        mine = [r for r in rows if r["feature_cache"] == mode]
        summary[mode] = {k: statistics.fmean(r[k] for r in mine) for k in ("best_val_acc", "final_val_acc", "fit_s")}
    return {"data": root, "model": model, "epochs": epochs, "seeds": seeds, "runs": rows, "mean": summary,
            "best_val_acc_gap_points": 100 * (summary["on"]["best_val_acc"] - summary["off"]["best_val_acc"]),
            "final_val_acc_gap_points": 100 * (summary["on"]["final_val_acc"] - summary["off"]["final_val_acc"])}


def format_accuracy(res: dict[str, Any]) -> str:
    lines = [f"feature cache on vs off: transfer, {res['model']}, {res['epochs']} epochs, seeds {res['seeds']}, "
             f"data {res['data']}", f"{'seed':>6}{'cache':>7}{'best val':>10}{'final val':>11}{'time':>9}"]
    for r in res["runs"]:
        lines.append(f"{r['seed']:>6}{r['feature_cache']:>7}{r['best_val_acc']:>10.1%}{r['final_val_acc']:>11.1%}"
                     f"{r['fit_s']:>8.1f}s")
    for mode in ("on", "off"):
        m = res["mean"][mode]
        lines.append(f"{'mean':>6}{mode:>7}{m['best_val_acc']:>10.1%}{m['final_val_acc']:>11.1%}{m['fit_s']:>8.1f}s")
    lines.append(f"gap (cache on - off): best val {res['best_val_acc_gap_points']:+.1f} points, "
                 f"final val {res['final_val_acc_gap_points']:+.1f} points (target: within 2)")
    return "\n".join(lines)


# ------------------------------------------------------------------ command line
def main(
    data: Annotated[str, typer.Argument(help="ImageFolder tree to measure on, e.g. ../shared/datasets/hymenoptera "
                                             "(train 244 / val 153 images).")],
    model: Annotated[str, typer.Option(help="Model name, as for `tlexp train`.")] = "efficientnet_lite0",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps.")] = "auto",
    epochs: Annotated[int, typer.Option(help="Transfer epochs (the notebook's 15).")] = 15,
    seed_epochs: Annotated[int, typer.Option(help="Seed-loop transfer epochs actually run (>= 2; "
                                                  "the rest of its run is extrapolated).")] = 2,
    scratch_epochs: Annotated[int, typer.Option(help="Scratch (and finetune) epochs on both sides (>= 2).")] = 2,
    batch_size: Annotated[int, typer.Option(help="Training batch size (the notebook's 32).")] = 32,
    image_size: Annotated[int, typer.Option(help="Pixels per side (the notebook's 224).")] = 224,
    finetune: Annotated[bool, typer.Option(help="Also measure finetune against model only.")] = False,
    model_only_steps: Annotated[Optional[int], typer.Option(help="Steps per model-only variant.")] = None,
    json_path: Annotated[Optional[str], typer.Option("--json", help="Write the figures to this JSON file.")] = None,
    cache_accuracy_seeds: Annotated[Optional[str], typer.Option(
        "--cache-accuracy", help="Instead: transfer with and without the feature cache for these seeds "
                                 "(comma-separated, e.g. 1,2,3), comparing validation accuracy.")] = None,
) -> None:
    """Benchmark tlexp against the seed notebook's loop, in one process, on one machine."""
    say = lambda msg: typer.secho(msg, err=True, dim=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="tlexp-bench-") as work_dir:
        out = _measure(data=data, model=model, device=device, epochs=epochs, seed_epochs=seed_epochs,
                       scratch_epochs=scratch_epochs, batch_size=batch_size, image_size=image_size, finetune=finetune,
                       model_only_steps=model_only_steps, cache_accuracy_seeds=cache_accuracy_seeds,
                       work_dir=work_dir, say=say)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(out, fh, indent=2, default=str)
        say(f"figures written to {json_path}")


def _measure(*, data: str, model: str, device: str, epochs: int, seed_epochs: int, scratch_epochs: int,
             batch_size: int, image_size: int, finetune: bool, model_only_steps: int | None,
             cache_accuracy_seeds: str | None, work_dir: str, say: Callable[[str], None]) -> dict[str, Any]:
    if cache_accuracy_seeds:
        seeds = [int(s) for s in cache_accuracy_seeds.split(",") if s.strip()]
        res = cache_accuracy(data_path=data, model=model, device_name=device, epochs=epochs, seeds=seeds,
                             batch_size=batch_size, image_size=image_size, work_dir=work_dir, say=say)
        typer.echo(format_accuracy(res))
        return res
    if seed_epochs < 2 or scratch_epochs < 2:
        raise typer.BadParameter("--seed-epochs and --scratch-epochs must be at least 2 "
                                 "(the first epoch includes one-off warm-up).")
    fig = run_benchmark(data_path=data, model=model, device_name=device, epochs=epochs, seed_epochs=seed_epochs,
                        scratch_epochs=scratch_epochs, batch_size=batch_size, image_size=image_size,
                        finetune=finetune, model_only_steps=model_only_steps, work_dir=work_dir, say=say)
    typer.echo(format_report(fig))
    return fig


def run() -> None:
    typer.run(main)


if __name__ == "__main__":
    run()
