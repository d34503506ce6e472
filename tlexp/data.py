"""Datasets and the decoded-image cache.

Images are decoded and resized **once** per dataset and image size into uint8
pixels of shape (N, 3, S, S) -- the seed notebook re-decoded every JPEG with
PIL every epoch. With a cache directory the pixels live in a ``.npy`` file,
decoded straight into it and then memory-mapped: every process on a node
shares one copy through the page cache, and a dataset larger than RAM trains
without its pixels in private memory. The file is keyed by the data's content
fingerprint, the files' modification times and the decode settings, so a
second run (or every cell of a sweep) starts without decoding, and a changed
file is never served stale.

Tree layouts are read by ``folders``, splits made by ``splits``, batches
augmented by ``transforms``; their public names are importable from here too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import imagefile
from .dataset import DataError, ImageData
from .folders import IMG_EXTENSIONS, nfc, scan_image_folder
from .splits import (Splits, carve, make_splits, small_class_warning, split_manifest, stratified_split,
                     subset_train)
from .transforms import EvalPreset, TrainPreset, adjust_hue_, flip_rotate

log = logging.getLogger(__name__)

_DECODER_VERSION = "2"  # bump when decoding/resizing changes, to invalidate old caches (2: EXIF orientation)
EXIF_TRANSPOSE = True  # phone photos are stored sideways with an orientation tag; decode them upright
_HEAD_BYTES = 4096  # the fingerprint hashes this much of each file's start and end
_MEMO: dict[str, ImageData] = {}  # decoded datasets of this process (a sweep reuses them)
BUILTINS = ("digits", "flowers102")


def clear_memory() -> None:
    """Forget the decoded datasets this process holds (the on-disk cache stays): the next load reads it again."""
    _MEMO.clear()


@dataclass
class _Files:
    """An image-file dataset before decoding."""

    name: str
    root: str
    files: list[str]
    origin: list[str]
    labels: list[int]
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)


# ------------------------------------------------------------------ loading
def load_data(source: str, *, image_size: int, cache_dir: str | None = None, num_workers: int = 2,
              progress: Callable[[int, int], None] | None = None) -> ImageData:
    """Load ``digits``, ``flowers102`` or an ImageFolder tree, decoded once at ``image_size``."""
    if source == "digits":
        key = f"digits-{image_size}"
        if key not in _MEMO:
            _MEMO[key] = _load_digits(image_size)
        return _MEMO[key]
    found = _find_files(source, cache_dir)
    data = _decode_files(found, image_size=image_size, cache_dir=cache_dir, num_workers=num_workers,
                         progress=progress)
    _check_classes_readable(data)
    return data


def data_fingerprint(source: str, *, cache_dir: str | None = None) -> str:
    """The content fingerprint ``load_data`` would give ``source`` (reads file heads, decodes nothing)."""
    if source == "digits":
        return _digits_fingerprint(_digits_bunch())
    found = _find_files(source, cache_dir)
    return _fingerprints(found.root, found.files)[0]


def data_params(data: ImageData, splits: Splits) -> dict[str, Any]:
    """What a run logs about its data: which data (by content and by path), how it was split, what was dropped."""
    return {
        "data_fingerprint": data.fingerprint,
        "data_path": data.root,
        "split_rule": splits.rule,
        "exif_transpose": EXIF_TRANSPOSE,
        "skipped_files": len(data.skipped),
        "classes_without_val": ",".join(splits.missing.get("val", [])) or "none",
        "classes_without_test": ",".join(splits.missing.get("test", [])) or "none",
    }


def _find_files(source: str, cache_dir: str | None) -> _Files:
    if not source.strip():
        raise DataError("--data is empty; pass digits, flowers102 or the path to an ImageFolder directory.")
    if source == "flowers102":
        return _flowers102_files(cache_dir)
    root = os.path.abspath(os.path.expanduser(source))
    if not os.path.exists(root):
        raise DataError(f"--data {source!r} is neither a built-in dataset (digits, flowers102) nor an existing "
                        f"directory ({root} does not exist); pass one of those names or the path to an ImageFolder "
                        f"tree (one sub-folder of images per class).")
    scan = scan_image_folder(root)
    return _Files(name=os.path.basename(root), root=root, files=scan.files, origin=scan.origin, labels=scan.labels,
                  classes=scan.classes, skipped=scan.skipped)


def _digits_bunch() -> Any:
    from sklearn.datasets import load_digits

    return load_digits()


def _digits_fingerprint(bunch: Any) -> str:
    h = hashlib.sha256(np.ascontiguousarray(bunch.images).tobytes())
    h.update(np.ascontiguousarray(bunch.target).tobytes())
    return h.hexdigest()[:20]


def _load_digits(image_size: int) -> ImageData:
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels), upscaled and made 3-channel."""
    bunch = _digits_bunch()
    n = len(bunch.images)
    check_room(n, image_size, cache_dir=None)
    images = torch.empty((n, 3, image_size, image_size), dtype=torch.uint8)
    # In chunks: the float intermediate of all images at once would be 4x the size of the result.
    for start in range(0, n, 256):
        pixels = torch.from_numpy(bunch.images[start:start + 256]).float().unsqueeze(1) / 16.0  # (B, 1, 8, 8)
        pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear", align_corners=False)
        images[start:start + 256] = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageData(name="digits", images=images, labels=torch.from_numpy(bunch.target).long(),
                     classes=[str(c) for c in range(10)], paths=[f"digits/{i:04d}" for i in range(n)],
                     origin=["all"] * n, fingerprint=_digits_fingerprint(bunch), cache_key=f"digits-{image_size}",
                     root="sklearn digits")


