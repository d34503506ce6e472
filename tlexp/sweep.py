"""A whole study -- strategies x seeds x training-set sizes (x learning rates) -- as one parent run with
nested children.

Each child is an ordinary ``tlexp train`` run (same logging contract), so
``tlexp compare`` and the MLflow UI's compare view work on them. The sweep is
resumable: a cell whose settings already have a FINISHED child of the same
sweep is skipped; FAILED, KILLED and missing cells run again.

Work that does not depend on the strategy is done once: cells are ordered
seed -> size -> strategy, the decoded dataset is memoised for the process
(``data.load_data``) and so are the frozen backbone's features
(``features.feature_store``), which every ``transfer`` cell of a seed shares.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .config import ConfigError, TrainConfig, digest


@dataclass(frozen=True)
class SweepSpec:
    base: TrainConfig
    strategies: tuple[str, ...]
    seeds: tuple[int, ...]
    samples_per_class: tuple[int | None, ...]  # None = the whole train split
    # The learning-rate axis (`--lrs`): each strategy is then compared at its own best lr on validation.
    # Empty = the base config's single lr, as a sweep without --lrs.
    lrs: tuple[float, ...] = ()

    def validate(self) -> "SweepSpec":
        if not self.strategies:
            raise ConfigError("--strategies is empty; give one or more of scratch, transfer, finetune.")
        if not self.seeds:
            raise ConfigError("--seeds is empty; give one or more integers, e.g. 0,1,2.")
        if not self.samples_per_class:
            raise ConfigError("--samples-per-class is empty; give sizes such as 5,20,all.")
        for name, values in (("strategies", self.strategies), ("seeds", self.seeds),
                             ("samples-per-class", self.samples_per_class), ("lrs", self.lrs)):
            if len(set(values)) != len(values):
                raise ConfigError(f"--{name} lists a value twice: {','.join(map(str, values))}.")
        for cfg in self.cells():
            cfg.validate()
        return self

    def cells(self) -> list[TrainConfig]:
        """Every cell's config, ordered so strategy-independent work is reused (seed, size, lr, strategy)."""
        out = []
        for seed in self.seeds:
            for n in self.samples_per_class:
                for lr in self.lrs or (self.base.lr,):
                    for strategy in self.strategies:
                        cfg = self.base.replace(strategy=strategy, seed=seed, samples_per_class=n, lr=lr,
                                                run_name=None)
                        out.append(cfg.resolve())
        return out

    def data_id(self) -> str:
        """The data's content fingerprint (``./base``, ``base/`` and /abs/base are one dataset; added images
        make another): what the sweep's ids use instead of the ``--data`` string."""
        from .config import cache_root
        from .data import data_fingerprint

        return data_fingerprint(self.base.data, cache_dir=cache_root(self.base))

    def sweep_id(self, data_id: str | None = None) -> str:
        """Stable id of this study: the base settings (with the data by content) and the grid."""
        axes = {"strategy", "samples_per_class"} | ({"lr"} if self.lrs else set())
        ident = self.base.identity(data_id=data_id or self.data_id(), every_setting=True)
        base = {k: v for k, v in ident.items() if k not in axes}
        grid: dict[str, list] = {"strategies": list(self.strategies), "seeds": list(self.seeds),
                                 "samples_per_class": ["all" if n is None else n for n in self.samples_per_class]}
        if self.lrs:  # absent without --lrs, so a study started before the lr axis keeps its id
            grid["lrs"] = list(self.lrs)
        return digest({"base": base, "grid": grid})

    def grid_params(self) -> dict[str, str]:
        return {"sweep_strategies": ",".join(self.strategies), "sweep_seeds": ",".join(map(str, self.seeds)),
                "sweep_samples_per_class": ",".join("all" if n is None else str(n) for n in self.samples_per_class),
                "sweep_lrs": ",".join(f"{lr:g}" for lr in self.lrs or (self.base.lr,)),
                "sweep_cells": str(len(self.strategies) * len(self.seeds) * len(self.samples_per_class)
                                   * len(self.lrs or (self.base.lr,)))}


def cell_id(cfg: TrainConfig, data_id: str | None = None) -> str:
    """Hash of what defines a cell's result: the config's identity (with the data's fingerprint) and the seed."""
    return digest({**cfg.identity(data_id=data_id), "seed": str(cfg.seed)})


@dataclass
class Cell:
    index: int
    config: TrainConfig
    cell_id: str
    action: str  # "skip" (a FINISHED child exists) | "run" (missing) | "rerun" (only FAILED/KILLED/RUNNING)
    run_id: str | None = None
    status: str = "PENDING"
    seconds: float = 0.0


@dataclass
class SweepResult:
    parent_run_id: str | None
    cells: list[Cell] = field(default_factory=list)

    @property
    def failed(self) -> list[Cell]:
        return [c for c in self.cells if c.status == "FAILED"]


