"""A run's datasets as MLflow dataset inputs, so the runs table's Dataset column and filter show them.

Each split a run used (training, validation, test) is logged as its own dataset input: the name of the
data, a digest of the exact images in that split (the data's fingerprint plus the split's members, so two
runs share a digest only when they saw the same images), where the data came from, and a profile with
the split's class counts. Only metadata is logged, never the images.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Sequence

# MLflow's dataset contexts as its UI labels them.
CONTEXTS = {"train": "training", "val": "validation", "test": "test"}


@dataclass(frozen=True)
class SplitInput:
    """One split of a run's data: which images (indices into the dataset) and how many of each class."""

    split: str  # "train" | "val" | "test"
    indices: Sequence[int]
    class_counts: dict[str, int]


def split_digest(fingerprint: str, split: SplitInput) -> str:
    """A short digest of the data (its fingerprint) and the split's members."""
    members = ",".join(str(int(i)) for i in sorted(split.indices))
    return hashlib.sha256(f"{fingerprint}|{members}".encode()).hexdigest()[:12]


def log_datasets(run_id: str, *, name: str, source: str, fingerprint: str, splits: Sequence[SplitInput]) -> None:
    """Log each split as a dataset input of run ``run_id``.

    ``source`` is a local path (logged as a local source) or a description of a built-in dataset such as
    "sklearn digits" (logged as the code that loads it).
    """
    import mlflow
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import CodeDatasetSource, LocalArtifactDatasetSource

    from .runs import _active
    from .store import retry_locked

    class SplitDataset(MetaDataset):
        """A MetaDataset (metadata only) whose profile is the split's size and class counts."""

        def __init__(self, split: SplitInput) -> None:
            self._profile = {"images": len(split.indices), "classes": len(split.class_counts),
                             "class_counts": dict(split.class_counts)}
            data_source = (LocalArtifactDatasetSource(source) if os.path.isabs(source)
                           else CodeDatasetSource(tags={"source": source}))
            super().__init__(data_source, name=name, digest=split_digest(fingerprint, split))

        @property
        def profile(self) -> dict:
            return self._profile

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(self._profile)}  # MetaDataset leaves it out

    datasets = [SplitDataset(s) for s in splits]
    contexts = [CONTEXTS[s.split] for s in splits]
    with _active(run_id):
        for attempt in range(3):
            try:
                retry_locked(mlflow.log_inputs, datasets=datasets, contexts=contexts,
                             tags_list=[None] * len(datasets))
                return
            except Exception as exc:
                # Runs of one study share their val/test splits (same digest). MLflow looks a dataset up, then
                # inserts it: two runs logging it at once (parallel sweep cells) race, and the loser gets a
                # unique-constraint error. Logging again finds the winner's row and only links it.
                if "unique" not in str(exc).lower() or attempt == 2:
                    raise