def _flowers102_files(cache_dir: str | None) -> _Files:
    """Flowers102 with its official train/val/test splits, through torchvision (downloaded once)."""
    from torchvision.datasets import Flowers102

    root = os.path.abspath(os.path.join(cache_dir or ".", "flowers102"))
    files, origin, labels = [], [], []
    for split in ("train", "val", "test"):
        try:
            ds = Flowers102(root=root, split=split, download=True)
        except Exception as exc:
            reason = (str(exc).strip().splitlines() or [""])[0][:200]
            raise DataError(f"Flowers102 is not in the cache {os.path.join(root, 'flowers-102')!r} and could not be "
                            f"downloaded ({type(exc).__name__}: {reason}); connect to the internet once, or copy "
                            f"jpg/ (from 102flowers.tgz), imagelabels.mat and setid.mat from "
                            f"https://www.robots.ox.ac.uk/~vgg/data/flowers/102/ there, or use --data digits or "
                            f"--data PATH to your own images.") from exc
        for path, label in zip(ds._image_files, ds._labels):
            files.append(os.path.relpath(str(path), root))
            origin.append(split)
            labels.append(int(label))
    return _Files(name="flowers102", root=root, files=files, origin=origin, labels=labels,
                  classes=list(Flowers102.classes))


# ------------------------------------------------------------- fingerprints
def _file_facts(root: str, rel: str) -> tuple[int, int, str]:
    """(size, mtime in ns, hash of the first and last 4 KiB) of one file."""
    path = os.path.join(root, rel)
    try:
        st = os.stat(path)
        with open(path, "rb") as fh:
            chunk = fh.read(_HEAD_BYTES)
            if st.st_size > 2 * _HEAD_BYTES:
                fh.seek(-_HEAD_BYTES, os.SEEK_END)
            chunk += fh.read(_HEAD_BYTES)
    except OSError as exc:
        raise DataError(f"{path!r} could not be read while fingerprinting the data ({exc.strerror}); "
                        f"fix or remove it.") from None
    return st.st_size, st.st_mtime_ns, hashlib.blake2b(chunk, digest_size=8).hexdigest()


def _fingerprints(root: str, files: list[str]) -> tuple[str, str]:
    """(content fingerprint, digest of modification times). The first names the data wherever they are: it
    hashes relative paths (NFC), sizes and each file's head and tail, never the root. The second makes the
    decoded cache notice an edit that keeps a file's size, head and tail."""
    with ThreadPoolExecutor(max_workers=8) as pool:  # I/O bound: open + two small reads per file
        facts = list(pool.map(lambda rel: _file_facts(root, rel), files))
    content, times = hashlib.sha256(b"tlexp-data-1\n"), hashlib.sha256()
    for rel, (size, mtime_ns, heads) in zip(files, facts):
        content.update(f"{nfc(rel).replace(os.sep, '/')}|{size}|{heads}\n".encode())
        times.update(f"{mtime_ns}\n".encode())
    return content.hexdigest()[:20], times.hexdigest()[:20]


