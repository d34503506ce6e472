"""The logged image model: photos in, class names out, with no tlexp installed.

MLflow "models from code": ``tracking.models`` logs this file as the pyfunc's ``python_model`` with
``imagefile.py`` as its code, the classifier as a ``torch.export`` program (``program.pt2``) and the
run's classes and image size as ``image_model.json``. Loading it needs torch, PIL, numpy, pandas and
mlflow only.

Input: a DataFrame whose first column (named ``image``) holds file paths, raw bytes or base64 strings.
Each image is decoded, turned upright, made RGB and squashed to the run's image size by
``imagefile.decode_image`` -- the decoder training used -- and scaled to [0, 1]; the program normalises
itself, as in validation. Output: one row per image with ``label``, ``probability``, ``top_labels``,
``top_probabilities`` and ``error`` (empty, or why that image could not be read: its row has no label).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import mlflow
import numpy as np
import pandas as pd

try:  # the logged model's code folder holds imagefile.py; while logging, tlexp's own copy is imported
    from imagefile import decode_image, open_image_value
except ImportError:
    from tlexp.imagefile import decode_image, open_image_value

DEFAULT_BATCH_SIZE = 32
DEFAULT_TOP_K = 5
OUTPUT_COLUMNS = ["label", "probability", "top_labels", "top_probabilities", "error"]


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """An exported classifier behind the same decoding as training's validation."""

    def load_context(self, context: Any) -> None:
        import torch

        with open(context.artifacts["config"], encoding="utf-8") as fh:
            config = json.load(fh)
        self.classes: list[str] = list(config["classes"])
        self.image_size = int(config["image_size"])
        self.exif_transpose = bool(config.get("exif_transpose", True))
        self.device = torch.device("cpu")
        self.module = torch.export.load(context.artifacts["program"]).module()

    def to(self, device: Any) -> "ImageClassifier":
        """Run the program on ``device`` (``model.unwrap_python_model().to("cuda")``)."""
        import torch

        self.device = torch.device(device)
        self.module = self.module.to(self.device)
        return self

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        params = params or {}
        batch_size = max(1, int(params.get("batch_size") or DEFAULT_BATCH_SIZE))
        top_k = max(1, min(int(params.get("top_k") or DEFAULT_TOP_K), len(self.classes)))
        if isinstance(model_input, dict):
            model_input = {"image": model_input.get("image", next(iter(model_input.values()), []))}
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame({"image": model_input})
        column = frame["image"] if "image" in frame.columns else frame.iloc[:, 0]
        values: list[Any] = []
        for value in column:  # {"image": [a, b]} arrives as one row holding a list: one row per image
            values.extend(value) if isinstance(value, (list, tuple, np.ndarray)) else values.append(value)
        rows: list[dict[str, Any]] = []
        with ThreadPoolExecutor(max_workers=4) as pool:  # PIL releases the GIL while decoding
            for start in range(0, len(values), batch_size):
                rows.extend(self._predict_batch(pool, values[start:start + batch_size], top_k))
        return pd.DataFrame(rows, columns=OUTPUT_COLUMNS)

    def _predict_batch(self, pool: ThreadPoolExecutor, values: list[Any], top_k: int) -> list[dict[str, Any]]:
        import torch

        decoded = list(pool.map(self._decode, values))
        good = [i for i, d in enumerate(decoded) if isinstance(d, np.ndarray)]
        rows: list[dict[str, Any]] = [
            {"label": None, "probability": float("nan"), "top_labels": [], "top_probabilities": [], "error": d}
            for d in decoded]
        if not good:
            return rows
        pixels = torch.from_numpy(np.stack([decoded[i] for i in good])).to(self.device)
        with torch.inference_mode():
            logits = self.module(pixels.float().div_(255.0))  # [0, 1], as EvalPreset: the program normalises
            probs = torch.softmax(logits.float(), dim=1)
            top_p, top_i = probs.topk(top_k, dim=1)
        for row, p, idx in zip(good, top_p.cpu().tolist(), top_i.cpu().tolist()):
            labels = [self.classes[j] for j in idx]
            rows[row] = {"label": labels[0], "probability": p[0], "top_labels": labels, "top_probabilities": p,
                         "error": ""}
        return rows

    def _decode(self, value: Any) -> np.ndarray | str:
        try:
            return decode_image(open_image_value(value), self.image_size, exif_transpose=self.exif_transpose)
        except Exception as exc:  # unreadable, truncated, not an image: that row says why, the rest go on
            return f"{type(exc).__name__}: {exc}"[:300]


mlflow.models.set_model(ImageClassifier())
