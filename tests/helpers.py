"""Small builders shared by tests: tiny image trees and tiny pretrained weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_image_tree(root: Path, layout: dict[str, dict[str, int]], *, size: int = 12, seed: int = 0) -> Path:
    """Write PNGs: layout = {"train": {"cat": 5, "dog": 5}, "val": {...}} or {"": {...}} for no splits.

    Each class gets its own colour so that a tiny model can learn it.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, classes in layout.items():
        for ci, (cls, count) in enumerate(sorted(classes.items())):
            folder = root / split / cls if split else root / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                base = np.zeros((size, size, 3), dtype=np.uint8)
                base[..., ci % 3] = 200
                noise = rng.integers(0, 40, size=(size, size, 3), dtype=np.uint8)
                Image.fromarray(base + noise).save(folder / f"{cls}_{i}.png")
    return root


def tiny_weights(path: Path, seed: int = 0) -> Path:
    """A state_dict of tlexp's TinyCNN, standing in for 'pretrained' weights."""
    import torch

    from tlexp.models import TinyCNN

    torch.manual_seed(seed)
    torch.save(TinyCNN().state_dict(), path)
    return path


def all_runs(uri: str | None = None) -> list:
    """Every run of every active experiment in the store (the current one by default)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def v2_reference(image, params: dict[str, float]):
    """One uint8 image through torchvision.transforms.v2.functional with given parameters: what
    ``TrainPreset.apply`` must compute for that image."""
    from torchvision.transforms import v2

    x = image.float() / 255.0
    if params["flip"]:
        x = v2.functional.horizontal_flip(x)
    x = v2.functional.rotate(x, float(params["angle"]), interpolation=v2.InterpolationMode.NEAREST)
    x = v2.functional.adjust_brightness(x, float(params["brightness"]))
    x = v2.functional.adjust_contrast(x, float(params["contrast"]))
    x = v2.functional.adjust_saturation(x, float(params["saturation"]))
    return v2.functional.adjust_hue(x, float(params["hue"]))


def assert_matches_v2(out, batch, params) -> None:
    """Each augmented image in ``out`` equals ``v2_reference`` of its source image with its own parameters."""
    import torch

    for i in range(len(batch)):
        ref = v2_reference(batch[i], {k: v[i].item() for k, v in params.items()})
        off = (out[i] - ref).abs().amax(dim=0) > 1e-4
        # Nearest-neighbour rotation may round a rare pixel exactly on a tie differently; nothing else differs.
        assert off.float().mean() <= 0.001, f"image {i}: {int(off.sum())} pixels differ"
        assert torch.allclose(out[i][:, ~off], ref[:, ~off], atol=1e-4)


def stop_process(proc, *, timeout: float = 20) -> None:
    """Terminate a server a test started; kill it if it does not exit within ``timeout`` seconds."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
