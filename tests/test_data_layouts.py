"""Folders as people have them: split folders in every spelling, links, hidden folders, NFD names, EXIF
rotation; the content fingerprint; the memory-mapped decoded cache and its size checks; Flowers102 offline."""

from __future__ import annotations

import os
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import make_image_tree
from tlexp import data as data_mod
from tlexp.data import DataError, data_fingerprint, decode_image, load_data, make_splits
from tlexp.folders import SPLIT_FOLDERS


def _load(root: Path, tmp_path: Path):
    return load_data(str(root), image_size=8, cache_dir=str(tmp_path / "cache"))


# ------------------------------------------------------------------ split layouts
@pytest.mark.parametrize("names", [("train", "test"), ("Train", "Val"), ("training", "validation"),
                                   ("TRAIN", "valid", "Testing"), ("train",)])
def test_split_folders_in_any_spelling_are_splits_not_classes(tmp_path, names):
    layout = {name: {"ants": 6, "bees": 6} for name in names}
    root = make_image_tree(tmp_path / "hym", layout)
    data = _load(root, tmp_path)
    assert data.classes == ["ants", "bees"]
    splits = make_splits(data, val_fraction=0.2, split_seed=0)
    kinds = {SPLIT_FOLDERS[n.lower()] for n in names}
    expected_rule = {frozenset({"train", "test"}): "test_folder", frozenset({"train", "val"}): "val_as_test",
                     frozenset({"train", "val", "test"}): "folders", frozenset({"train"}): "train_only"}
    assert splits.rule == expected_rule[frozenset(kinds)]
    train_folder = names[0] + "/"
    train_paths = {data.paths[i] for i in splits.train.tolist()}
    assert all(p.startswith(train_folder) for p in train_paths)  # test images never appear in training
    test_paths = {data.paths[i] for i in splits.test.tolist()}
    assert len(test_paths) > 0 and not test_paths & train_paths


def test_train_and_test_tree_uses_the_test_folder_as_test(tmp_path):
    root = make_image_tree(tmp_path / "hym", {"train": {"ants": 10, "bees": 10}, "test": {"ants": 4, "bees": 4}})
    data = _load(root, tmp_path)
    splits = make_splits(data, val_fraction=0.2, split_seed=0)
    assert {data.paths[i] for i in splits.test.tolist()} == {p for p in data.paths if p.startswith("test/")}
    assert torch.bincount(data.labels[splits.val]).tolist() == [2, 2]  # carved from train/, stratified


@pytest.mark.parametrize("layout, needles", [
    ({"train": {"a": 2, "b": 2}, "": {"cats": 2}}, ["mixes split folders ['train']", "class folders ['cats']"]),
    ({"test": {"a": 2, "b": 2}, "val": {"a": 2, "b": 2}}, ["test/", "val/", "no train/ folder"]),
    ({"train": {"a": 2, "b": 2}, "val": {"a": 2, "b": 2}, "Valid": {"a": 2, "b": 2}}, ["two val folders"]),
])
def test_ambiguous_split_layouts_are_refused_in_one_line(tmp_path, layout, needles):
    root = make_image_tree(tmp_path / "d", layout)
    with pytest.raises(DataError) as err:
        _load(root, tmp_path)
    assert "\n" not in str(err.value)
    for needle in needles:
        assert needle in str(err.value)


# ------------------------------------------------------------------ junk
def test_hidden_folders_and_broken_links_are_skipped_and_listed(tmp_path):
    root = make_image_tree(tmp_path / "d", {"": {"ants": 4, "bees": 4}})
    hidden = root / "bees" / ".thumbs"
    hidden.mkdir()
    shutil.copy(root / "bees" / "bees_0.png", hidden / "thumb.png")
    os.symlink(root / "nowhere.png", root / "ants" / "gone.png")  # dangling
    os.symlink(root / "ants" / "ants_0.png", root / "ants" / "alias.png")  # a good link is an image
    os.symlink(root / "ants", root / "bees" / "loop")  # a link to a folder is not followed

    data = _load(root, tmp_path)
    assert not any(".thumbs" in p for p in data.paths)
    assert "ants/alias.png" in data.paths and len(data.paths) == 9
    reasons = dict(data.skipped)
    assert "link to a missing file" in reasons["ants/gone.png"]
    assert "not followed" in reasons["bees/loop"]
    assert data_fingerprint(str(root)) == data.fingerprint  # no FileNotFoundError from the fingerprint


