"""Model Registry writes: a new version of a run's image model, its tags and description, the alias."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .comparison import KIND_COMPARISON
from .models import IMAGE_MODEL, run_model
from .store import TAG_EXPERIMENT, TAG_KIND, TrackingError, _first_line, search_tagged


@dataclass
class Registered:
    name: str
    version: str
    alias: str
    run_id: str
    champion: Any  # registry.Champion

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{self.alias}"


def check_registry(tracking_uri: str | None = None) -> None:
    """Raise TrackingError (one line) when the store has no Model Registry."""
    from mlflow import MlflowClient

    try:
        MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri).search_registered_models(max_results=1)
    except Exception as exc:  # noqa: BLE001 - a store or server without a registry
        raise TrackingError(f"The tracking store has no usable Model Registry ({type(exc).__name__}: "
                            f"{_first_line(exc)}); nothing was registered. Use a database store "
                            f"(sqlite:///mlflow.db) or a server with a registry.") from None


def comparison_run(experiment: str, *, tracking_uri: str | None = None) -> str | None:
    """The id of the experiment's comparison run (``tlexp compare``), if there is one."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = search_tagged(client, [found.experiment_id], {TAG_KIND: KIND_COMPARISON, TAG_EXPERIMENT: experiment},
                         order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def register_model_version(name: str, *, run_id: str, alias: str, tags: dict[str, str], description: str,
                           champion: Any = None, tracking_uri: str | None = None) -> Registered:
    """Register ``run_id``'s image model as a new version of ``name`` and point ``alias`` at it."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    logged = run_model(client, run_id, IMAGE_MODEL)
    if logged is None:
        raise TrackingError(f"Run {run_id} has no image model ({IMAGE_MODEL}) to register; it was trained by an "
                            f"older tlexp. Train it again, then register; nothing was registered.")
    from mlflow.exceptions import MlflowException

    try:
        try:
            client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = client.create_model_version(name, source=logged.artifact_location, run_id=run_id, tags=tags,
                                              description=description, model_id=logged.model_id)
    except Exception as exc:  # noqa: BLE001 - a bad name, a store that refuses
        raise TrackingError(f"Registering {name!r} failed ({type(exc).__name__}: {_first_line(exc)}); nothing "
                            f"was registered.") from None
    client.set_registered_model_alias(name, alias, version.version)
    return Registered(name=name, version=str(version.version), alias=alias, run_id=run_id, champion=champion)
