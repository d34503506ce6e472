"""The models a training run logs: the image pyfunc (photos in, class names out, no tlexp needed) and the
pickled pytorch module, each logged, loaded back and used with a batch size other than the example's."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from typer.testing import CliRunner

from helpers import make_image_tree
from tlexp.cli import app
from tlexp.data import decode_image
from tlexp.tracking.models import IMAGE_MODEL, PYTORCH_MODEL, image_model_uri, run_model


@pytest.fixture()
def trained(tracking_uri, tmp_path):
    """One finished tinycnn run on a two-class tree: (run id, data folder)."""
    data = make_image_tree(tmp_path / "data", {"": {"ants": 6, "bees": 6}}, size=20)
    result = CliRunner().invoke(app, ["train", "--data", str(data), "--model", "tinycnn", "--strategy", "scratch",
                                      "--image-size", "12", "--epochs", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    run = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("tl-vs-scratch").experiment_id])[0]
    return run.info.run_id, data


def _validation_probabilities(module: torch.nn.Module, paths: list[str], size: int) -> torch.Tensor:
    """What validation computes for these files: decode_image -> [0, 1] floats -> the module -> softmax."""
    pixels = torch.from_numpy(np.stack([decode_image(p, size) for p in paths])).float() / 255.0
    with torch.no_grad():
        return torch.softmax(module(pixels), dim=1)


def test_image_model_takes_paths_bytes_and_base64_and_answers_as_validation_does(trained):
    import mlflow
    from mlflow.types import DataType

    run_id, data = trained
    paths = sorted(str(p) for p in data.rglob("*.png"))
    raw = open(paths[0], "rb").read()
    model = mlflow.pyfunc.load_model(image_model_uri(run_id))
    out = model.predict(pd.DataFrame({"image": paths + [raw, base64.b64encode(raw).decode()]}),
                        params={"batch_size": 5, "top_k": 2})

    module = mlflow.pytorch.load_model(f"runs:/{run_id}/{PYTORCH_MODEL}")
    expected = _validation_probabilities(module, paths, 12)
    classes = ["ants", "bees"]
    assert list(out["label"][:len(paths)]) == [classes[i] for i in expected.argmax(1).tolist()]
    assert np.allclose(out["probability"][:len(paths)], expected.max(1).values.numpy(), atol=1e-5)
    # the same photo as a path, as bytes and as base64 gives the same answer
    assert out["probability"].iloc[-1] == pytest.approx(out["probability"].iloc[0], abs=1e-6)
    assert out["probability"].iloc[-2] == pytest.approx(out["probability"].iloc[0], abs=1e-6)
    assert all(len(t) == 2 and t[0] == lab for t, lab in zip(out["top_labels"], out["label"]))
    assert (out["error"] == "").all()
    as_dict = model.predict({"image": paths[:2]})  # a dict of lists, as MLflow's docs write inputs
    assert list(as_dict["label"]) == list(out["label"][:2])
    schema = model.metadata.get_input_schema()
    assert schema.input_names() == ["image"] and schema.input_types()[0] == DataType.string
    assert {p.name for p in model.metadata.get_params_schema().params} == {"batch_size", "top_k"}


def test_an_unreadable_image_gets_an_error_row_and_the_others_their_labels(trained, tmp_path):
    import mlflow

    run_id, data = trained
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    good = str(next(data.rglob("*.png")))
    out = mlflow.pyfunc.load_model(image_model_uri(f"runs:/{run_id}")).predict(
        pd.DataFrame({"image": [str(broken), good]}))
    assert pd.isna(out["label"][0]) and "cannot identify image" in out["error"][0]
    assert out["label"][1] in ("ants", "bees") and out["error"][1] == ""


def test_image_model_loads_and_predicts_where_tlexp_cannot_be_imported(trained, tmp_path):
    from mlflow.artifacts import download_artifacts

    run_id, data = trained
    local = download_artifacts(image_model_uri(run_id), dst_path=str(tmp_path / "copy"))
    poisoned = tmp_path / "poisoned" / "tlexp"
    poisoned.mkdir(parents=True)
    (poisoned / "__init__.py").write_text("raise ImportError('tlexp is not installed here')\n")
    script = textwrap.dedent(f"""
        import sys
        try:
            import tlexp
        except ImportError:
            pass
        else:
            sys.exit("tlexp was importable")
        import mlflow, pandas as pd
        out = mlflow.pyfunc.load_model({local!r}).predict(pd.DataFrame({{"image": [{str(next(data.rglob('*.png')))!r}]}}))
        print("LABEL", out["label"][0], "tlexp" in sys.modules and sys.modules["tlexp"] is not None)
    """)
    env = {**os.environ, "PYTHONPATH": str(poisoned.parent)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    label_line = [line for line in done.stdout.splitlines() if line.startswith("LABEL")][0]
    assert label_line.split()[1] in ("ants", "bees")


def test_pytorch_flavour_is_a_pt2_program_that_takes_another_batch_size(trained):
    import mlflow
    from mlflow.artifacts import download_artifacts

    run_id, data = trained
    client = MlflowClient()
    logged = run_model(client, run_id, PYTORCH_MODEL)
    assert logged is not None and run_model(client, run_id, IMAGE_MODEL) is not None
    local = download_artifacts(logged.model_uri)
    assert os.path.isfile(os.path.join(local, "data", "model.pt2"))  # the pt2 format, not a pickle
    module = mlflow.pytorch.load_model(logged.model_uri)
    batch = torch.rand(5, 3, 12, 12)  # the logged example has 2 images
    with torch.no_grad():
        logits = module(batch)
    assert logits.shape == (5, 2)
    # the same numbers as the image model's program, which is what serving runs
    image_model = mlflow.pyfunc.load_model(image_model_uri(run_id)).unwrap_python_model()
    with torch.no_grad():
        assert torch.allclose(image_model.module(batch), logits, atol=1e-5)
    # the pyfunc of the same flavour takes the same batch of 5 as numpy
    out = mlflow.pyfunc.load_model(logged.model_uri).predict(batch.numpy())
    assert np.asarray(out).shape == (5, 2)


def test_a_model_that_is_not_a_run_or_uri_is_one_clear_error(tracking_uri):
    from tlexp.tracking import TrackingError

    with pytest.raises(TrackingError, match="not a run id"):
        image_model_uri("champion")
    with pytest.raises(TrackingError, match="not in the tracking store"):
        image_model_uri("0" * 32)