# ------------------------------------------------------------------ decoding
def decode_image(path: str, image_size: int) -> np.ndarray:
    """Decode one file to (3, S, S) uint8 RGB, upright (EXIF orientation), squashed to S x S as the seed's
    Resize((S, S)) does (``imagefile.decode_image``, which the logged image model ships too)."""
    return imagefile.decode_image(path, image_size, exif_transpose=EXIF_TRANSPOSE)


def check_room(n_images: int, image_size: int, *, cache_dir: str | None) -> None:
    """Refuse, before decoding, pixels that cannot fit: on disk in the cache directory when there is one
    (the cache is a file, memory-mapped), else in available memory."""
    need = n_images * 3 * image_size * image_size
    if cache_dir is not None:
        free, where = shutil.disk_usage(cache_dir).free, f"free disk space in {cache_dir}"
        hint = "a smaller --image-size or a --cache-dir on a larger disk"
    else:
        free, where = _available_memory(), "available memory"
        hint = "a smaller --image-size"
    if free is not None and need > free:
        raise DataError(f"Decoding {n_images} images at {image_size}px needs {_gib(need)} of {where}, but only "
                        f"{_gib(free)} is free; use {hint}.")


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return None


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**28 else f"{n_bytes / 2**20:.1f} MiB"


def _decode_files(found: _Files, *, image_size: int, cache_dir: str | None, num_workers: int,
                  progress: Callable[[int, int], None] | None = None) -> ImageData:
    fingerprint, times = _fingerprints(found.root, found.files)
    key = hashlib.sha256(f"{_DECODER_VERSION}|{image_size}|exif={EXIF_TRANSPOSE}|{fingerprint}|{times}".encode())
    cache_key = key.hexdigest()[:20]
    if cache_key in _MEMO:
        return _MEMO[cache_key]
    base = os.path.join(cache_dir, "decoded", cache_key) if cache_dir else None
    cached = _read_cache(base) if base else None
    if cached is None:
        decode = dict(root=found.root, files=found.files, image_size=image_size, num_workers=num_workers,
                      progress=progress)
        # No files at all (every one skipped): nothing to map; the class check below says which is empty.
        cached = _decode_to_cache(base, **decode) if base and found.files else _decode_in_memory(**decode)
    images, meta = cached
    keep = meta["keep"]
    data = ImageData(
        name=found.name, images=images, labels=torch.tensor([found.labels[i] for i in keep], dtype=torch.long),
        classes=found.classes, paths=[found.files[i] for i in keep], origin=[found.origin[i] for i in keep],
        skipped=list(found.skipped) + [tuple(s) for s in meta["skipped"]], fingerprint=fingerprint,
        cache_key=cache_key, root=found.root)
    _MEMO[cache_key] = data
    return data


def _decode_into(out: np.ndarray, root: str, files: list[str], image_size: int, *, num_workers: int,
                 progress: Callable[[int, int], None] | None) -> dict[str, Any]:
    """Decode every file into its row of ``out``, then move the readable ones to the front; returns the meta."""
    ok = np.zeros(len(files), dtype=bool)
    skipped: list[tuple[str, str]] = []

    def work(i: int) -> None:
        try:
            out[i] = decode_image(os.path.join(root, files[i]), image_size)
            ok[i] = True
        except Exception as exc:  # unreadable, truncated, zero-byte, not really an image...
            skipped.append((files[i], f"{type(exc).__name__}: {exc}"))

    # PIL releases the GIL while decoding and resizing, so threads scale with cores.
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        for _ in pool.map(work, range(len(files))):
            if progress is not None:
                progress(1, len(files))
    for path, reason in sorted(skipped):
        log.warning("skipped %s: %s", path, reason)
    keep = np.flatnonzero(ok).tolist()
    # Drop skipped files' rows in place (out[ok] would hold a second copy of every image at the peak).
    for row, i in enumerate(keep):
        if row != i:
            out[row] = out[i]
    return {"keep": keep, "skipped": sorted(skipped)}


