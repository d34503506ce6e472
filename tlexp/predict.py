"""Predict with a logged image model: files, folders or globs in, ``predictions.csv`` out.

The model (``tracking.models.IMAGE_MODEL``) does the decoding and the resizing exactly as training's
validation did; this module only finds the files, feeds them in batches and collects the answers. A
file the model cannot read gets no row: it is counted and listed in ``skipped``.
"""

from __future__ import annotations

import glob
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .dataset import DataError
from .folders import IMG_EXTENSIONS

PREDICTION_COLUMNS = ["path", "label", "probability", "top_k"]


@dataclass
class Predictions:
    """What ``predict`` found: one row per readable image (PREDICTION_COLUMNS), the files it skipped."""

    frame: Any  # pandas.DataFrame
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    seconds: float = 0.0
    output: Path | None = None

    @property
    def images_per_s(self) -> float:
        return len(self.frame) / self.seconds if self.seconds > 0 else 0.0


def find_images(patterns: Sequence[str]) -> list[str]:
    """Image files named by ``patterns``: files, folders (searched recursively, image extensions only) or
    globs, in the order given, each once. Raises DataError for a pattern that names nothing."""
    found: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True)) if glob.has_magic(pattern) \
            else [os.path.expanduser(pattern)]
        files: list[str] = []
        for match in matches:
            if os.path.isdir(match):
                for folder, dirs, names in os.walk(match):
                    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                    files += [os.path.join(folder, n) for n in sorted(names)
                              if not n.startswith(".") and n.lower().endswith(IMG_EXTENSIONS)]
            elif os.path.exists(match):
                files.append(match)  # named explicitly: tried whatever its extension
        if not files:
            raise DataError(f"{pattern!r} names no image file (it is not an existing file, a folder holding "
                            f"{', '.join(IMG_EXTENSIONS[:3])}... files, or a glob matching some); pass files, "
                            f"folders or globs.")
        found += files
    return list(dict.fromkeys(found))


def load_image_model(model: str, *, device: str = "auto") -> Any:
    """The pyfunc image model that ``model`` names (see ``tracking.models.image_model_uri``), on ``device``."""
    import mlflow

    from .engine import resolve_device
    from .tracking.models import image_model_uri
    from .tracking.store import TrackingError

    uri = image_model_uri(model)
    try:
        where = str(resolve_device(device))
    except ValueError as exc:
        raise DataError(str(exc)) from None
    try:
        loaded = mlflow.pyfunc.load_model(uri)
    except Exception as exc:  # noqa: BLE001 - an unknown name or alias, a model of another kind
        raise TrackingError(f"--model {model!r} could not be loaded as an image model ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}).") from None
    try:
        python_model = loaded.unwrap_python_model()
    except Exception:  # noqa: BLE001 - a flavour's own pyfunc (e.g. the pytorch one) wraps no PythonModel
        python_model = None
    if not hasattr(python_model, "to") or not hasattr(python_model, "classes"):
        raise TrackingError(f"--model {model!r} is not a tlexp image model (a pyfunc taking images); pass a "
                            f"training run id, runs:/RUN_ID or models:/NAME@champion.")
    python_model.to(where)
    return loaded

def model_classes(loaded: Any) -> list[str]:
    """The class names an image model answers with (from its metadata)."""
    return list((loaded.metadata.metadata or {}).get("class_names") or [])


def predict_files(loaded: Any, files: Sequence[str], *, batch_size: int = 32, top_k: int = 3,
                  progress: Callable[[int], None] | None = None) -> Predictions:
    """Run ``loaded`` over ``files`` in batches of ``batch_size``; ``progress(n)`` after each batch."""
    import pandas as pd

    if batch_size < 1:
        raise DataError(f"--batch-size {batch_size} must be at least 1.")
    rows: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    start = time.perf_counter()
    for first in range(0, len(files), batch_size):
        chunk = list(files[first:first + batch_size])
        out = loaded.predict(pd.DataFrame({"image": chunk}), params={"batch_size": batch_size, "top_k": top_k})
        for path, answer in zip(chunk, out.to_dict("records")):
            if answer["error"]:
                skipped.append((path, answer["error"]))
                continue
            top = " ".join(f"{lab}:{p:.4f}" for lab, p in zip(answer["top_labels"], answer["top_probabilities"]))
            rows.append({"path": path, "label": answer["label"], "probability": float(answer["probability"]),
                         "top_k": top})
        if progress is not None:
            progress(len(chunk))
    return Predictions(frame=pd.DataFrame(rows, columns=PREDICTION_COLUMNS), skipped=skipped,
                       seconds=time.perf_counter() - start)


def predict(model: str, patterns: Sequence[str], *, output: str | os.PathLike[str] = "predictions.csv",
            batch_size: int = 32, top_k: int = 3, device: str = "auto",
            progress: Callable[[int, int], None] | None = None) -> Predictions:
    """Find the images, load the model, predict, write ``output`` (CSV of PREDICTION_COLUMNS)."""
    files = find_images(patterns)  # before loading the model: a typo costs nothing
    if batch_size < 1:
        raise DataError(f"--batch-size {batch_size} must be at least 1.")
    loaded = load_image_model(model, device=device)
    result = predict_files(loaded, files, batch_size=batch_size, top_k=top_k,
                           progress=None if progress is None else (lambda n: progress(n, len(files))))
    result.output = Path(output)
    result.output.parent.mkdir(parents=True, exist_ok=True)
    result.frame.to_csv(result.output, index=False)
    return result
