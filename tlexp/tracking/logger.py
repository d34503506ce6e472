"""What ``experiment.fit`` writes through: a typed protocol, and a logger that writes nothing.

``runs.RunLogger`` is the real one (one MLflow run); ``NullLogger`` stands in where a run's
epochs are wanted without a tracking store (the benchmark, tests).
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Protocol


class FitLogger(Protocol):
    """The calls ``experiment.fit`` makes on its logger."""

    def log_metrics(self, metrics: dict[str, float], *, step: int, synchronous: bool = False) -> None:
        """All metrics of one step (epoch; 0 for run-level figures)."""

    def atomic(self) -> ContextManager[Any]:
        """An epoch's metrics and checkpoint as one step: a signal inside waits for the block's end, then stops."""

    def finishing(self) -> ContextManager[Any]:
        """The final evaluation and result logging: a signal inside waits for the block's end, the run
        still ends FINISHED, and only then does the signal stop the program."""

    def keep_checkpoint(self, state: dict[str, Any]) -> None:
        """The last completed epoch's state, saved only if the run does not finish."""

    def log_text(self, text: str, path: str) -> None: ...

    def log_dict(self, data: Any, path: str) -> None: ...

    def log_figure(self, figure: Any, path: str) -> None: ...

    def log_model(self, model: Any, *, input_example: Any, class_names: list[str]) -> None: ...


class NullLogger:
    """A ``FitLogger`` that writes nothing; keeps the latest value of each metric in ``metrics``."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}
        self.checkpoint: dict[str, Any] | None = None

    def log_metrics(self, metrics: dict[str, float], *, step: int, synchronous: bool = False) -> None:
        self.metrics.update(metrics)

    def atomic(self) -> ContextManager[Any]:
        return contextlib.nullcontext()

    def finishing(self) -> ContextManager[Any]:
        return contextlib.nullcontext()

    def keep_checkpoint(self, state: dict[str, Any]) -> None:
        self.checkpoint = state

    def log_text(self, text: str, path: str) -> None:
        pass

    def log_dict(self, data: Any, path: str) -> None:
        pass

    def log_figure(self, figure: Any, path: str) -> None:
        pass

    def log_model(self, model: Any, *, input_example: Any, class_names: list[str]) -> None:
        pass
