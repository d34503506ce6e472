"""The three ways to start training, as data: what is pretrained, what is frozen, what learns how fast.

- ``scratch``: random init, every parameter trained at ``lr``.
- ``transfer``: pretrained body frozen (gradients off AND BatchNorm statistics
  fixed), new head trained at ``lr``.
- ``finetune``: pretrained body trained at ``lr * backbone_lr_mult``, head at ``lr``.

Only initialisation and what is trained differ: architecture, head, data and
budget are the same for all three.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .models import Classifier


@dataclass(frozen=True)
class Strategy:
    name: str
    pretrained: bool
    freeze_body: bool
    description: str


STRATEGIES: dict[str, Strategy] = {
    "scratch": Strategy("scratch", pretrained=False, freeze_body=False,
                        description="random init, all parameters trained"),
    "transfer": Strategy("transfer", pretrained=True, freeze_body=True,
                         description="pretrained body frozen (BatchNorm included), new head trained"),
    "finetune": Strategy("finetune", pretrained=True, freeze_body=False,
                         description="pretrained body trained at lr x backbone_lr_mult, head at lr"),
}


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"Unknown strategy {name!r}; expected one of: {', '.join(STRATEGIES)}.") from None


def apply_strategy(model: Classifier, strategy: Strategy, *, lr: float,
                   backbone_lr_mult: float) -> list[dict[str, Any]]:
    """Freeze what the strategy freezes and return the optimizer's parameter groups."""
    if strategy.freeze_body:
        model.freeze_body()
        return [{"params": list(model.head.parameters()), "lr": lr, "name": "head"}]
    if strategy.pretrained:
        return [
            {"params": list(model.body.parameters()), "lr": lr * backbone_lr_mult, "name": "body"},
            {"params": list(model.head.parameters()), "lr": lr, "name": "head"},
        ]
    return [{"params": [p for p in model.parameters()], "lr": lr, "name": "all"}]