def test_nfd_class_names_match_their_nfc_twins(tmp_path):
    nfc_name, nfd_name = "café", unicodedata.normalize("NFD", "café")
    assert nfc_name != nfd_name
    root = tmp_path / "d"
    make_image_tree(root, {"train": {nfc_name: 4, "bees": 4}})
    make_image_tree(root, {"val": {nfd_name: 2, "bees": 2}})  # copied from a Mac
    data = _load(root, tmp_path)
    assert data.classes == ["bees", nfc_name]
    val_cafe = [i for i, p in enumerate(data.paths) if p.startswith("val/" + nfd_name)]
    assert len(val_cafe) == 2 and all(int(data.labels[i]) == 1 for i in val_cafe)


def test_exif_rotated_jpeg_is_decoded_upright(tmp_path):
    from PIL import Image

    pixels = np.zeros((16, 32, 3), dtype=np.uint8)  # stored landscape: red left half, blue right half
    pixels[:, :16, 0] = 255
    pixels[:, 16:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display (a phone held upright)
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=95)

    out = decode_image(str(tmp_path / "phone.jpg"), 16).astype(int)  # (3, H, W)
    top, bottom = out[:, :6], out[:, -6:]
    assert top[0].mean() > 200 and top[2].mean() < 50  # the left (red) half is now on top
    assert bottom[2].mean() > 200 and bottom[0].mean() < 50


def test_decoded_cache_key_changes_with_exif_handling(tmp_path, monkeypatch):
    root = make_image_tree(tmp_path / "d", {"": {"a": 3, "b": 3}})
    upright = _load(root, tmp_path)
    data_mod.clear_memory()
    monkeypatch.setattr(data_mod, "EXIF_TRANSPOSE", False)
    raw = _load(root, tmp_path)
    assert raw.cache_key != upright.cache_key and raw.fingerprint == upright.fingerprint


# ------------------------------------------------------------------ fingerprint
def test_fingerprint_is_the_content_not_the_path(tmp_path, monkeypatch):
    root = make_image_tree(tmp_path / "base", {"": {"a": 3, "b": 3}})
    monkeypatch.chdir(tmp_path)
    spellings = ["./base", "base/", str(root), str(tmp_path / "x" / ".." / "base")]
    assert len({data_fingerprint(s) for s in spellings}) == 1
    copy = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(root, copy)  # new mtimes, other name: the same data
    assert data_fingerprint(str(copy)) == data_fingerprint("base")
    before = data_fingerprint("base")
    make_image_tree(tmp_path / "more", {"": {"a": 1}}, seed=3)
    shutil.copy(tmp_path / "more" / "a" / "a_0.png", root / "a" / "new.png")
    assert data_fingerprint("base") != before  # an added image is new data
    assert load_data("base/", image_size=8).fingerprint == data_fingerprint("base")


def test_builtin_digits_have_a_content_fingerprint_and_a_path_param():
    data = load_data("digits", image_size=8)
    assert data.fingerprint == data_fingerprint("digits") and len(data.fingerprint) == 20
    assert data.root == "sklearn digits"


def test_empty_data_string_is_refused():
    with pytest.raises(DataError, match="--data is empty"):
        data_fingerprint("  ")


