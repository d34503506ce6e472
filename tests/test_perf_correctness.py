"""The fast paths compute what the plain ones would: caches, batched augmentation, frozen features.

CPU, tiny data, seconds. Nothing here is timed: speed is measured by ``benchmarks/bench_train.py``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from helpers import assert_matches_v2, tiny_weights
from tlexp import data as data_mod
from tlexp import experiment, tracking
from tlexp.config import TrainConfig
from tlexp.console import SilentReporter
from tlexp.data import TrainPreset, decode_image, load_data
from tlexp.engine import DeviceSettings, iterate_batches
from tlexp.features import FeatureStore, view_params
from tlexp.models import build_model

CPU = DeviceSettings(device=torch.device("cpu"))


def _ppm_tree(root, *, seed: int = 0) -> None:
    """Two classes of 3 PPM files each: raw pixels, so a changed picture keeps the file's byte size."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / cls / f"{i}.ppm")


# ------------------------------------------------------------------ decoded-image cache
def test_decoded_cache_is_read_back_without_decoding(tmp_path, monkeypatch):
    root = tmp_path / "pets"
    _ppm_tree(root)
    first = load_data(str(root), image_size=8, cache_dir=str(tmp_path / "c"))
    data_mod.clear_memory()  # as a new process would

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although nothing changed")

    monkeypatch.setattr(data_mod, "decode_image", no_decoding)
    again = load_data(str(root), image_size=8, cache_dir=str(tmp_path / "c"))
    assert torch.equal(again.images, first.images) and again.paths == first.paths


def test_decoded_cache_redecodes_a_changed_file(tmp_path):
    from PIL import Image

    root = tmp_path / "pets"
    _ppm_tree(root)
    cache = str(tmp_path / "c")
    first = load_data(str(root), image_size=8, cache_dir=cache)
    target = root / "cat" / "1.ppm"
    size_before = target.stat().st_size
    Image.fromarray(np.full((8, 8, 3), 7, dtype=np.uint8)).save(target)  # same size, new pixels
    stamp = target.stat().st_mtime + 10
    os.utime(target, (stamp, stamp))
    assert target.stat().st_size == size_before  # only the modification time tells the change
    data_mod.clear_memory()  # as a new process would: the on-disk cache is all there is

    second = load_data(str(root), image_size=8, cache_dir=cache)
    i = second.paths.index("cat/1.ppm")
    assert second.fingerprint != first.fingerprint
    assert torch.equal(second.images[i], torch.from_numpy(np.array(decode_image(str(target), 8))))
    assert not torch.equal(second.images[i], first.images[i])
    others = [j for j in range(len(second.paths)) if j != i]
    assert torch.equal(second.images[others], first.images[others])


# ------------------------------------------------------------------ batched augmentation
@pytest.mark.parametrize("height, width, channels_last", [(24, 24, False), (20, 31, True), (64, 64, True)])
def test_train_preset_matches_torchvision_v2_per_sample(height, width, channels_last):
    gen = torch.Generator().manual_seed(height + width)
    batch = torch.randint(0, 256, (8, 3, height, width), dtype=torch.uint8, generator=gen)
    preset = TrainPreset()
    params = preset.sample_params(len(batch), gen)
    assert params["flip"].any() and not params["flip"].all()  # both branches are exercised
    inputs = batch.contiguous(memory_format=torch.channels_last) if channels_last else batch
    out = preset.apply(inputs, params)
    assert out.shape == batch.shape and out.dtype == torch.float32
    assert_matches_v2(out, batch, params)


def _recorded_draws(monkeypatch, config: TrainConfig) -> list[dict[str, torch.Tensor]]:
    draws: list[dict[str, torch.Tensor]] = []

    class Recording(TrainPreset):
        def sample_params(self, n, generator):
            params = super().sample_params(n, generator)
            draws.append(params)
            return params

    monkeypatch.setattr(experiment, "TrainPreset", Recording)
    prep = experiment.prepare(config)
    experiment.fit(prep, tracking.NullLogger(), SilentReporter(), None)
    return draws


def test_augmentation_differs_every_epoch_and_repeats_for_a_seed(monkeypatch):
    # One batch per epoch, so draw k is epoch k's augmentation of the whole training split.
    config = TrainConfig(strategy="scratch", model="tinycnn", data="digits", image_size=16, samples_per_class=2,
                         epochs=3, batch_size=64, eval_batch_size=512, head="linear", seed=3)
    draws = _recorded_draws(monkeypatch, config)
    assert len(draws) == 3
    for a, b in ((0, 1), (1, 2), (0, 2)):
        assert not torch.equal(draws[a]["angle"], draws[b]["angle"])
        assert not torch.equal(draws[a]["hue"], draws[b]["hue"])
    again = _recorded_draws(monkeypatch, config)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(draws, again) for k in x)
    other = _recorded_draws(monkeypatch, config.replace(seed=4))
    assert not torch.equal(other[0]["angle"], draws[0]["angle"])


def test_every_image_of_a_batch_gets_its_own_augmentation():
    batch = torch.full((6, 3, 16, 16), 128, dtype=torch.uint8)
    batch[:, :, :, :8] = 30  # identical images, not symmetric, so flips and rotations show
    out = TrainPreset()(batch, torch.Generator().manual_seed(0))
    assert len({tuple(img.flatten()[:64].tolist()) for img in out}) == len(out)


# ------------------------------------------------------------------ frozen-backbone features
def _frozen_tinycnn(tmp_path) -> torch.nn.Module:
    model = build_model("tinycnn", num_classes=3, pretrained=True, head="linear",
                        weights=str(tiny_weights(tmp_path / "w.pt")))
    model.freeze_body()
    return model


