"""The decoded dataset every other module reads, and the error bad data raises.

Kept apart from ``data`` (loading and caching), ``folders`` (reading a tree) and
``splits`` so that each of those can name these types without importing the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class DataError(ValueError):
    """The data cannot be used as given. The message is one sentence for the user."""


@dataclass
class ImageData:
    """A decoded dataset: every image once, as uint8, with its label and where it came from."""

    name: str
    images: torch.Tensor  # (N, 3, S, S) uint8; over the memory-mapped decoded cache when there is one
    labels: torch.Tensor  # (N,) int64
    classes: list[str]
    paths: list[str]  # one per image, relative to the dataset root (or a synthetic id)
    origin: list[str]  # "train" | "val" | "test" for trees that ship their own splits, else "all"
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    # What the data are, not where they are: relative paths, sizes and a hash of each file's head and
    # tail. `./base`, `base/` and /abs/base give the same value; an added or changed image a new one.
    fingerprint: str = ""
    cache_key: str = ""  # fingerprint + modification times + decode settings: names the decoded cache
    root: str = ""  # the resolved absolute path ("sklearn digits" for the built-in digits)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])
