"""Datasets, splits, the decoded-image cache and the transform presets.

Images are decoded and resized **once** per dataset and image size into a
uint8 tensor of shape (N, 3, S, S) -- the seed notebook re-decoded every JPEG
with PIL every epoch. The cache lives in memory and, keyed by a fingerprint of
the files and settings, as a memory-mapped ``.npy`` under the cache directory,
so a second run (or every cell of a sweep) starts without decoding, and a
changed file is never served stale.

Augmentation then runs on batched tensors on the training device
(``TrainPreset``); evaluation is deterministic (``EvalPreset``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# The file types torchvision's ImageFolder accepts; anything else in a class folder
# (a GIF placeholder, a README, a .DS_Store) is skipped and reported.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_DECODER_VERSION = "1"  # bump when decoding/resizing changes, to invalidate old caches
_MEMO: dict[str, "ImageData"] = {}  # decoded datasets of this process (a sweep reuses them)


class DataError(ValueError):
    """The data cannot be used as given. The message is one sentence for the user."""


@dataclass
class ImageData:
    """A decoded dataset: every image once, as uint8, with its label and where it came from."""

    name: str
    images: torch.Tensor  # (N, 3, S, S) uint8
    labels: torch.Tensor  # (N,) int64
    classes: list[str]
    paths: list[str]  # one per image, relative to the dataset root (or a synthetic id)
    origin: list[str]  # "train" | "val" | "test" for trees that ship their own splits, else "all"
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    fingerprint: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])


@dataclass(frozen=True)
class Splits:
    """Index tensors into ``ImageData`` (disjoint by construction)."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor | None = None

    def sizes(self) -> dict[str, int]:
        return {"train_size": len(self.train), "val_size": len(self.val),
                "test_size": 0 if self.test is None else len(self.test)}


def clear_memory() -> None:
    """Forget the decoded datasets this process holds (the on-disk cache stays): the next load reads it again."""
    _MEMO.clear()


# ------------------------------------------------------------------ loading
def load_data(source: str, *, image_size: int, cache_dir: str | None = None, num_workers: int = 2,
              progress: "callable | None" = None) -> ImageData:
    """Load ``digits``, ``flowers102`` or an ImageFolder tree, decoded once at ``image_size``."""
    if source == "digits":
        key = f"digits-{image_size}"
        if key not in _MEMO:
            _MEMO[key] = _load_digits(image_size)
        return _MEMO[key]
    if source == "flowers102":
        files, origin, classes, labels = _flowers102_files(cache_dir)
        root = os.path.join(cache_dir or ".", "flowers102")
        return _decode_files("flowers102", root, files, origin, labels, classes, image_size=image_size,
                             cache_dir=cache_dir, num_workers=num_workers, progress=progress)
    root = os.path.abspath(os.path.expanduser(source))
    if not os.path.exists(root):
        raise DataError(f"--data {source!r} is neither a built-in dataset (digits, flowers102) nor an existing "
                        f"directory ({root} does not exist); pass one of those names or the path to an ImageFolder "
                        f"tree (one sub-folder of images per class).")
    files, origin, labels, classes, skipped = _scan_image_folder(root)
    data = _decode_files(os.path.basename(root), root, files, origin, labels, classes, image_size=image_size,
                         cache_dir=cache_dir, num_workers=num_workers, progress=progress, pre_skipped=skipped)
    _check_classes_readable(data, root)
    return data


def _load_digits(image_size: int) -> ImageData:
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels), upscaled and made 3-channel."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = torch.from_numpy(bunch.images).float().unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    n = len(images)
    return ImageData(name="digits", images=images, labels=torch.from_numpy(bunch.target).long(),
                     classes=[str(c) for c in range(10)], paths=[f"digits/{i:04d}" for i in range(n)],
                     origin=["all"] * n, fingerprint=f"digits-{image_size}")