# ------------------------------------------------------------------ memory-mapped cache
def _mapped_files() -> dict[str, list[tuple[int, int]]]:
    maps: dict[str, list[tuple[int, int]]] = {}
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 6:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                maps.setdefault(parts[5], []).append((lo, hi))
    return maps


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_decoded_pixels_live_in_the_mapped_cache_file_first_run_and_after(tmp_path):
    root = make_image_tree(tmp_path / "d", {"": {"a": 5, "b": 5}})
    for attempt in ("decoding", "reading the cache"):
        data = _load(root, tmp_path)
        npy = os.path.join(str(tmp_path / "cache"), "decoded", data.cache_key + ".npy")
        ptr = data.images.data_ptr()
        assert any(lo <= ptr < hi for lo, hi in _mapped_files().get(npy, [])), attempt
        assert data.images.shape == (10, 3, 8, 8)
        data_mod.clear_memory()
    assert not [f for f in os.listdir(tmp_path / "cache" / "decoded") if ".tmp" in f]  # no leftovers


def test_cache_that_cannot_fit_on_disk_is_refused_before_decoding(tmp_path, monkeypatch):
    root = make_image_tree(tmp_path / "d", {"": {"a": 5, "b": 5}})
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(data_mod.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    monkeypatch.setattr(data_mod, "decode_image", lambda *a: pytest.fail("decoded although it cannot fit"))
    with pytest.raises(DataError) as err:
        load_data(str(root), image_size=64, cache_dir=str(tmp_path / "cache"))
    assert "Decoding 10 images at 64px needs 0.1 MiB of free disk space" in str(err.value)


def test_pixels_that_cannot_fit_in_memory_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "_available_memory", lambda: 2**30)
    with pytest.raises(DataError, match=r"Decoding 1797 images at 1024px needs 5.26 GiB of available memory"):
        load_data("digits", image_size=1024)


# ------------------------------------------------------------------ Flowers102, offline
def _flowers_fixture(root: Path) -> dict[str, list[int]]:
    """torchvision's on-disk layout: flowers-102/jpg/image_XXXXX.jpg, imagelabels.mat, setid.mat; one tiny
    image per class and split (tlexp checks every class has an image in every split)."""
    from PIL import Image
    from scipy.io import savemat

    base = root / "flowers102" / "flowers-102"
    (base / "jpg").mkdir(parents=True)
    labels = [c for c in range(1, 103) for _ in range(3)]  # 1-based, as in the real file
    for i, label in enumerate(labels, 1):
        Image.new("RGB", (12, 10), (label * 2, 100, 0)).save(base / "jpg" / f"image_{i:05d}.jpg")
    savemat(base / "imagelabels.mat", {"labels": np.array([labels])})
    ids = {"trnid": list(range(1, 307, 3)), "valid": list(range(2, 307, 3)), "tstid": list(range(3, 307, 3))}
    savemat(base / "setid.mat", {k: np.array([v]) for k, v in ids.items()})
    return ids


def test_flowers102_loads_its_official_splits_offline(tmp_path, monkeypatch):
    import torchvision.datasets.flowers102 as tv_flowers
    from torchvision.datasets import Flowers102

    ids = _flowers_fixture(tmp_path / "cache")
    monkeypatch.setattr(tv_flowers, "check_integrity", lambda *a, **k: True)  # the fixture's MD5s differ

    data = load_data("flowers102", image_size=8, cache_dir=str(tmp_path / "cache"))
    assert data.classes == list(Flowers102.classes) and len(data.classes) == 102
    assert data.root == str(tmp_path / "cache" / "flowers102")
    splits = make_splits(data, val_fraction=0.2, split_seed=0)
    assert splits.rule == "folders"
    for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        index = getattr(splits, split)
        assert sorted(data.paths[i] for i in index.tolist()) == [
            f"flowers-102/jpg/image_{i:05d}.jpg" for i in ids[key]]
        assert sorted(int(data.labels[i]) for i in index.tolist()) == list(range(102))
    first = data.paths.index("flowers-102/jpg/image_00004.jpg")  # the first image of class 2 (label 1)
    assert int(data.labels[first]) == 1 and int(data.images[first, 0].float().mean()) in (3, 4, 5)
