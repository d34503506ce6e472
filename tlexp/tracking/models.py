"""The models a training run logs, and finding them again.

Every finished run logs two MLflow models of the same weights:

- ``model``: the ``mlflow.pytorch`` flavour, saved explicitly as ``pt2`` (a ``torch.export`` program,
  MLflow's safe format; pickle would run code on load and need tlexp importable):
  ``mlflow.pytorch.load_model`` gives back a module taking float images in [0, 1] of the run's size,
  any batch size (MLflow makes the batch dimension dynamic from an example of 2 images), giving logits.
- ``image_model``: a pyfunc "model from code" (``tlexp/pyfunc_model.py`` + ``tlexp/imagefile.py``) around
  a ``torch.export`` program (pt2) with a dynamic batch dimension. Its input is images (paths, bytes or
  base64 strings); it decodes them as training did and answers class names. It loads without tlexp,
  so ``mlflow models serve`` and ``mlflow.pyfunc.load_model`` work anywhere torch and PIL do.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

from .store import TrackingError, _first_line

PYTORCH_MODEL = "model"
IMAGE_MODEL = "image_model"
PYTORCH_FORMAT = "pt2"
_PACKAGE = Path(__file__).resolve().parent.parent
PYFUNC_CODE = _PACKAGE / "pyfunc_model.py"
IMAGE_CODE = _PACKAGE / "imagefile.py"


def log_run_models(model: Any, *, input_example: Any, class_names: list[str], exif_transpose: bool = True) -> None:
    """Log both models into the active run. ``input_example``: float (B >= 2, 3, S, S) in [0, 1]."""
    image_size = int(input_example.shape[-1])
    with _quiet_downloads():
        _log_both(model, input_example=input_example, class_names=class_names, image_size=image_size,
                  exif_transpose=exif_transpose)


@contextlib.contextmanager
def _quiet_downloads() -> Iterator[None]:
    """No "Downloading artifacts" bars while MLflow copies the program into the model (a user's own
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR wins)."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    saved = os.environ.get(key)
    os.environ.setdefault(key, "false")
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(key, None)


def _log_both(model: Any, *, input_example: Any, class_names: list[str], image_size: int,
              exif_transpose: bool) -> None:
    import mlflow
    import torch

    mlflow.pytorch.log_model(model, name=PYTORCH_MODEL, input_example=input_example,
                             serialization_format=PYTORCH_FORMAT, pip_requirements=requirements(),
                             metadata={"class_names": class_names})
    with tempfile.TemporaryDirectory() as tmp:
        program = os.path.join(tmp, "program.pt2")
        batch = torch.export.Dim("batch", min=1, max=65536)
        example = torch.as_tensor(input_example, dtype=torch.float32)
        with torch.no_grad():
            exported = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        torch.export.save(exported, program)
        # An artifact, not model_config: MLflow would log model_config as the training run's params.
        config = os.path.join(tmp, "image_model.json")
        with open(config, "w", encoding="utf-8") as fh:
            json.dump({"classes": list(class_names), "image_size": image_size, "exif_transpose": exif_transpose},
                      fh)
        with warnings.catch_warnings():  # an input example would make MLflow load the model to check it
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            mlflow.pyfunc.log_model(
                name=IMAGE_MODEL, python_model=str(PYFUNC_CODE), code_paths=[str(IMAGE_CODE)],
                artifacts={"program": program, "config": config}, signature=image_signature(),
                pip_requirements=requirements(("torch", "pillow", "numpy", "pandas", "mlflow")),
                metadata={"class_names": class_names, "image_size": image_size})


def image_signature() -> Any:
    """What the image model takes and gives, as MLflow's signature states it."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("string", "image")])  # a file path, a base64 string, or raw bytes
    outputs = Schema([ColSpec("string", "label"), ColSpec("double", "probability"),
                      ColSpec(Array("string"), "top_labels"), ColSpec(Array("double"), "top_probabilities"),
                      ColSpec("string", "error")])
    params = ParamSchema([ParamSpec("batch_size", "long", 32), ParamSpec("top_k", "long", 5)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def requirements(dists: tuple[str, ...] = ("torch", "torchvision", "timm", "numpy", "cloudpickle", "mlflow")
                 ) -> list[str]:
    """What loading a logged model needs, pinned to the versions that trained it (explicit: MLflow's
    inference re-imports the model in a subprocess, ~10 s a run)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in dists:
        with contextlib.suppress(PackageNotFoundError):
            out.append(f"{dist}=={version(dist).split('+')[0]}")
    return out


def run_model(client: Any, run_id: str, name: str = IMAGE_MODEL) -> Any | None:
    """The finished logged model ``name`` of a run (None when it has none)."""
    from mlflow.entities import LoggedModelStatus

    run = client.get_run(run_id)
    found = client.search_logged_models([run.info.experiment_id],
                                        filter_string=f"source_run_id = '{run_id}' AND name = '{name}'")
    ready = [m for m in found if m.status == LoggedModelStatus.READY]
    return ready[-1] if ready else None


def image_model_uri(model: str) -> str:
    """The MLflow URI of the image model that ``model`` names: a run id or ``runs:/RUN_ID`` (that run's
    image model), ``runs:/RUN_ID/NAME``, ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``models:/MODEL_ID``
    or a local model folder."""
    import re

    from mlflow.tracking import MlflowClient

    text = model.strip()
    if text.startswith("models:/") or os.path.isfile(os.path.join(text, "MLmodel")):
        return text
    match = re.fullmatch(r"(?:runs:/)?([0-9a-f]{32})/?", text)
    if match is None:
        if text.startswith("runs:/"):
            return text
        raise TrackingError(f"--model {model!r} is not a run id, runs:/RUN_ID, models:/NAME@ALIAS, "
                            f"models:/NAME/VERSION or a model folder; pass one of those.")
    client = MlflowClient()
    try:
        found = run_model(client, match.group(1))
    except Exception as exc:  # noqa: BLE001 - an unknown run id, or a store that cannot be read
        raise TrackingError(f"--model {model!r}: run {match.group(1)} is not in the tracking store "
                            f"({type(exc).__name__}).") from None
    if found is None:
        raise TrackingError(f"Run {match.group(1)} has no image model ({IMAGE_MODEL}); only training runs "
                            f"that finished with this version of tlexp log one.")
    return found.model_uri


def model_facts(uri: str) -> tuple[list[str], str | None]:
    """(class names, source run id) of a logged image model, from its MLmodel file only (no weights)."""
    from mlflow.models import get_model_info

    try:
        info = get_model_info(uri)
    except Exception as exc:  # noqa: BLE001 - an unknown name, alias or version
        raise TrackingError(f"Model {uri!r} could not be found ({type(exc).__name__}: {_first_line(exc)}).") from None
    return list((info.metadata or {}).get("class_names") or []), info.run_id