def _class_dirs(folder: str) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _scan_image_folder(root: str) -> tuple[list[str], list[str], list[int], list[str], list[tuple[str, str]]]:
    """List (relative path, split origin, label) for an ImageFolder tree, with or without split folders."""
    if not os.path.exists(root):
        raise DataError(f"Data path {root!r} does not exist; pass an ImageFolder directory, 'digits' or 'flowers102'.")
    if not os.path.isdir(root):
        raise DataError(f"Data path {root!r} is not a directory; pass an ImageFolder directory "
                        f"(one sub-folder per class, or train/ and val/ folders of them).")
    top = _class_dirs(root)
    if not top:
        raise DataError(f"Data path {root!r} has no class folders; expected one sub-folder per class "
                        f"(or train/ and val/ folders of them).")
    val_name = "val" if "val" in top else ("valid" if "valid" in top else None)
    if "train" in top and val_name:
        layout = {"train": "train", "val": val_name}
        if "test" in top:
            layout["test"] = "test"
    else:
        layout = {"all": ""}

    split_classes = {split: _class_dirs(os.path.join(root, sub)) for split, sub in layout.items()}
    reference = split_classes.get("train", split_classes.get("all"))
    if len(reference) < 2:
        where = os.path.join(root, layout.get("train", ""))
        raise DataError(f"Data path {where!r} has {len(reference)} class folder(s) {reference}; "
                        f"a classifier needs at least 2.")
    for split, classes in split_classes.items():
        if classes != reference:
            raise DataError(f"The {split}/ classes {classes} differ from the train/ classes {reference}; "
                            f"every split must have the same class folders.")

    files, origin, labels, skipped = [], [], [], []
    for split, sub in layout.items():
        for label, cls in enumerate(reference):
            folder = os.path.join(root, sub, cls)
            for dirpath, dirnames, filenames in os.walk(folder):
                dirnames.sort()
                for name in sorted(filenames):
                    rel = os.path.relpath(os.path.join(dirpath, name), root)
                    if name.startswith("."):
                        continue
                    if not name.lower().endswith(IMG_EXTENSIONS):
                        skipped.append((rel, f"not an image file type ({os.path.splitext(name)[1] or 'no extension'})"))
                        continue
                    files.append(rel)
                    origin.append(split)
                    labels.append(label)
    return files, origin, labels, reference, skipped


def _flowers102_files(cache_dir: str | None) -> tuple[list[str], list[str], list[str], list[int]]:
    """Flowers102 with its official train/val/test splits (downloaded once by torchvision)."""
    from torchvision.datasets import Flowers102

    root = os.path.join(cache_dir or ".", "flowers102")
    files, origin, labels = [], [], []
    for split, name in (("train", "train"), ("val", "val"), ("test", "test")):
        try:
            ds = Flowers102(root=root, split=name, download=True)
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
    classes = [f"class_{i:03d}" for i in range(102)]
    return files, origin, classes, labels


