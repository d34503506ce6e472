import pytest
import torch

from helpers import assert_matches_v2, make_image_tree
from tlexp.data import (DataError, EvalPreset, TrainPreset, load_data, make_splits, small_class_warning,
                        split_manifest, stratified_split, subset_train)


def test_digits_are_decoded_once_as_uint8_rgb():
    data = load_data("digits", image_size=16)
    assert data.images.shape == (1797, 3, 16, 16) and data.images.dtype == torch.uint8
    assert data.num_classes == 10 and len(data.labels) == 1797
    assert torch.equal(data.images[:, 0], data.images[:, 1])  # grey replicated to 3 channels
    assert load_data("digits", image_size=16) is data  # memoised: the second call decodes nothing


def test_stratified_split_is_disjoint_seeded_and_keeps_class_shares():
    labels = torch.arange(10).repeat_interleave(20)
    a_train, a_val = stratified_split(labels, fraction=0.2, seed=1)
    b_train, b_val = stratified_split(labels, fraction=0.2, seed=1)
    c_train, _ = stratified_split(labels, fraction=0.2, seed=2)
    assert torch.equal(a_val, b_val) and not torch.equal(a_train, c_train)
    assert set(a_train.tolist()).isdisjoint(a_val.tolist())
    assert len(a_train) + len(a_val) == 200
    assert torch.bincount(labels[a_val]).tolist() == [4] * 10


def test_subset_per_class_and_fraction():
    labels = torch.arange(3).repeat_interleave(10)
    train = torch.arange(30)
    sub = subset_train(train, labels, ["a", "b", "c"], samples_per_class=4, train_fraction=1.0, seed=0)
    assert torch.bincount(labels[sub]).tolist() == [4, 4, 4]
    frac = subset_train(train, labels, ["a", "b", "c"], samples_per_class=None, train_fraction=0.5, seed=0)
    assert torch.bincount(labels[frac]).tolist() == [5, 5, 5]


def test_image_folder_with_split_folders_never_shares_a_file(tmp_path):
    root = make_image_tree(tmp_path / "pets", {"train": {"cat": 4, "dog": 5}, "val": {"cat": 2, "dog": 2},
                                               "test": {"cat": 1, "dog": 2}})
    data = load_data(str(root), image_size=10, cache_dir=str(tmp_path / "c"))
    splits = make_splits(data, val_fraction=0.2, split_seed=0)
    assert splits.sizes() == {"train_size": 9, "val_size": 4, "test_size": 3}
    rows = split_manifest(data, splits)
    by_split = {s: {r["path"] for r in rows if r["split"] == s} for s in ("train", "val", "test")}
    assert not (by_split["train"] & by_split["val"]) and not (by_split["train"] & by_split["test"])
    assert all(p.startswith("val/") for p in by_split["val"])
    assert data.classes == ["cat", "dog"]


def test_image_folder_without_splits_gets_stratified_val_and_test(tmp_path):
    root = make_image_tree(tmp_path / "flat", {"": {"a": 10, "b": 10}})
    data = load_data(str(root), image_size=8)
    splits = make_splits(data, val_fraction=0.2, test_fraction=0.2, split_seed=0)
    assert splits.rule == "carved" and splits.sizes() == {"train_size": 12, "val_size": 4, "test_size": 4}
    assert torch.bincount(data.labels[splits.val]).tolist() == [2, 2]
    assert torch.bincount(data.labels[splits.test]).tolist() == [2, 2]
    parts = [set(splits.train.tolist()), set(splits.val.tolist()), set(splits.test.tolist())]
    assert sum(map(len, parts)) == len(set().union(*parts)) == 20  # disjoint and complete


def test_digits_get_a_test_split_too():
    data = load_data("digits", image_size=8)
    splits = make_splits(data, val_fraction=0.2, test_fraction=0.2, split_seed=0)
    assert splits.rule == "carved"
    assert abs(len(splits.test) - 0.2 * 1797) < 10 and abs(len(splits.val) - 0.2 * 1797) < 10
    assert set(splits.test.tolist()).isdisjoint(splits.val.tolist())


def test_val_and_test_are_fixed_by_the_split_seed_not_the_run_seed(tmp_path):
    root = make_image_tree(tmp_path / "flat", {"": {"a": 15, "b": 15}})
    data = load_data(str(root), image_size=8)
    one = make_splits(data, val_fraction=0.2, split_seed=0)
    again = make_splits(data, val_fraction=0.2, split_seed=0)
    other = make_splits(data, val_fraction=0.2, split_seed=1)
    assert torch.equal(one.test, again.test) and torch.equal(one.val, again.val)
    assert not torch.equal(one.test, other.test)
    # --seed moves only the subset of train a low-data run keeps, never val or test.
    subsets = [subset_train(one.train, data.labels, data.classes, samples_per_class=3, train_fraction=1.0, seed=s)
               for s in (0, 1)]
    assert not torch.equal(subsets[0], subsets[1])
    assert all(set(s.tolist()) <= set(one.train.tolist()) for s in subsets)


def test_train_and_val_tree_holds_val_out_as_test_and_carves_val_from_train(tmp_path):
    root = make_image_tree(tmp_path / "pets", {"train": {"cat": 10, "dog": 10}, "val": {"cat": 3, "dog": 3}})
    data = load_data(str(root), image_size=8, cache_dir=str(tmp_path / "c"))
    splits = make_splits(data, val_fraction=0.2, split_seed=0)
    assert splits.rule == "val_as_test"
    rows = split_manifest(data, splits)
    by_split = {s: {r["path"] for r in rows if r["split"] == s} for s in ("train", "val", "test")}
    assert by_split["test"] == {p for p in data.paths if p.startswith("val/")}  # the provided val/, held out
    assert all(p.startswith("train/") for p in by_split["val"] | by_split["train"])
    assert len(by_split["val"]) == 4 and not by_split["val"] & by_split["train"]


def test_a_class_too_small_for_validation_is_named(tmp_path):
    root = make_image_tree(tmp_path / "flat", {"": {"a": 10, "b": 10, "rare": 2}})
    data = load_data(str(root), image_size=8)
    splits = make_splits(data, val_fraction=0.2, split_seed=0)
    assert splits.missing == {"val": ["rare"]}  # one image to test, one to train, none left to validate
    assert "'rare' in val" in small_class_warning(splits)


def test_too_few_images_for_any_validation_is_refused(tmp_path):
    root = make_image_tree(tmp_path / "flat", {"": {"a": 2, "b": 2}})
    data = load_data(str(root), image_size=8)
    with pytest.raises(DataError, match="val split would be empty"):
        make_splits(data, val_fraction=0.2, split_seed=0)


def test_train_pipeline_augments_and_eval_pipeline_is_deterministic():
    # The seed notebook overwrote the training transforms with the validation ones; here the two differ.
    batch = load_data("digits", image_size=16).images[:16]
    train, evaluate = TrainPreset(), EvalPreset()
    a = train(batch, torch.Generator().manual_seed(0))
    # The augmentation is the seed's (flip, rotation, colour jitter), not any noise: each image equals
    # torchvision's v2 functional ops applied with the parameters the generator drew for it.
    assert_matches_v2(a, batch, train.sample_params(len(batch), torch.Generator().manual_seed(0)))
    assert not torch.allclose(a, train(batch, torch.Generator().manual_seed(1)))
    assert not torch.allclose(a, batch.float() / 255)
    assert torch.equal(evaluate(batch), evaluate(batch))
    assert torch.equal(evaluate(batch), batch.float() / 255)