def _decode_in_memory(*, root: str, files: list[str], image_size: int, num_workers: int,
                      progress: Callable[[int, int], None] | None) -> tuple[torch.Tensor, dict]:
    check_room(len(files), image_size, cache_dir=None)
    out = np.empty((len(files), 3, image_size, image_size), dtype=np.uint8)
    meta = _decode_into(out, root, files, image_size, num_workers=num_workers, progress=progress)
    return torch.from_numpy(out[:len(meta["keep"])]), meta


def _decode_to_cache(base: str, *, root: str, files: list[str], image_size: int, num_workers: int,
                     progress: Callable[[int, int], None] | None) -> tuple[torch.Tensor, dict]:
    """Decode straight into the memory-mapped cache file (no private copy of the pixels), then map it."""
    shape = (len(files), 3, image_size, image_size)
    tmp = f"{base}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(base), exist_ok=True)
        check_room(len(files), image_size, cache_dir=os.path.dirname(base))
        out = np.lib.format.open_memmap(tmp + ".npy", mode="w+", dtype=np.uint8, shape=shape)
        _reserve(tmp + ".npy")
    except DataError:
        _remove(tmp + ".npy")
        raise
    except (OSError, ValueError) as exc:  # a read-only cache dir must not stop training (ValueError: 0 images)
        _remove(tmp + ".npy")
        log.warning("could not write the decoded-image cache %s (%s); decoding into memory", base, exc)
        return _decode_in_memory(root=root, files=files, image_size=image_size, num_workers=num_workers,
                                 progress=progress)
    try:
        meta = _decode_into(out, root, files, image_size, num_workers=num_workers, progress=progress)
        out.flush()
        del out
        with open(tmp + ".json", "w") as fh:
            json.dump(meta, fh)
        # npy first, json last: a reader only trusts the cache once the json exists.
        os.replace(tmp + ".npy", base + ".npy")
        os.replace(tmp + ".json", base + ".json")
    finally:  # interrupted or failed: no half-written file left behind
        _remove(tmp + ".npy")
        _remove(tmp + ".json")
    cached = _read_cache(base)
    if cached is None:
        raise DataError(f"The decoded-image cache {base}.npy could not be read back right after writing it; "
                        f"check the disk, or pass another --cache-dir.")
    return cached


def _reserve(path: str) -> None:
    """Allocate the whole file now: writing through a map into a full disk kills the process (SIGBUS)."""
    if not hasattr(os, "posix_fallocate"):
        return
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        raise DataError(f"The decoded-image cache needs {_gib(size)} in {os.path.dirname(path)} but the disk "
                        f"refused it ({exc.strerror}); free space, use a smaller --image-size or another "
                        f"--cache-dir.") from None
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _read_cache(base: str) -> tuple[torch.Tensor, dict] | None:
    """The cached pixels, memory-mapped copy-on-write: pages come from the page cache (shared by every
    process that maps the file, and dropped under memory pressure), so none of them is private memory.
    Copy-on-write rather than read-only because torch warns about (and cannot promise not to write
    to) non-writable arrays; nothing writes to them, so no page is ever copied."""
    try:
        with open(base + ".json") as fh:
            meta = json.load(fh)
        arr = np.load(base + ".npy", mmap_mode="c")
    except (OSError, ValueError):
        return None
    return torch.from_numpy(arr[:len(meta["keep"])]), meta


def _check_classes_readable(data: ImageData) -> None:
    for split in sorted(set(data.origin)):
        mask = torch.tensor([o == split for o in data.origin])
        counts = torch.bincount(data.labels[mask], minlength=data.num_classes)
        empty = [data.classes[i] for i in range(data.num_classes) if counts[i] == 0]
        if empty:
            where = "" if split == "all" else f"{split}/"
            raise DataError(f"Class folder {where}{empty[0]!r} in {data.root!r} holds no readable image "
                            f"({len(data.skipped)} file(s) skipped); every class needs at least one.")


__all__ = ["BUILTINS", "DataError", "EXIF_TRANSPOSE", "EvalPreset", "IMG_EXTENSIONS", "ImageData", "Splits",
           "TrainPreset", "adjust_hue_", "carve", "check_room", "clear_memory", "data_fingerprint", "data_params",
           "decode_image", "flip_rotate", "load_data", "make_splits", "small_class_warning", "split_manifest",
           "stratified_split", "subset_train"]
