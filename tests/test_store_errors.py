"""No traceback, no hang, for any store problem, in every command: a server that is down, a file that is
not an MLflow database, a folder that does not exist, a store that cannot be written."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from fake_store import log_fake_run, new_store
from tlexp.cli import app

TINY = ["--model", "tinycnn", "--image-size", "12", "--samples-per-class", "4", "--epochs", "1", "--quiet"]
COMMANDS = {"train": ["train", *TINY], "sweep": ["sweep", "--strategies", "scratch", "--seeds", "0", *TINY],
            "sweep --dry-run": ["sweep", "--dry-run"], "compare": ["compare", "--no-log"]}


def _one_line(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _free_port() -> int:
    with socket.socket() as s:  # a port nobody listens on once it is closed
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_server_that_is_down_is_one_line_within_seconds(command, tmp_path, monkeypatch):
    uri = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    t0 = time.perf_counter()
    result = CliRunner().invoke(app, COMMANDS[command])
    _one_line(result, uri, "is not reachable", "start the server")
    assert time.perf_counter() - t0 < 15  # MLflow's own retries take minutes
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # the quick settings do not leak


def test_compare_against_a_server_that_is_down_ends_in_seconds_as_a_command(tmp_path):
    """The whole command, imports included, as a user runs it."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{_free_port()}",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tlexp", "compare"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert time.perf_counter() - t0 < 15
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "is not reachable" in done.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_a_file_that_is_not_an_mlflow_database_is_one_line_and_left_alone(command, tmp_path, monkeypatch):
    bad = tmp_path / "notes.db"
    bad.write_bytes(b"these are my notes, not a database\n" * 20)
    uri = f"sqlite:///{bad}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    _one_line(CliRunner().invoke(app, COMMANDS[command]), str(bad), "is not an MLflow database")
    assert bad.read_bytes() == b"these are my notes, not a database\n" * 20


@pytest.mark.parametrize("command", ["compare", "sweep --dry-run"])
def test_read_only_commands_refuse_a_missing_folder_instead_of_creating_it(command, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'no' / 'such' / 'x.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    _one_line(CliRunner().invoke(app, COMMANDS[command]), "does not exist")
    assert not (tmp_path / "no").exists()


def test_read_only_commands_create_no_store_file(tmp_path, monkeypatch):
    path = tmp_path / "fresh.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{path}")
    _one_line(CliRunner().invoke(app, ["compare", "--tracking-uri", f"sqlite:///{path}"]),
              "does not exist yet, so there is nothing to compare")
    planned = CliRunner().invoke(app, ["sweep", "--strategies", "scratch", "--seeds", "0,1",
                                       "--samples-per-class", "5", "--dry-run"])
    assert planned.exit_code == 0 and "2 cells: 0 already finished, 2 to run." in planned.output
    assert not path.exists()


@pytest.fixture()
def frozen_store(tmp_path):
    """A store holding two finished runs, seen through a folder this process cannot write: chmod for a normal
    user; for root, who writes through any mode, a read-only bind mount of the folder it was written in."""
    written, folder = tmp_path / "written", tmp_path / "store"
    written.mkdir()
    folder.mkdir()
    client = MlflowClient(new_store(written))
    eid = client.create_experiment("tl-vs-scratch", artifact_location=str(tmp_path / "artifacts"))
    for strategy in ("scratch", "transfer"):
        log_fake_run(client, eid, strategy=strategy, val_acc=[0.5, 0.6])
    root = os.geteuid() == 0
    if root:
        mounted = subprocess.run(["mount", "--bind", str(written), str(folder)], capture_output=True)
        if mounted.returncode != 0 or subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)],
                                                     capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)
            pytest.skip("running as root without permission to mount a read-only folder")
    else:
        folder.rmdir()
        written.rename(folder)
        for path in (folder, *folder.iterdir()):
            path.chmod(0o555)
    try:
        yield f"sqlite:///{folder / 'mlflow.db'}"
    finally:
        if root:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)
        else:
            for path in (folder, *folder.iterdir()):
                path.chmod(0o755)


def test_compare_on_a_store_that_cannot_be_written_still_writes_its_report(frozen_store, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["compare", "--tracking-uri", frozen_store, "--output", str(out)])
    assert result.exit_code == 2, result.output
    assert (out / "report.html").is_file()
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: the report was written, but not logged to MLflow") and "--no-log" in last
    assert "Traceback" not in result.output
    client = MlflowClient(frozen_store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(r.data.tags.get("tlexp.kind") for r in runs) == ["train", "train"]  # no comparison run
    again = CliRunner().invoke(app, ["compare", "--tracking-uri", frozen_store, "--output", str(out), "--no-log"])
    assert again.exit_code == 0, again.output
