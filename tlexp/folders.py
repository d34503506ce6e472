"""Reading an ImageFolder tree as people have them: which layout it is, which files are images.

Layouts (folder names compared case-insensitively, after Unicode NFC normalisation):

- flat: ``ROOT/<class>/...``: one folder per class, no split folders;
- split: ``ROOT/<split>/<class>/...`` where ``<split>`` is ``train``/``training``,
  ``val``/``valid``/``validation`` or ``test``/``testing``. ``train`` is required; a missing
  val or test split is carved later (``splits.make_splits``).

Any top-level split folder makes the tree a split layout, so ``train/`` and ``test/`` are never taken for
two classes; a tree that mixes split folders and class folders is refused. Hidden files and folders are
skipped silently (``.DS_Store``, ``.thumbs/``); links that lead nowhere, unreadable files and files of
other types are skipped, counted and listed with the reason.
"""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass, field

from .dataset import DataError

# The file types torchvision's ImageFolder accepts; anything else in a class folder
# (a GIF placeholder, a README) is skipped and reported.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Folder name (lower case) -> the split it holds.
SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}


@dataclass
class FolderScan:
    """The images of a tree: parallel lists, one entry per usable file, plus what was skipped and why."""

    files: list[str] = field(default_factory=list)  # relative to the root
    origin: list[str] = field(default_factory=list)  # "train" | "val" | "test", or "all" in a flat tree
    labels: list[int] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)  # NFC-normalised class folder names, sorted
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    layout: dict[str, str] = field(default_factory=dict)  # split -> folder name as on disk ("all" -> "")


def nfc(name: str) -> str:
    """A name as compared: macOS writes 'café' decomposed (NFD), Linux and Windows usually composed (NFC)."""
    return unicodedata.normalize("NFC", name)


def _visible_dirs(folder: str) -> list[str]:
    """Sub-folders that are not hidden (a link to a folder counts as a folder), sorted."""
    return sorted(e.name for e in os.scandir(folder) if not e.name.startswith(".") and e.is_dir())


def _class_folders(folder: str) -> dict[str, list[str]]:
    """NFC class name -> the folder names on disk that spell it (two spellings of one name are one class)."""
    out: dict[str, list[str]] = {}
    for name in _visible_dirs(folder):
        out.setdefault(nfc(name), []).append(name)
    return out


def split_layout(root: str) -> dict[str, str]:
    """{"train": "Train", "val": "valid", ...} for a split layout, {"all": ""} for a flat one; raises DataError."""
    top = _visible_dirs(root)
    splits = {name: SPLIT_FOLDERS[nfc(name).lower()] for name in top if nfc(name).lower() in SPLIT_FOLDERS}
    if not splits:
        return {"all": ""}
    others = [name for name in top if name not in splits]
    if others:
        raise DataError(f"Data path {root!r} mixes split folders {sorted(splits)} with class folders {others}; "
                        f"put every class folder inside the split folders (train/, and optionally val/ and test/), "
                        f"or use a tree of class folders only.")
    layout: dict[str, str] = {}
    for name, split in splits.items():
        if split in layout:
            raise DataError(f"Data path {root!r} has two {split} folders, {layout[split]!r} and {name!r}; "
                            f"keep one.")
        layout[split] = name
    if "train" not in layout:
        present = ", ".join(f"{name}/" for name in layout.values())
        raise DataError(f"Data path {root!r} has {present} but no train/ folder; a tree with split folders needs "
                        f"train/ (or training/, any case) holding one folder per class.")
    return {split: layout[split] for split in ("train", "val", "test") if split in layout}


def scan_image_folder(root: str) -> FolderScan:
    """List every usable image of an ImageFolder tree with its class and split; raises DataError."""
    if not os.path.exists(root):
        raise DataError(f"Data path {root!r} does not exist; pass an ImageFolder directory, 'digits' or 'flowers102'.")
    if not os.path.isdir(root):
        raise DataError(f"Data path {root!r} is not a directory; pass an ImageFolder directory "
                        f"(one sub-folder per class, or train/ and val/ folders of them).")
    if not _visible_dirs(root):
        raise DataError(f"Data path {root!r} has no class folders; expected one sub-folder per class "
                        f"(or train/ and val/ folders of them).")
    layout = split_layout(root)
    split_classes = {split: _class_folders(os.path.join(root, sub)) for split, sub in layout.items()}
    first = next(iter(layout))  # "train" or "all"
    reference = sorted(split_classes[first])
    if len(reference) < 2:
        where = os.path.join(root, layout[first])
        raise DataError(f"Data path {where!r} has {len(reference)} class folder(s) {reference}; "
                        f"a classifier needs at least 2.")
    for split, classes in split_classes.items():
        if sorted(classes) != reference:
            raise DataError(f"The {split}/ classes {sorted(classes)} differ from the train/ classes {reference}; "
                            f"every split must have the same class folders.")

    scan = FolderScan(classes=reference, layout=layout)
    for split, sub in layout.items():
        for label, cls in enumerate(reference):
            for folder in split_classes[split][cls]:
                _scan_class(root, os.path.join(root, sub, folder), split, label, scan)
    return scan


def _scan_class(root: str, folder: str, split: str, label: int, scan: FolderScan) -> None:
    def unreadable(exc: OSError) -> None:  # a sub-folder os.walk cannot list
        scan.skipped.append((os.path.relpath(exc.filename or folder, root), f"unreadable folder ({exc.strerror})"))

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unreadable):
        # Hidden folders (.thumbs, .ipynb_checkpoints) are skipped like hidden files; sorted for a stable order.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for d in dirnames:
            if os.path.islink(os.path.join(dirpath, d)):  # os.walk does not follow links to folders (loops)
                scan.skipped.append((os.path.relpath(os.path.join(dirpath, d), root), "link to a folder (not followed)"))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            reason = _junk_reason(path, name)
            if reason:
                scan.skipped.append((rel, reason))
                continue
            scan.files.append(rel)
            scan.origin.append(split)
            scan.labels.append(label)


def _junk_reason(path: str, name: str) -> str | None:
    """Why a file cannot be an image of the dataset, or None when it can."""
    if os.path.islink(path) and not os.path.exists(path):
        return f"link to a missing file ({os.readlink(path)})"
    if not name.lower().endswith(IMG_EXTENSIONS):
        return f"not an image file type ({os.path.splitext(name)[1] or 'no extension'})"
    if not os.path.isfile(path):
        return "not a regular file"
    if not os.access(path, os.R_OK):
        return "unreadable (permission denied)"
    return None
