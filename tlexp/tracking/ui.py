"""Where to look at the runs: the `mlflow ui` command for this store and the link to the runs table.

MLflow 3's UI opens an experiment on its GenAI pages; the link below goes straight to the runs table of
the model-training view (``workflowType=machine_learning``).
"""

from __future__ import annotations

import os
import shlex

UI_ADDRESS = "http://127.0.0.1:5000"  # where `mlflow ui` listens by default


def runs_table_url(experiment_id: str, *, base: str = UI_ADDRESS) -> str:
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def ui_command(uri: str) -> str | None:
    """The command that serves the UI over store ``uri``: plain `mlflow ui` for the default store (./mlflow.db),
    else with ``--backend-store-uri`` (shell-quoted); None for a tracking server, which serves its own UI."""
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    from .store import sqlite_path

    path = sqlite_path(uri)
    if path is not None:
        if path == os.path.abspath("mlflow.db"):
            return "mlflow ui"
        uri = f"sqlite:///{path}"  # absolute: the command works from any folder
    elif "://" not in uri:  # a plain folder: a file store
        uri = os.path.abspath(uri)
    return f"mlflow ui --backend-store-uri {shlex.quote(uri)}"


def ui_hint(*, run_id: str | None = None, experiment: str | None = None, uri: str | None = None) -> list[str]:
    """Lines that tell the user how to open the runs table of ``run_id``'s experiment (or of the experiment
    named ``experiment``) in store ``uri`` (default: the current one); empty if neither can be found."""
    from mlflow.tracking import MlflowClient

    from .store import tracking_uri

    uri = uri or tracking_uri()
    client = MlflowClient(uri)
    exp_id = None
    try:
        if run_id is not None:
            exp_id = client.get_run(run_id).info.experiment_id
        elif experiment is not None:
            found = client.get_experiment_by_name(experiment)
            exp_id = found.experiment_id if found is not None else None
    except Exception:  # a hint must never turn a finished command into a failure
        return []
    if exp_id is None:
        return []
    command = ui_command(uri)
    if command is None:
        return [f"Runs table: {runs_table_url(exp_id, base=uri)}"]
    return [f"See the runs: `{command}`, then open {runs_table_url(exp_id)}"]
