"""Train / val / test splits: a held-out test split always, fixed by the split seed for a whole study.

The rule (param ``split_rule``), by what the data provide:

==================  ===========================================================================
``carved``          no split folders (digits, a flat tree): test (``test_fraction`` of all
                    images) and val (``val_fraction`` of all images) carved, stratified.
``train_only``      only ``train/``: the same, carved from ``train/``.
``test_folder``     ``train/`` + ``test/``: test is ``test/``; val carved from ``train/``.
``val_as_test``     ``train/`` + ``val/``: the provided ``val/`` is held out and reported as test;
                    the val split that picks the epoch is carved from ``train/``.
``folders``         ``train/`` + ``val/`` + ``test/`` (and Flowers102's official splits): as provided.
==================  ===========================================================================

No image is used both to pick the epoch (val) and to report the score (test). Val and test are drawn
with ``split_seed``, never with the run's ``--seed``, so every run of a study is scored on the same test
images; ``--seed`` moves only the ``--samples-per-class`` / ``--train-fraction`` subset of train.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .dataset import DataError, ImageData

SPLIT_RULES = ("carved", "train_only", "test_folder", "val_as_test", "folders")


@dataclass(frozen=True)
class Splits:
    """Index tensors into ``ImageData`` (disjoint by construction) and the rule that made them."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor | None = None
    rule: str = "folders"
    # split -> classes that have no image in it (a class too small to spare one): warned about and logged
    missing: dict[str, list[str]] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        return {"train_size": len(self.train), "val_size": len(self.val),
                "test_size": 0 if self.test is None else len(self.test)}

    def replace_train(self, train: torch.Tensor) -> "Splits":
        return Splits(train=train, val=self.val, test=self.test, rule=self.rule, missing=self.missing)


def make_splits(data: ImageData, *, val_fraction: float, test_fraction: float = 0.2, split_seed: int = 0) -> Splits:
    """Train, val and test by the rule above (``val_fraction`` and ``test_fraction`` are shares of all
    images when both are carved, of ``train/`` when only val is)."""
    origin = np.array(data.origin)
    provided = set(data.origin)
    labels = data.labels

    def idx(split: str) -> torch.Tensor:
        return torch.from_numpy(np.flatnonzero(origin == split))

    if "train" not in provided:
        rule, pool, test = "carved", idx("all"), None
    elif {"val", "test"} <= provided:
        return _checked(Splits(train=idx("train"), val=idx("val"), test=idx("test"), rule="folders"), data)
    elif "val" in provided:
        rule, pool, test = "val_as_test", idx("train"), idx("val")
    elif "test" in provided:
        rule, pool, test = "test_folder", idx("train"), idx("test")
    else:
        rule, pool, test = "train_only", idx("train"), None
    val_share = val_fraction
    if test is None:
        pool, test = carve(pool, labels, fraction=test_fraction, seed=split_seed)
        val_share = val_fraction / (1.0 - test_fraction)  # of what is left: val_fraction of all images
    train, val = carve(pool, labels, fraction=val_share, seed=split_seed + 1)
    return _checked(Splits(train=train, val=val, test=test, rule=rule), data)


def _checked(splits: Splits, data: ImageData) -> Splits:
    """Refuse an empty val or test split; name the classes that have no image in one of them."""
    missing: dict[str, list[str]] = {}
    for name in ("val", "test"):
        index = getattr(splits, name)
        if not len(index):
            smallest = int(torch.bincount(data.labels, minlength=data.num_classes).min())
            raise DataError(f"The {name} split would be empty: every class is too small to spare an image "
                            f"(the smallest has {smallest}); use at least 3 images per class, or provide "
                            f"train/, val/ and test/ folders.")
        counts = torch.bincount(data.labels[index], minlength=data.num_classes)
        absent = [data.classes[c] for c in range(data.num_classes) if counts[c] == 0]
        if absent:
            missing[name] = absent
    return Splits(train=splits.train, val=splits.val, test=splits.test, rule=splits.rule, missing=missing)


def carve(index: torch.Tensor, labels: torch.Tensor, *, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``index`` (into ``labels``) into (kept, carved), stratified by class; see ``stratified_split``."""
    kept, carved = stratified_split(labels[index], fraction=fraction, seed=seed)
    return index[kept], index[carved]


def stratified_split(labels: torch.Tensor, *, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split positions so each class keeps ``fraction`` of its items in the second part: at least one,
    but never the class's last item (a class of one image stays in the first part only)."""
    gen = torch.Generator().manual_seed(seed)
    first, second = [], []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        n_second = min(len(members) - 1, max(1, round(len(members) * fraction)))
        second.append(members[:n_second])
        first.append(members[n_second:])
    if not first:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(first).sort().values, torch.cat(second).sort().values


def subset_train(train: torch.Tensor, labels: torch.Tensor, classes: list[str], *,
                 samples_per_class: int | None, train_fraction: float, seed: int) -> torch.Tensor:
    """Stratified, seeded subset of the train split for low-data experiments."""
    if samples_per_class is None and train_fraction >= 1.0:
        return train
    gen = torch.Generator().manual_seed(seed + 1)
    train_labels = labels[train]
    chosen = []
    counts = torch.bincount(train_labels, minlength=len(classes))
    if samples_per_class is not None and samples_per_class > int(counts.min()):
        smallest = classes[int(counts.argmin())]
        raise DataError(f"--samples-per-class {samples_per_class} is larger than the smallest class "
                        f"({smallest!r} has {int(counts.min())} training images); use at most {int(counts.min())}.")
    for c in range(len(classes)):
        members = train[train_labels == c]
        members = members[torch.randperm(len(members), generator=gen)]
        k = samples_per_class if samples_per_class is not None else max(1, math.ceil(len(members) * train_fraction))
        chosen.append(members[:k])
    return torch.cat(chosen).sort().values


def split_manifest(data: ImageData, splits: Splits) -> "list[dict[str, str | int]]":
    """One row per image used: path, label, class, split (saved with the run)."""
    rows = []
    for split, idx in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
        if idx is None:
            continue
        for i in idx.tolist():
            rows.append({"path": data.paths[i], "label": int(data.labels[i]),
                         "class": data.classes[int(data.labels[i])], "split": split})
    return rows


def small_class_warning(splits: Splits) -> str | None:
    """One sentence naming the classes with no val (or test) image, or None."""
    if not splits.missing:
        return None
    parts = [f"{', '.join(repr(c) for c in classes)} in {split}" for split, classes in splits.missing.items()]
    return (f"warning: no image of {'; '.join(parts)} (too few images to spare one); those classes are "
            f"not measured there and their per-class accuracy is n/a.")
