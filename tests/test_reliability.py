"""Bad input fails fast with one clear line; messy image folders train and report what was skipped.

Every rejected command must: exit 2, print exactly one line on stderr that names the bad value and
what would be accepted, print no traceback, and leave no run (and no experiment) in the store.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from fake_store import new_store
from helpers import make_image_tree
from tlexp.cli import app
from tlexp.models import TinyCNN

TINY = ["--model", "tinycnn", "--strategy", "scratch", "--image-size", "12", "--epochs", "1", "--quiet"]


@pytest.fixture()
def store(tracking_uri, tmp_path) -> str:
    """The conftest store, pre-filled with MLflow's empty schema (creating it takes seconds)."""
    new_store(tmp_path)  # writes tmp_path/mlflow.db, the file tracking_uri points to
    return tracking_uri


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def _all_runs(uri: str) -> list:
    client = MlflowClient(uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def assert_rejected(result, *needles: str, uri: str | None = None) -> str:
    """Exit 2, one line on stderr naming every needle, no traceback, nothing in the store."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("Error: ")
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    if uri is not None:
        assert _all_runs(uri) == []
        assert MlflowClient(uri).get_experiment_by_name("tl-vs-scratch") is None
    return line


# ------------------------------------------------------------------ data
def _tree(tmp_path: Path, layout: dict) -> str:
    return str(make_image_tree(tmp_path / "data", layout, size=8))


DATA_CASES = {
    # case: (builder(tmp_path) -> --data value, needles the message must hold)
    "missing": (lambda t: "flowerz", ["'flowerz'", "digits, flowers102", "existing directory"]),
    "empty": (lambda t: _made(t / "empty"), ["empty", "no class folders", "sub-folder per class"]),
    "not_a_directory": (lambda t: _file(t / "f.zip"), ["f.zip", "not a directory", "ImageFolder directory"]),
    "no_class_folders": (lambda t: str(_flat_images(t / "flat")),
                         ["flat", "no class folders", "one sub-folder per class"]),
    "one_class": (lambda t: _tree(t, {"": {"cat": 4}}), ["1 class folder", "['cat']", "at least 2"]),
    "class_without_readable_image": (lambda t: _class_of_junk(t), ["'dog'", "no readable image", "at least one"]),
    "val_classes_differ": (lambda t: _tree(t, {"train": {"a": 3, "b": 3}, "val": {"a": 2, "c": 2}}),
                           ["val/", "['a', 'c']", "['a', 'b']", "same class folders"]),
    "test_classes_differ": (lambda t: _tree(t, {"train": {"a": 3, "b": 3}, "val": {"a": 2, "b": 2},
                                                "test": {"a": 2}}),
                            ["test/", "['a']", "['a', 'b']", "same class folders"]),
}


def _made(folder: Path) -> str:
    folder.mkdir()
    return str(folder)


def _file(path: Path) -> str:
    path.write_bytes(b"PK\x03\x04")
    return str(path)


def _flat_images(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(folder / f"img{i}.png")
    return folder


def _class_of_junk(tmp_path: Path) -> str:
    root = make_image_tree(tmp_path / "data", {"": {"cat": 4}}, size=8)
    (root / "dog").mkdir()
    (root / "dog" / "0.jpg").write_bytes(b"")  # zero bytes: the only "image" of the class
    (root / "dog" / "1.png").write_bytes(b"not a png at all")
    return str(root)


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data_is_rejected_before_training(case, store, tmp_path):
    build, needles = DATA_CASES[case]
    data = build(tmp_path)
    assert_rejected(_invoke("train", *TINY, "--data", data), *needles, uri=store)


# --------------------------------------------------------------- options
OPTION_CASES = {
    "unknown_strategy": (["--strategy", "magic"], ["'magic'", "scratch, transfer, finetune"]),
    "unknown_model": (["--model", "nonet"], ["'nonet'", "resnet50", "tinycnn"]),
    "unknown_device": (["--device", "tpu"], ["'tpu'", "'auto', 'cpu', 'cuda', 'mps'"]),
    "epochs_zero": (["--epochs", "0"], ["--epochs", "got 0", "at least 1"]),
    "lr_zero": (["--lr", "0"], ["--lr", "got 0", "greater than 0"]),
    "lr_negative": (["--lr", "-0.1"], ["--lr", "-0.1", "greater than 0"]),
    "batch_size_zero": (["--batch-size", "0"], ["--batch-size", "got 0", "at least 1"]),
    "val_fraction_zero": (["--val-fraction", "0"], ["--val-fraction", "got 0", "between 0 and 1"]),
    "val_fraction_one": (["--val-fraction", "1"], ["--val-fraction", "got 1", "between 0 and 1"]),
    "val_fraction_above_one": (["--val-fraction", "1.5"], ["--val-fraction", "1.5", "between 0 and 1"]),
    "samples_per_class_too_many": (["--samples-per-class", "100000"], ["100000", "smallest class", "at most"]),
    "samples_per_class_not_a_number": (["--samples-per-class", "lots"], ["'lots'", "positive integer or 'all'"]),
    "image_size_below_minimum": (["--image-size", "4"], ["--image-size", "got 4", "at least 8"]),
    "image_size_too_small_for_model": (["--model", "efficientnet_lite0", "--strategy", "scratch", "--image-size", "16"],
                                       ["16", "efficientnet_lite0", "at least 32"]),
}


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_bad_option_is_rejected_before_training(case, store):
    args, needles = OPTION_CASES[case]
    assert_rejected(_invoke("train", *TINY, *args), *needles, uri=store)


def test_cuda_without_a_gpu_is_rejected(store, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert_rejected(_invoke("train", *TINY, "--device", "cuda"), "--device cuda", "no CUDA GPU", "auto or cpu",
                    uri=store)


def test_a_bad_second_strategy_stops_the_command_before_the_first_trains(store):
    # tinycnn has no built-in pretrained weights: 'transfer' must fail before 'scratch' spends its epochs.
    line = assert_rejected(_invoke("train", *TINY, "--strategy", "scratch,transfer"), "tinycnn", "--weights PATH",
                           uri=store)
    assert "pretrained" in line


# --------------------------------------------------------------- weights
def _weights_case(tmp_path: Path, case: str) -> str:
    path = tmp_path / "w.pt"
    if case == "missing":
        return str(tmp_path / "nowhere.pt")
    if case == "not_a_state_dict":
        torch.save([1, 2, 3], path)
    elif case == "not_torch_at_all":
        path.write_text("these are not weights\n")
    elif case == "wrong_shapes":
        torch.save(TinyCNN(width=8).state_dict(), path)
    return str(path)


WEIGHTS_CASES = {
    "missing": ["nowhere.pt", "does not exist", "saved state_dict"],
    "not_a_state_dict": ["w.pt", "does not hold a state_dict", "mapping of names to tensors"],
    "not_torch_at_all": ["w.pt", "could not be loaded safely", "weights_only=True"],
    "wrong_shapes": ["w.pt", "does not fit model tinycnn", "wrongly shaped", "state_dict saved from tinycnn"],
}


@pytest.mark.parametrize("case", sorted(WEIGHTS_CASES))
def test_bad_weights_file_is_rejected_before_training(case, store, tmp_path):
    weights = _weights_case(tmp_path, case)
    result = _invoke("train", *TINY, "--strategy", "transfer", "--weights", weights)
    assert_rejected(result, *WEIGHTS_CASES[case], uri=store)


class _Planted:
    """Unpickling this would run code: it creates a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _hostile(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": _Planted(str(marker))}, path, pickle_module=pickle)
    return path


def test_a_weights_pickle_that_runs_code_is_refused_and_never_runs(store, tmp_path):
    # Sanity: unpickling such a file the unsafe way really runs its code.
    canary = tmp_path / "CANARY"
    torch.load(_hostile(tmp_path / "canary.pt", canary), weights_only=False)
    assert canary.exists()

    marker = tmp_path / "PWNED"
    evil = _hostile(tmp_path / "evil.pt", marker)
    result = _invoke("train", *TINY, "--strategy", "transfer", "--weights", str(evil))
    assert_rejected(result, "evil.pt", "could not be loaded safely", "weights_only=True", uri=store)
    assert not marker.exists()


# ---------------------------------------------------------------- store
def test_unreachable_tracking_server_fails_in_seconds(tmp_path, monkeypatch):
    import socket
    import time

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    t0 = time.perf_counter()
    result = _invoke("train", *TINY)
    assert_rejected(result, uri, "not reachable", "start the server or set MLFLOW_TRACKING_URI")
    assert time.perf_counter() - t0 < 30  # MLflow's default retries would take minutes
    assert os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES") is None  # the quick setting does not leak


def test_store_in_a_folder_that_cannot_exist(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("")
    uri = f"sqlite:///{tmp_path / 'afile' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert_rejected(_invoke("train", *TINY), uri, "does not exist", "MLFLOW_TRACKING_URI")


@pytest.fixture()
def read_only_folder(tmp_path):
    """A folder this process cannot write: chmod for a normal user, a read-only tmpfs for root."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("running as root without permission to mount a read-only folder")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)  # lazy: cwd may be inside


def test_unwritable_store_is_rejected_before_training(read_only_folder, monkeypatch):
    uri = f"sqlite:///{read_only_folder / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert_rejected(_invoke("train", *TINY), uri, "not writable", "writable location")


def test_unwritable_artifact_folder_is_rejected_before_training(store, read_only_folder, monkeypatch):
    # The store is fine, but a new experiment's artifacts would go to ./mlruns under a read-only folder.
    monkeypatch.chdir(read_only_folder)
    line = assert_rejected(_invoke("train", *TINY), "mlruns", "not a writable folder", "--experiment",
                           uri=store)
    assert str(read_only_folder) in line


def test_resume_of_an_unknown_run_is_one_line(store):
    assert_rejected(_invoke("train", "--resume", "0123456789abcdef", "--quiet"), "'0123456789abcdef'",
                    "not found", uri=store)


# ----------------------------------------------------------- messy data
def _messy_tree(root: Path) -> dict[str, str]:
    """Two classes of good PNGs plus everything real folders contain; returns {file: expected fate}."""
    from PIL import Image

    make_image_tree(root, {"": {"cat": 4, "dog": 4}}, size=10)
    cat, dog = root / "cat", root / "dog"
    Image.new("P", (10, 10)).save(cat / "placeholder.gif")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (cat / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (cat / "empty.jpg").write_bytes(b"")
    (cat / "notes.txt").write_text("shot on a phone\n")
    Image.new("CMYK", (10, 10), (0, 200, 200, 0)).save(dog / "cmyk.jpg")
    Image.fromarray(np.full((10, 10), 40000, dtype=np.uint16)).save(dog / "deep16.png")
    assert Image.open(dog / "deep16.png").mode.startswith("I")  # really 16-bit
    return {"cat/placeholder.gif": "skip", "cat/truncated.jpg": "skip", "cat/empty.jpg": "skip",
            "cat/notes.txt": "skip", "dog/cmyk.jpg": "use", "dog/deep16.png": "use"}


def test_messy_folder_trains_and_reports_every_skipped_file(store, tmp_path):
    import pandas as pd

    fates = _messy_tree(tmp_path / "photos")
    result = _invoke("train", *TINY, "--data", str(tmp_path / "photos"), "--val-fraction", "0.25")
    assert result.exit_code == 0, result.output

    client = MlflowClient()
    (run,) = _all_runs(store)
    assert run.info.status == "FINISHED"
    skipped_expected = sorted(p for p, fate in fates.items() if fate == "skip")
    assert run.data.params["skipped_files"] == str(len(skipped_expected))
    skipped = pd.read_csv(client.download_artifacts(run.info.run_id, "data/skipped_files.csv"))
    assert sorted(skipped["path"]) == skipped_expected
    assert skipped["reason"].str.len().min() > 0  # each says why
    reasons = dict(zip(skipped["path"], skipped["reason"]))
    assert ".gif" in reasons["cat/placeholder.gif"] and ".txt" in reasons["cat/notes.txt"]
    manifest = pd.read_csv(client.download_artifacts(run.info.run_id, "data/split_manifest.csv"))
    used = set(manifest["path"])
    assert {"dog/cmyk.jpg", "dog/deep16.png"} <= used  # odd but readable formats are kept
    assert not used & set(skipped_expected)
    assert len(used) == 8 + 2


def test_sixteen_bit_png_keeps_its_contrast(tmp_path):
    from PIL import Image

    from tlexp.data import decode_image

    ramp = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (16, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    out = decode_image(str(tmp_path / "ramp.png"), 16)
    assert out.shape == (3, 16, 16) and out.dtype == np.uint8
    assert out[0, 0, 0] == 0 and out[0, 0, -1] == 255  # scaled to 8 bits, not clipped to white


# ------------------------------------------------------------ offline
def test_torchvision_weights_offline_say_where_to_put_them(store, tmp_path, monkeypatch):
    from urllib.error import URLError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    result = _invoke("train", "--model", "resnet50", "--strategy", "transfer", "--image-size", "32", "--epochs",
                     "1", "--quiet")
    line = assert_rejected(result, "resnet50", str(tmp_path / "torch-home"), "URLError", "--weights PATH",
                           uri=store)
    assert "resnet50-" in line and ".pth" in line  # the file name to copy


def test_flowers102_offline_says_where_to_put_it(store, monkeypatch):
    import urllib.request
    from urllib.error import URLError

    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    cache = os.environ["TLEXP_CACHE_DIR"]
    result = _invoke("train", *TINY, "--data", "flowers102")
    assert_rejected(result, "Flowers102", os.path.join(cache, "flowers102", "flowers-102"), "URLError",
                    "imagelabels.mat", "--data PATH", uri=store)


def test_training_on_builtin_data_and_weights_uses_no_network(store, monkeypatch):
    """Only explicit dataset/weights downloads may touch the network; a normal run never connects."""
    import socket

    attempts = []

    def refuse(sock, address, *args):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError("network disabled by the test")
        return real_connect(sock, address, *args)

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    result = _invoke("train", "--strategy", "transfer", "--image-size", "32", "--samples-per-class", "3",
                     "--val-fraction", "0.05", "--epochs", "1", "--feature-cache-views", "1", "--quiet")
    assert result.exit_code == 0, result.output
    assert attempts == []


# ---------------------------------------------------------------- compare
def test_compare_unknown_experiment_is_one_line(store):
    assert_rejected(_invoke("compare", "--experiment", "nope", "--no-log"), "'nope'", "existing experiments")
    assert _all_runs(store) == [] and not Path("reports").exists()


def test_compare_without_finished_runs_is_one_line(store):
    from fake_store import log_fake_run

    client = MlflowClient()
    exp = client.create_experiment("tl-vs-scratch")
    log_fake_run(client, exp, strategy="scratch", val_acc=[0.2, 0.3], status="KILLED")
    assert_rejected(_invoke("compare", "--experiment", "tl-vs-scratch"), "'tl-vs-scratch'",
                    "no FINISHED training runs", "tlexp train --experiment tl-vs-scratch")
    assert len(_all_runs(store)) == 1  # no comparison run was logged
    assert not Path("reports").exists()


def test_compare_into_an_unwritable_folder_is_one_line(store, read_only_folder):
    assert_rejected(_invoke("compare", "--output", str(read_only_folder / "report")), str(read_only_folder),
                    "not writable", "--output a writable folder", uri=store)


def test_compare_into_a_path_below_a_file_is_one_line(store, tmp_path):
    (tmp_path / "taken").write_text("")
    assert_rejected(_invoke("compare", "--output", str(tmp_path / "taken" / "report")), "taken",
                    "is a file, not a folder", "--output a writable folder", uri=store)


def test_a_deleted_experiment_is_rejected_before_training(store):
    client = MlflowClient()
    client.delete_experiment(client.create_experiment("tl-vs-scratch"))
    line = assert_rejected(_invoke("train", *TINY), "'tl-vs-scratch'", "is deleted", "another --experiment")
    assert "mlflow experiments restore" in line
    assert _all_runs(store) == []