def _fingerprint(root: str, files: list[str], image_size: int) -> str:
    """Hash of every file's name, size and mtime plus the decode settings: any change -> new cache key."""
    h = hashlib.sha256(f"{_DECODER_VERSION}|{image_size}|{root}".encode())
    for rel in files:
        st = os.stat(os.path.join(root, rel))
        h.update(f"{rel}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def decode_image(path: str, image_size: int) -> np.ndarray:
    """Decode one file to (3, S, S) uint8 RGB, squashed to S x S as the seed's Resize((S, S)) does."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()  # raises on truncated/corrupt files, which the caller reports and skips
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            # 16-bit and float greyscale: Image.convert('RGB') would clip, so scale to 8 bits.
            arr = np.asarray(img, dtype=np.float32)
            top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
            img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8))
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        if img.mode != "RGB":  # convert() would copy even an RGB image: a full-size buffer for nothing
            img = img.convert("RGB")
        img = img.resize((image_size, image_size), Image.BILINEAR, reducing_gap=None)
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def _decode_files(name: str, root: str, files: list[str], origin: list[str], labels: list[int],
                  classes: list[str], *, image_size: int, cache_dir: str | None, num_workers: int,
                  progress: "callable | None" = None, pre_skipped: list[tuple[str, str]] | None = None) -> ImageData:
    fingerprint = _fingerprint(root, files, image_size)
    if fingerprint in _MEMO:
        return _MEMO[fingerprint]
    cache_base = os.path.join(cache_dir, "decoded", fingerprint) if cache_dir else None
    cached = _read_cache(cache_base) if cache_base else None
    if cached is not None:
        images, meta = cached
    else:
        images, meta = _decode_all(root, files, image_size, num_workers=num_workers, progress=progress)
        if cache_base:
            _write_cache(cache_base, images, meta)
    keep = meta["keep"]
    data = ImageData(
        name=name, images=images,
        labels=torch.tensor([labels[i] for i in keep], dtype=torch.long), classes=classes,
        paths=[files[i] for i in keep], origin=[origin[i] for i in keep],
        skipped=list(pre_skipped or []) + [tuple(s) for s in meta["skipped"]], fingerprint=fingerprint)
    _MEMO[fingerprint] = data
    return data


def _decode_all(root: str, files: list[str], image_size: int, *, num_workers: int,
                progress: "callable | None") -> tuple[torch.Tensor, dict]:
    out = np.empty((len(files), 3, image_size, image_size), dtype=np.uint8)
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
    images = torch.from_numpy(out[:len(keep)])
    return images, {"keep": keep, "skipped": sorted(skipped)}


def _read_cache(base: str) -> tuple[torch.Tensor, dict] | None:
    try:
        with open(base + ".json") as fh:
            meta = json.load(fh)
        # Read once, straight into memory (training indexes it randomly, every epoch): one buffer the
        # size of the pixels, not a memory map plus a copy of it.
        arr = np.load(base + ".npy")
    except (OSError, ValueError):
        return None
    return torch.from_numpy(arr), meta


def _write_cache(base: str, images: torch.Tensor, meta: dict) -> None:
    os.makedirs(os.path.dirname(base), exist_ok=True)
    tmp = f"{base}.{os.getpid()}.tmp"
    try:
        with open(tmp + ".npy", "wb") as fh:
            np.save(fh, images.numpy())
        with open(tmp + ".json", "w") as fh:
            json.dump(meta, fh)
        # npy first, json last: a reader only trusts the cache once the json exists.
        os.replace(tmp + ".npy", base + ".npy")
        os.replace(tmp + ".json", base + ".json")
    except OSError as exc:  # a read-only or full cache dir must not stop training
        log.warning("could not write the decoded-image cache %s: %s", base, exc)


def _check_classes_readable(data: ImageData, root: str) -> None:
    counts = torch.bincount(data.labels, minlength=data.num_classes)
    origins = sorted(set(data.origin))
    for split in origins:
        mask = torch.tensor([o == split for o in data.origin])
        counts = torch.bincount(data.labels[mask], minlength=data.num_classes)
        empty = [data.classes[i] for i in range(data.num_classes) if counts[i] == 0]
        if empty:
            where = "" if split == "all" else f"{split}/"
            raise DataError(f"Class folder {where}{empty[0]!r} in {root!r} holds no readable image "
                            f"({len(data.skipped)} file(s) skipped); every class needs at least one.")


# ------------------------------------------------------------------- splits
def make_splits(data: ImageData, *, val_fraction: float, seed: int) -> Splits:
    """The tree's own train/val/test folders, or a stratified, seeded split of everything."""
    origin = np.array(data.origin)
    if "train" in set(data.origin):
        idx = lambda s: torch.from_numpy(np.flatnonzero(origin == s))  # noqa: E731
        test = idx("test") if "test" in set(data.origin) else None
        return Splits(train=idx("train"), val=idx("val"), test=test)
    train, val = stratified_split(data.labels, fraction=val_fraction, seed=seed)
    return Splits(train=train, val=val)


def stratified_split(labels: torch.Tensor, *, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices so each class keeps ``fraction`` of its items in the second part (at least one each)."""
    gen = torch.Generator().manual_seed(seed)
    first, second = [], []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        n_second = min(len(members) - 1, max(1, round(len(members) * fraction)))
        second.append(members[:n_second])
        first.append(members[n_second:])
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


# ---------------------------------------------------------------- transforms
class EvalPreset:
    """Deterministic: uint8 (B, 3, S, S) -> float in [0, 1]. Normalisation lives in the model."""

    def __call__(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return batch.float().div_(255.0)


class TrainPreset:
    """The seed's augmentation -- random horizontal flip, rotation within +/-15 degrees, colour jitter
    (brightness 0.2, contrast 0.2, saturation 0.2, hue 0.1) -- on a whole batch at once.

    torchvision's v2 transforms draw one set of random parameters per call, so
    calling them on a batch would flip/rotate/jitter every image the same way.
    Here every image gets its own parameters, drawn from ``generator``, and the
    ops are the v2 functional kernels' maths vectorised over the batch (the
    tests check each against ``torchvision.transforms.v2.functional``).
    """

    def __init__(self, *, flip_p: float = 0.5, degrees: float = 15.0, brightness: float = 0.2,
                 contrast: float = 0.2, saturation: float = 0.2, hue: float = 0.1) -> None:
        self.flip_p, self.degrees = flip_p, degrees
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue

    def sample_params(self, n: int, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        u = torch.rand(n, 6, generator=generator)
        return {
            "flip": u[:, 0] < self.flip_p,
            "angle": (u[:, 1] * 2 - 1) * self.degrees,
            "brightness": 1 + (u[:, 2] * 2 - 1) * self.brightness,
            "contrast": 1 + (u[:, 3] * 2 - 1) * self.contrast,
            "saturation": 1 + (u[:, 4] * 2 - 1) * self.saturation,
            "hue": (u[:, 5] * 2 - 1) * self.hue,
        }

    def __call__(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        params = self.sample_params(batch.shape[0], generator)
        return self.apply(batch, params)

    def apply(self, batch: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float (B, 3, H, W) in [0, 1], contiguous; ``params`` from ``sample_params``.

        Written for memory traffic (the CPU spends as long here as in a small model's step otherwise):
        flip and rotation are one gather on the uint8 pixels, the colour ops work in place.
        """
        # non_blocking: a plain host-to-GPU copy would wait for the GPU to finish its queue every batch.
        p = {k: v.to(batch.device, non_blocking=True) for k, v in params.items()}
        x = flip_rotate(batch, p["flip"], p["angle"])
        col = lambda v: v.view(-1, 1, 1, 1).to(torch.float32)  # noqa: E731  per-image factor, (B, 1, 1, 1)
        # Brightness: blend with black = scale, fused with uint8 -> [0, 1] floats.
        x = (x * col(p["brightness"] / 255.0)).clamp_(0, 1)
        # Contrast: blend with the mean grey level of the image (mean of grey = grey of the channel means).
        means = x.mean(dim=(-2, -1))  # (B, 3)
        grey_mean = (0.2989 * means[:, 0] + 0.587 * means[:, 1] + 0.114 * means[:, 2]).view(-1, 1, 1, 1)
        c = col(p["contrast"])
        x.mul_(c).add_((1 - c) * grey_mean).clamp_(0, 1)
        # Saturation: blend with the image's own grey version.
        s = col(p["saturation"])
        grey = _grayscale(x).mul_(1 - s)  # before x changes in place
        x.mul_(s).add_(grey).clamp_(0, 1)
        return adjust_hue_(x, p["hue"])


def flip_rotate(batch: torch.Tensor, flip: torch.Tensor, angle_deg: torch.Tensor) -> torch.Tensor:
    """Flip (where ``flip``) then rotate each image about its centre, as v2.functional.horizontal_flip then
    rotate (counter-clockwise degrees, nearest, fill 0): one gather of source pixels, any dtype and layout.
    Returns a contiguous (B, C, H, W) tensor of ``batch``'s dtype.
    """
    b, c, h, w = batch.shape
    theta = torch.deg2rad(angle_deg.to(device=batch.device, dtype=torch.float32))
    cos, sin = torch.cos(theta), torch.sin(theta)
    zero = torch.zeros_like(cos)
    # affine_grid works in normalised coordinates; the aspect-ratio terms keep non-square images undistorted.
    mat = torch.stack([torch.stack([cos, -sin * h / w, zero], -1), torch.stack([sin * w / h, cos, zero], -1)], 1)
    grid = F.affine_grid(mat, [b, 1, h, w], align_corners=False)  # (B, H, W, 2): source x, y in [-1, 1]
    # grid_sample's nearest lookup (align_corners=False): unnormalise, round half to even.
    ix = torch.round(((grid[..., 0] + 1) * w - 1) / 2)
    iy = torch.round(((grid[..., 1] + 1) * h - 1) / 2)
    inside = (ix >= 0) & (ix <= w - 1) & (iy >= 0) & (iy <= h - 1)
    ix = torch.where(flip.view(-1, 1, 1), (w - 1) - ix, ix)  # sampling the flipped image = mirrored column
    src = torch.where(inside, iy.long() * w + ix.long(), 0).view(b, 1, h * w)
    out = torch.gather(batch.flatten(2), 2, src.expand(b, c, h * w))  # (B, C, H*W)
    out.mul_(inside.view(b, 1, h * w).to(out.dtype))  # fill 0 outside the source image
    return out.view(b, c, h, w)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(-3)
    return (0.2989 * r).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3)


