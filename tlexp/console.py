"""What a person sees while training: a rich progress bar per epoch and one line per epoch."""

from __future__ import annotations

import time
from typing import Any, Callable, Protocol


class Reporter(Protocol):
    def stage(self, message: str) -> None: ...
    def epoch_start(self, epoch: int, epochs: int, batches: int) -> None: ...
    def batch(self, stats: Callable[[], tuple[float, float]]) -> None: ...
    def epoch_end(self, epoch: int, epochs: int, metrics: dict[str, float]) -> None: ...
    def done(self) -> None: ...


class SilentReporter:
    """For tests and library use: records nothing, prints nothing."""

    def stage(self, message: str) -> None:
        pass

    def epoch_start(self, epoch: int, epochs: int, batches: int) -> None:
        pass

    def batch(self, stats: Callable[[], tuple[float, float]]) -> None:
        pass

    def epoch_end(self, epoch: int, epochs: int, metrics: dict[str, float]) -> None:
        pass

    def done(self) -> None:
        pass


class RichReporter:
    """A transient progress bar per epoch (live loss/acc, ETA) and a summary line per epoch, like the seed."""

    def __init__(self, console: Any | None = None, *, prefix: str = "") -> None:
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.prefix = prefix
        self._progress: Any = None
        self._task: Any = None
        self._last_refresh = 0.0

    def stage(self, message: str) -> None:
        self.console.print(f"[dim]{self.prefix}{message}[/dim]")

    def epoch_start(self, epoch: int, epochs: int, batches: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn(f"{self.prefix}epoch {epoch}/{epochs}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), console=self.console, transient=True)
        self._progress.start()
        self._task = self._progress.add_task("train", total=batches, stats="")

    def batch(self, stats: Callable[[], tuple[float, float]]) -> None:
        if self._progress is None:
            return
        now = time.monotonic()
        fields = {}
        # Reading the running loss synchronises with the GPU, so do it a few times a second only.
        if now - self._last_refresh > 0.25:
            loss, acc = stats()
            fields["stats"] = f"loss {loss:.4f} acc {acc:.2%}"
            self._last_refresh = now
        self._progress.update(self._task, advance=1, **fields)

    def epoch_end(self, epoch: int, epochs: int, metrics: dict[str, float]) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        self.console.print(
            f"{self.prefix}epoch {epoch}/{epochs}  train loss {metrics['train_loss']:.3f} "
            f"acc {metrics['train_acc']:.1%} | val loss {metrics['val_loss']:.3f} acc {metrics['val_acc']:.1%}"
            f" | {metrics['epoch_time_s']:.1f}s", soft_wrap=True)

    def done(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
