"""Frozen-backbone features, computed once: the ``transfer`` strategy's fast path.

A frozen body (eval mode, no gradients) maps the same input to the same
features every epoch, so the seed notebook's per-epoch backbone pass is pure
waste. Augmentation is the catch: every epoch sees a differently augmented
image. The cache therefore holds ``views`` augmented versions of each training
image (and one clean version of every image for evaluation); each epoch draws
one of the views per image at random. With views=4 and 15 epochs every view is
seen ~4 times instead of 15 fresh augmentations -- the trade-off is logged as
the ``feature_cache_views`` param and measured by ``benchmarks/bench_train.py DATA
--cache-accuracy 1,2,3`` (benchmarks/README.md). Hymenoptera, EfficientNet-Lite0,
15 epochs, mean of seeds 1-3, cache on vs off: best val 94.8% vs 95.2%, final
val 93.7% vs 93.9% (2-core CPU, fp32; on an H200 in bf16: 94.3/94.6, 93.5/92.6);
an epoch takes 0.02 s instead of 14 s there.

The augmentation of image ``i``'s view ``v`` depends only on (seed, v, i), not
on batch composition, so features are filled lazily for exactly the indices a
run needs and reused by later runs of the same process (the cells of a sweep).
A store holds rows only for the images runs asked for (a training split's, not
the whole dataset's), and the process keeps one store: a sweep's transfer cells
of one seed follow each other and share it, and the next seed's store replaces it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .data import TrainPreset
from .engine import DeviceSettings, extract_features, iterate_batches

_STORES: dict[tuple, "FeatureStore"] = {}


def view_params(preset: TrainPreset, indices: torch.Tensor, *, seed: int, view: int) -> dict[str, torch.Tensor]:
    """Augmentation parameters for each image, a pure function of (seed, view, image index)."""
    rows = [preset.sample_params(1, torch.Generator().manual_seed(hash((seed, view, int(i))) & 0x7FFFFFFFFFFF))
            for i in indices.tolist()]
    return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}


class _Rows:
    """Features of some of a dataset's images, one row each, in the order they were first asked for.

    ``row[i]`` is image ``i``'s row, -1 while it has none: the buffer grows with what runs use (a
    training split of 5 images per class costs 5 rows per class), never to the whole dataset.
    """

    def __init__(self, num_images: int) -> None:
        self.row = torch.full((num_images,), -1, dtype=torch.long)
        self.values: torch.Tensor | None = None  # (..., rows, F); "..." is (views,) for augmented features

    def missing(self, index: torch.Tensor) -> torch.Tensor:
        return index[self.row[index] < 0].unique()

    def add(self, index: torch.Tensor, feats: torch.Tensor) -> None:
        """Rows for the images ``index`` (none of which has one yet); ``feats`` is (..., len(index), F)."""
        start = 0 if self.values is None else self.values.shape[-2]
        self.values = feats if self.values is None else torch.cat([self.values, feats], dim=-2)
        self.row[index] = torch.arange(start, start + len(index))

    def get(self, index: torch.Tensor) -> torch.Tensor:
        assert self.values is not None
        return self.values.index_select(-2, self.row[index].to(self.values.device))


@dataclass
class FeatureStore:
    """Lazily filled clean features (rows, F) and augmented features (views, rows, F) of one dataset."""

    num_images: int
    views: int
    seed: int
    clean: _Rows = field(init=False)
    augmented: _Rows = field(init=False)

    def __post_init__(self) -> None:
        self.clean, self.augmented = _Rows(self.num_images), _Rows(self.num_images)

    def get_clean(self, body: Callable, images: torch.Tensor, index: torch.Tensor, *,
                  settings: DeviceSettings, batch_size: int) -> torch.Tensor:
        missing = self.clean.missing(index)
        if len(missing):
            eval_tf = lambda x, g=None: x.float().div_(255.0)  # noqa: E731
            feats = extract_features(body, iterate_batches(images, torch.zeros(len(images), dtype=torch.long), missing,
                                                           batch_size=batch_size, settings=settings,
                                                           transform=eval_tf), settings=settings)
            self.clean.add(missing, feats)
        return self.clean.get(index)

    def get_augmented(self, body: Callable, images: torch.Tensor, index: torch.Tensor, *,
                      settings: DeviceSettings, batch_size: int, preset: TrainPreset) -> torch.Tensor:
        """(views, len(index), F) features of augmented images."""
        missing = self.augmented.missing(index)
        if len(missing):
            per_view = []
            for view in range(self.views):
                chunks = []
                for start in range(0, len(missing), batch_size):
                    idx = missing[start:start + batch_size]
                    x = settings.to_device(images[idx])
                    x = preset.apply(x, view_params(preset, idx, seed=self.seed, view=view))
                    if settings.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    with torch.inference_mode(), settings.autocast():
                        chunks.append(body(x).float())
                per_view.append(torch.cat(chunks))
            self.augmented.add(missing, torch.stack(per_view))
        return self.augmented.get(index)


def feature_store(key: tuple, *, num_images: int, views: int, seed: int) -> FeatureStore:
    """The process-wide store for ``key`` (dataset fingerprint, model, weights, size, precision, seed, views).

    Only the latest key's store is kept: features of another seed or dataset are not used again by a
    sweep (its cells run seed by seed), and each store can hold a whole training split's views.
    """
    if key not in _STORES:
        _STORES.clear()
        _STORES[key] = FeatureStore(num_images=num_images, views=views, seed=seed)
    return _STORES[key]


def clear() -> None:
    _STORES.clear()
