"""A team's shared tracking server: `mlflow server` backed by PostgreSQL with a local artifact root.

Needs a PostgreSQL server: .ci/run starts one and exports TLEXP_TEST_POSTGRES_URI, e.g.
postgresql+psycopg://postgres:PASSWORD@127.0.0.1:5432/tlexp_test. Each test session works in a
fresh database of its own on that server, dropped afterwards. Only loopback traffic.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from helpers import stop_process, tiny_weights
from tlexp.cli import app

BASE_URI = os.environ.get("TLEXP_TEST_POSTGRES_URI")

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.slow,
    pytest.mark.skipif(not BASE_URI, reason="TLEXP_TEST_POSTGRES_URI is not set (.ci/run starts PostgreSQL and "
                                            "sets it)"),
]


def _with_database(uri: str, name: str) -> str:
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(path=f"/{name}"))


def _libpq(uri: str) -> str:
    """psycopg takes postgresql://, SQLAlchemy/MLflow may name the driver (postgresql+psycopg://)."""
    return uri.replace("postgresql+psycopg://", "postgresql://", 1)


@pytest.fixture(scope="module")
def postgres_uri():
    """A fresh database on the CI PostgreSQL server, dropped afterwards."""
    import psycopg

    name = f"tlexp_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_libpq(BASE_URI), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_database(BASE_URI, name)
    finally:
        with psycopg.connect(_libpq(BASE_URI), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(postgres_uri, tmp_path_factory):
    """`mlflow server` on a free loopback port: PostgreSQL for runs, a local folder for artifacts."""
    artifacts = tmp_path_factory.mktemp("server-artifacts")
    port = _free_port()
    log = open(tmp_path_factory.mktemp("server-log") / "mlflow-server.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres_uri,
         "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_TRACKING_URI": ""})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"mlflow server exited ({proc.returncode}):\n{log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"mlflow server did not answer on {url}:\n{log.read()[-3000:]}")
            time.sleep(0.5)
        yield {"url": url, "artifacts": Path(artifacts)}
    finally:
        stop_process(proc, timeout=30)
        log.close()


def test_train_and_compare_through_a_shared_server(server, tmp_path, monkeypatch):
    import mlflow

    url = server["url"]
    weights = tiny_weights(tmp_path / "w.pt")
    env = {**os.environ, "MLFLOW_TRACKING_URI": url}
    done = subprocess.run(
        [sys.executable, "-m", "tlexp", "train", "--model", "tinycnn", "--strategy", "scratch,finetune",
         "--weights", str(weights), "--image-size", "12", "--samples-per-class", "10", "--epochs", "2",
         "--experiment", "team", "--quiet"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()  # nothing local

    client = MlflowClient(url)
    exp = client.get_experiment_by_name("team")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.data.tags["strategy"] for r in runs) == ["finetune", "scratch"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1, 2]
        assert 0.0 <= run.data.metrics["best_val_acc"] <= 1.0
        assert {a.path for a in client.list_artifacts(run.info.run_id, "data")} >= {"data/split_manifest.csv"}
    # Artifacts went through the server into its artifact root, not to the client's disk.
    stored = {p.name for p in server["artifacts"].rglob("*") if p.is_file()}
    assert {"split_manifest.csv", "history.csv", "MLmodel"} <= stored

    # Compare reads the same server.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    mlflow.set_tracking_uri(url)
    try:
        result = CliRunner().invoke(app, ["compare", "--experiment", "team", "--output", str(tmp_path / "report")])
    finally:
        mlflow.set_tracking_uri(None)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report" / "report.html").exists()
    kinds = [r.data.tags.get("tlexp.kind") for r in client.search_runs([exp.experiment_id])]
    assert sorted(kinds) == ["comparison", "train", "train"]

