"""The four ways to start training, as data: what is pretrained, what is frozen when, what learns how fast.

- ``scratch``: random init, every parameter trained at ``lr``.
- ``transfer``: pretrained body frozen (gradients off AND BatchNorm statistics
  fixed), new head trained at ``lr``.
- ``finetune``: pretrained body trained at ``lr * backbone_lr_mult``, head at ``lr``.
- ``lpft``: linear probe, then fine-tune (Kumar et al., ICLR 2022): ``transfer`` for the
  first ``lp_epochs`` epochs, then ``finetune`` from the probed head for the rest. A head
  that already fits the features distorts the pretrained body less than a random one.

Only initialisation and what is trained differ: architecture, head, data and
budget are the same for all four.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .models import Classifier


@dataclass(frozen=True)
class Strategy:
    name: str
    pretrained: bool
    freeze_body: bool  # during the first phase (the only one, except for lpft)
    description: str
    probe_first: bool = False  # lpft: the body thaws after lp_epochs epochs

    def switch_epoch(self, lp_epochs: int) -> int | None:
        """The first epoch (1-based) that fine-tunes the whole network after a linear probe; None if none."""
        return lp_epochs + 1 if self.probe_first else None

    def body_frozen_in(self, epoch: int, *, lp_epochs: int) -> bool:
        """Whether the body is frozen (weights and BatchNorm statistics) during ``epoch`` (1-based)."""
        switch = self.switch_epoch(lp_epochs)
        return self.freeze_body if switch is None else epoch < switch


STRATEGIES: dict[str, Strategy] = {
    "scratch": Strategy("scratch", pretrained=False, freeze_body=False,
                        description="random init, all parameters trained"),
    "transfer": Strategy("transfer", pretrained=True, freeze_body=True,
                         description="pretrained body frozen (BatchNorm included), new head trained"),
    "finetune": Strategy("finetune", pretrained=True, freeze_body=False,
                         description="pretrained body trained at lr x backbone_lr_mult, head at lr"),
    "lpft": Strategy("lpft", pretrained=True, freeze_body=True, probe_first=True,
                     description="head trained on the frozen body for lp_epochs, then the whole net as finetune"),
}


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"Unknown strategy {name!r}; expected one of: {', '.join(STRATEGIES)}.") from None


def apply_strategy(model: Classifier, strategy: Strategy, *, lr: float,
                   backbone_lr_mult: float) -> list[dict[str, Any]]:
    """Freeze what the strategy freezes in its first epoch and return the optimizer's parameter groups."""
    if strategy.freeze_body:
        model.freeze_body()
        return [{"params": list(model.head.parameters()), "lr": lr, "name": "head"}]
    if strategy.pretrained:
        return finetune_groups(model, lr=lr, backbone_lr_mult=backbone_lr_mult)
    return [{"params": [p for p in model.parameters()], "lr": lr, "name": "all"}]


def thaw(model: Classifier, *, lr: float, backbone_lr_mult: float) -> list[dict[str, Any]]:
    """lpft's switch: unfreeze the body (BatchNorm statistics move again) and return finetune's groups."""
    model.unfreeze_body()
    return finetune_groups(model, lr=lr, backbone_lr_mult=backbone_lr_mult)


def finetune_groups(model: Classifier, *, lr: float, backbone_lr_mult: float) -> list[dict[str, Any]]:
    return [
        {"params": list(model.body.parameters()), "lr": lr * backbone_lr_mult, "name": "body"},
        {"params": list(model.head.parameters()), "lr": lr, "name": "head"},
    ]