def plan(spec: SweepSpec, *, data_id: str | None = None) -> list[Cell]:
    """The cells and what a run of the sweep would do with each (reads the store, writes nothing)."""
    from . import tracking

    data_id = data_id or spec.data_id()
    existing = tracking.sweep_children(spec.base.experiment, spec.sweep_id(data_id))
    cells = []
    for i, cfg in enumerate(spec.cells(), 1):
        cid = cell_id(cfg, data_id)
        statuses = existing.get(cid, [])
        if any(status == "FINISHED" for status, _ in statuses):
            run_id = next(r for status, r in statuses if status == "FINISHED")
            cells.append(Cell(i, cfg, cid, "skip", run_id=run_id, status="FINISHED"))
        else:
            cells.append(Cell(i, cfg, cid, "rerun" if statuses else "run"))
    return cells


def preflight(spec: SweepSpec, reporter: Any = None) -> None:
    """Fail before any training: every strategy's model and every seed's data subset must be buildable.

    As few cells are prepared as cover every check ``prepare`` makes: each strategy's model once, and
    each seed's split at the largest numbered size (a size fails only by being larger than a class;
    where it fits, every smaller size and 'all' fit too).
    """
    from .experiment import prepare

    numbered = [n for n in spec.samples_per_class if n is not None]
    largest = max(numbered) if numbered else None
    strategies_left, seeds_left = set(spec.strategies), set(spec.seeds)
    for cfg in spec.cells():
        if cfg.samples_per_class == largest and (cfg.strategy in strategies_left or cfg.seed in seeds_left):
            prepare(cfg, reporter=reporter)
            strategies_left.discard(cfg.strategy)
            seeds_left.discard(cfg.seed)


def run_sweep(spec: SweepSpec, *, reporter: Any = None,
              on_cell: Callable[[Cell, int, float | None], None] | None = None) -> SweepResult:
    """Run every cell that has no FINISHED child yet, as nested runs under one parent."""
    from . import tracking
    from .experiment import train

    spec.validate()
    tracking.check_store()
    preflight(spec, reporter=None)
    data_id = spec.data_id()
    sweep_id = spec.sweep_id(data_id)
    cells = plan(spec, data_id=data_id)
    todo = [c for c in cells if c.action != "skip"]
    result = SweepResult(parent_run_id=None, cells=cells)
    with tracking.sweep_run(experiment=spec.base.experiment, sweep_id=sweep_id,
                            params={**spec.base.resolve().to_params(), **spec.grid_params()}) as parent:
        result.parent_run_id = parent.run_id
        done: list[Cell] = []
        for k, cell in enumerate(todo, 1):
            eta = estimate_seconds_left(done, todo[k - 1:])
            if on_cell is not None:
                on_cell(cell, len(cells), eta)
            t0 = time.perf_counter()
            cell.status = "RUNNING"
            try:
                summary = train(cell.config, reporter=reporter, parent_run_id=parent.run_id,
                                extra_tags={tracking.TAG_SWEEP: sweep_id, tracking.TAG_CELL: cell.cell_id})
                cell.run_id, cell.status = summary.run_id, "FINISHED"
            except KeyboardInterrupt as exc:
                # A signal deferred to the very end of a cell leaves its run FINISHED in the store.
                cell.status = "FINISHED" if getattr(exc, "finished", False) else "KILLED"
                raise
            except Exception as exc:  # noqa: BLE001 - one broken cell must not lose the rest of the study
                # User mistakes were caught by preflight(); this is a fault. The child run is FAILED
                # with its traceback as an artifact; the sweep goes on and reports it at the end.
                cell.status = "FAILED"
                if reporter is not None:
                    reporter.stage(f"cell {cell.index} failed: {type(exc).__name__}: {exc}")
            finally:
                cell.seconds = time.perf_counter() - t0
                done.append(cell)
                parent.log_metrics({"cells_finished": sum(c.status == "FINISHED" for c in cells),
                                    "cells_failed": sum(c.status == "FAILED" for c in cells)},
                                   step=k, synchronous=False)
        parent.log_text(_cells_csv(cells), "sweep_cells.csv")
        if result.failed:
            parent.set_tags({tracking.TAG_ERROR: f"{len(result.failed)} of {len(cells)} cells failed"})
    return result


def estimate_seconds_left(done: list[Cell], remaining: list[Cell]) -> float | None:
    """Time left: each remaining cell costs what finished cells of the same strategy, size and lr cost
    (cells differ tenfold between 5 images per class and all of them), else the same strategy's mean,
    else the mean of all finished cells."""
    if not done:
        return None
    mean = lambda cells: sum(c.seconds for c in cells) / len(cells)  # noqa: E731
    total = 0.0
    for cell in remaining:
        cfg = cell.config
        key = (cfg.strategy, cfg.samples_per_class, cfg.lr)
        same = [c for c in done if (c.config.strategy, c.config.samples_per_class, c.config.lr) == key]
        same_strategy = [c for c in done if c.config.strategy == cfg.strategy]
        total += mean(same or same_strategy or done)
    return total


def _cells_csv(cells: list[Cell]) -> str:
    import pandas as pd

    rows = [{"cell": c.index, "strategy": c.config.strategy, "seed": c.config.seed,
             "samples_per_class": "all" if c.config.samples_per_class is None else c.config.samples_per_class,
             "lr": c.config.lr,
             "action": c.action, "status": c.status, "run_id": c.run_id or "", "seconds": round(c.seconds, 2)}
            for c in cells]
    return pd.DataFrame(rows).to_csv(index=False)
