"""Shared fixtures: every test gets a temporary SQLite tracking store and cache dir; no network."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
# Tests must never reach the network: make hub downloads fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


@pytest.fixture()
def tracking_uri(tmp_path, monkeypatch) -> str:
    """A fresh SQLite store for this test (also set as MLFLOW_TRACKING_URI for subprocesses)."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Decoded-image caches go to a per-test folder, never ~/.cache."""
    monkeypatch.setenv("TLEXP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    yield


@pytest.fixture()
def schema_store(tracking_uri, tmp_path) -> str:
    """``tracking_uri``, pre-filled with MLflow's empty schema (creating it takes seconds)."""
    from fake_store import new_store

    new_store(tmp_path)
    return tracking_uri
