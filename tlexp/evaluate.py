"""Score a logged image model on a labelled ImageFolder it never saw (another source, a later batch).

Accuracy comes with its 95% Clopper-Pearson interval (``scipy.stats.binomtest``): a new set is often
small, and 45/50 is not 90% to the decimal. Per-class accuracy and the confusion matrix say where it
errs. The MLflow run (``tlexp.kind=evaluation``, naming the model's run) is written by
``tracking.evaluation``; compare leaves such runs out of its training table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

from .dataset import DataError
from .folders import scan_image_folder


@dataclass
class Evaluation:
    model: str  # as the user named it
    model_uri: str
    model_run_id: str | None
    data: str
    classes: list[str]  # the model's classes (the confusion matrix's order)
    n: int
    correct: int
    ci_low: float
    ci_high: float
    per_class: Any  # DataFrame: class, support, correct, accuracy
    confusion: Any  # numpy (C, C): rows true class, columns predicted
    skipped: list[tuple[str, str]] = field(default_factory=list)
    run_id: str | None = None

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else float("nan")


def check_classes(folder_classes: list[str], model_classes: list[str], data: str) -> None:
    """Every class folder must be one of the model's classes (a set may lack some of them)."""
    unknown = sorted(set(folder_classes) - set(model_classes))
    if unknown:
        raise DataError(f"--data {data!r} has class folder(s) {unknown} that the model does not know; its "
                        f"classes are {sorted(model_classes)}. Rename or remove those folders.")


def evaluate_model(model: str, data: str, *, batch_size: int = 32, device: str = "auto", log: bool = True,
                   progress: Callable[[int, int], None] | None = None) -> Evaluation:
    """Predict every image of ``data`` with ``model`` and score it; log an evaluation run unless ``log`` is False."""
    import numpy as np
    import pandas as pd
    from scipy.stats import binomtest

    from .predict import load_image_model, model_classes, predict_files
    from .tracking.models import image_model_uri, model_facts

    root = os.path.abspath(os.path.expanduser(data))
    scan = scan_image_folder(root)  # raises DataError for a missing or malformed tree
    uri = image_model_uri(model)
    classes, model_run_id = model_facts(uri)
    check_classes(scan.classes, classes, data)  # before decoding a single image
    loaded = load_image_model(uri, device=device)
    classes = model_classes(loaded) or classes
    files = [os.path.join(root, f) for f in scan.files]
    truth = {path: scan.classes[label] for path, label in zip(files, scan.labels)}
    result = predict_files(loaded, files, batch_size=batch_size, top_k=1,
                           progress=None if progress is None else (lambda n: progress(n, len(files))))
    frame = result.frame
    if frame.empty:
        raise DataError(f"--data {data!r}: none of its {len(files)} images could be read; nothing to score.")
    index = {c: i for i, c in enumerate(classes)}
    true_i = np.array([index[truth[p]] for p in frame["path"]])
    pred_i = np.array([index[label] for label in frame["label"]])
    confusion = np.zeros((len(classes), len(classes)), dtype=int)
    np.add.at(confusion, (true_i, pred_i), 1)
    support, hits = confusion.sum(1), np.diag(confusion)
    per_class = pd.DataFrame({"class": classes, "support": support, "correct": hits,
                              "accuracy": [h / s if s else float("nan") for h, s in zip(hits, support)]})
    n, correct = int(len(frame)), int(hits.sum())
    interval = binomtest(correct, n).proportion_ci(confidence_level=0.95)
    evaluation = Evaluation(model=model, model_uri=uri, model_run_id=model_run_id, data=root, classes=classes,
                            n=n, correct=correct, ci_low=float(interval.low), ci_high=float(interval.high),
                            per_class=per_class, confusion=confusion, skipped=result.skipped + list(scan.skipped))
    if log:
        from .plots import confusion_figure
        from .tracking.evaluation import log_evaluation_run

        figure = confusion_figure(confusion, classes, title=f"Confusion matrix ({os.path.basename(root)})")
        evaluation.run_id = log_evaluation_run(evaluation, figure=figure, predictions=frame)
    return evaluation