def test_cached_features_equal_the_backbone_on_the_same_augmented_input(tmp_path):
    model = _frozen_tinycnn(tmp_path)
    images = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    store, preset = FeatureStore(num_images=10, views=3, seed=7), TrainPreset()
    index = torch.tensor([7, 2, 5])
    cached = store.get_augmented(model.features, images, index, settings=CPU, batch_size=2, preset=preset)
    assert cached.shape == (3, 3, model.num_features)
    with torch.inference_mode():
        for view in range(3):
            augmented = preset.apply(images[index], view_params(preset, index, seed=7, view=view))
            assert torch.allclose(cached[view], model.features(augmented), atol=1e-5)
        assert torch.allclose(store.get_clean(model.features, images, index, settings=CPU, batch_size=4),
                              model.features(images[index].float() / 255), atol=1e-5)
    assert not torch.allclose(cached[0], cached[1])  # the views are different augmentations
    # Filled lazily, in other batches: an image's view does not depend on what it was batched with.
    later = store.get_augmented(model.features, images, torch.tensor([0, 5]), settings=CPU, batch_size=1,
                                preset=preset)
    assert torch.equal(later[:, 1], cached[:, 2])


def test_a_feature_store_holds_rows_only_for_the_images_runs_asked_for(tmp_path):
    model = _frozen_tinycnn(tmp_path)
    images = torch.randint(0, 256, (100, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    store, preset = FeatureStore(num_images=100, views=2, seed=0), TrainPreset()
    small = store.get_augmented(model.features, images, torch.tensor([3, 50, 7]), settings=CPU, batch_size=4,
                                preset=preset)
    store.get_clean(model.features, images, torch.tensor([10, 11]), settings=CPU, batch_size=4)
    # A training split of 3 images costs 3 rows per view, not one per image of the dataset.
    assert store.augmented.values.shape == (2, 3, model.num_features)
    assert store.clean.values.shape == (2, model.num_features)
    larger = store.get_augmented(model.features, images, torch.tensor([7, 99, 3, 50]), settings=CPU, batch_size=4,
                                 preset=preset)  # a larger subset of the same split (the next size of a sweep)
    assert store.augmented.values.shape == (2, 4, model.num_features)
    assert torch.equal(larger[:, [2, 3, 0]], small)


def test_only_the_latest_feature_store_is_kept():
    from tlexp import features

    features.clear()
    first = features.feature_store(("data", "seed 0"), num_images=4, views=1, seed=0)
    assert features.feature_store(("data", "seed 0"), num_images=4, views=1, seed=0) is first
    features.feature_store(("data", "seed 1"), num_images=4, views=1, seed=1)
    assert features.feature_store(("data", "seed 0"), num_images=4, views=1, seed=0) is not first  # it was dropped
    features.clear()


@pytest.mark.parametrize("feature_cache", ["on", "off"])
def test_transfer_leaves_the_frozen_backbone_bit_identical(tmp_path, feature_cache):
    config = TrainConfig(strategy="transfer", model="tinycnn", weights=str(tiny_weights(tmp_path / "w.pt")),
                         data="digits", image_size=16, samples_per_class=3, epochs=1, batch_size=8,
                         eval_batch_size=512, head="linear", feature_cache=feature_cache)
    prep = experiment.prepare(config)
    body = {k: v.clone() for k, v in prep.model.body.state_dict().items()}
    head = {k: v.clone() for k, v in prep.model.head.state_dict().items()}
    assert any("running_mean" in k for k in body)  # BatchNorm statistics are part of what is checked
    experiment.fit(prep, tracking.NullLogger(), SilentReporter(), None)
    after = prep.model.body.state_dict()
    assert all(torch.equal(after[k], v) for k, v in body.items())
    assert not all(torch.equal(prep.model.head.state_dict()[k], v) for k, v in head.items())  # it did train


def test_batches_stay_where_the_images_are_and_keep_labels_aligned():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2).contiguous()
    labels = torch.arange(10) * 10
    seen = [(x, y) for x, y in iterate_batches(images, labels, torch.tensor([9, 3, 4, 1]), batch_size=3,
                                               settings=CPU, shuffle=True,
                                               generator=torch.Generator().manual_seed(0))]
    for x, y in seen:
        assert torch.equal(x[:, 0, 0, 0].long() * 10, y)
    assert sorted(torch.cat([y for _, y in seen]).tolist()) == [10, 30, 40, 90]


# ------------------------------------------------------------------ the benchmark's seed loop
@pytest.mark.parametrize("layout", [{"train": {"a": 4, "b": 3}, "val": {"a": 2, "b": 2}}, {"": {"a": 6, "b": 5}}])
def test_benchmark_seed_loop_reads_exactly_tlexps_splits(tmp_path, layout, monkeypatch):
    from helpers import make_image_tree

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                             "benchmarks"))
    from seed_loop import _seed_loaders
    from tlexp.data import make_splits

    root = make_image_tree(tmp_path / "imgs", layout)
    data = load_data(str(root), image_size=8, cache_dir=str(tmp_path / "c"))
    splits = make_splits(data, val_fraction=0.3, split_seed=0)
    train, val = _seed_loaders(str(root), data, splits, image_size=8, batch_size=4, mean=(0.5,) * 3,
                               std=(0.5,) * 3, num_workers=0, pin_memory=False)
    for loader, index in ((train, splits.train), (val, splits.val)):
        subset = loader.dataset
        seen = [os.path.relpath(subset.dataset.samples[i][0], root) for i in subset.indices]
        assert sorted(seen) == sorted(data.paths[i] for i in index.tolist())
        assert [subset.dataset.samples[i][1] for i in subset.indices] == [
            int(data.labels[data.paths.index(p)]) for p in seen]