def adjust_hue_(x: torch.Tensor, hue_factor: torch.Tensor) -> torch.Tensor:
    """Shift hue per image by ``hue_factor`` in [-0.5, 0.5], in place (torchvision's RGB->HSV->RGB round trip)."""
    r, g, b = x.unbind(-3)
    maxc, minc = x.amax(dim=-3), x.amin(dim=-3)
    cr = maxc - minc  # chroma; also v * s, the HSV -> RGB amplitude
    grey = cr == 0
    # Hue in sixths of a turn, as torchvision's hr/hg/hb selection: red is max, else green is max, else blue.
    h6 = torch.where(maxc == r, g - b, torch.where(maxc == g, (b - r).add_(cr, alpha=2), (r - g).add_(cr, alpha=4)))
    h6 = torch.where(grey, 0.0, h6.div_(torch.where(grey, 1.0, cr)))
    h6 = h6.div_(6.0).add_(hue_factor.view(-1, 1, 1).to(h6.dtype)).remainder_(1.0).mul_(6.0)
    # HSV -> RGB in closed form, channel c = v - v*s*clamp(min(k, 4-k), 0, 1) with k = (n_c + 6h) mod 6:
    # the same values as torchvision's six-way select, at a fraction of the memory traffic.
    for channel, n in ((r, 5.0), (g, 3.0), (b, 1.0)):
        k = (h6 + n).remainder_(6.0)
        torch.sub(maxc, torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0).mul_(cr), out=channel)
    return x

