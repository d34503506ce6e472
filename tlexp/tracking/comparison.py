"""The experiment's one comparison run: created by the first ``tlexp compare``, updated in place after.

Each compare replaces the run's artifacts (the report files and charts), sets its description
(``mlflow.note.content``, markdown: MLflow's UI shows it on the run's overview) to the findings, and
stamps ``tlexp.generated_at``. Older tlexp made one run per compare; those extra runs are deleted
(MLflow keeps deleted runs restorable), so the experiment's charts hold one comparison run at most.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from .store import TAG_EXPERIMENT, TAG_KIND, TrackingError, _first_line, mark_model_training, tag_equals

if TYPE_CHECKING:
    from mlflow import MlflowClient

KIND_COMPARISON = "comparison"
RUN_NAME = "comparison"
TAG_GENERATED = "tlexp.generated_at"
TAG_NOTE = "mlflow.note.content"  # the run description MLflow's UI shows and edits


class ComparisonLogError(TrackingError):
    """The report was written but the comparison run could not be updated. One sentence for the user."""


def log_comparison_run(client: "MlflowClient", *, experiment: str, files: Sequence[Path], description: str,
                       params: Mapping[str, str]) -> str:
    """Update (or create) the comparison run of ``experiment`` with ``files``, ``description`` and ``params``
    (logged as ``tlexp.<name>`` tags: params cannot change once logged). Returns its run id.

    A run is never left RUNNING: an error or Ctrl-C part-way marks it FAILED or KILLED.
    """
    run_id = None
    try:
        from mlflow.entities import RunTag
        from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

        found = client.get_experiment_by_name(experiment)
        if found is not None and found.lifecycle_stage != "active":
            raise ComparisonLogError(f"Experiment {experiment!r} is deleted, so the report cannot be logged to "
                                     f"it; restore it, or pass --no-log.")
        exp_id = found.experiment_id if found is not None else client.create_experiment(experiment)
        mark_model_training(exp_id, client=client)
        earlier = client.search_runs([exp_id], tag_equals(TAG_KIND, KIND_COMPARISON),
                                     order_by=["attributes.start_time DESC"], max_results=1000)
        tags = {TAG_KIND: KIND_COMPARISON, TAG_EXPERIMENT: experiment, "mlflow.runName": RUN_NAME}
        if earlier:
            client.update_run(earlier[0].info.run_id, status="RUNNING")
            run_id = earlier[0].info.run_id
        else:
            run_id = client.create_run(exp_id, run_name=RUN_NAME, tags=tags).info.run_id
        if len(description) > MAX_TAG_VAL_LENGTH:  # a big sweep's findings: the rest is in report.html
            cut = description[:MAX_TAG_VAL_LENGTH - 60].rsplit("\n", 1)[0]
            description = cut + "\n\n… (continued in report.html)"
        generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        all_tags = {**tags, **{f"tlexp.{k}": str(v) for k, v in params.items()}, TAG_GENERATED: generated,
                    TAG_NOTE: description}
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in all_tags.items()])
        _replace_artifacts(client, run_id, files)
        for older in earlier[1:]:
            client.delete_run(older.info.run_id)
        client.set_terminated(run_id, status="FINISHED")
    except BaseException as exc:  # Ctrl-C included: the run must not stay RUNNING
        if run_id is not None:
            try:
                client.set_terminated(run_id, status="FAILED" if isinstance(exc, Exception) else "KILLED")
            except Exception:  # the store itself is what failed; the error below says so
                pass
        if not isinstance(exc, Exception) or isinstance(exc, ComparisonLogError):
            raise
        raise ComparisonLogError(f"The report was written, but logging it to MLflow failed ({type(exc).__name__}: "
                                 f"{_first_line(exc)}); pass --no-log to skip it.") from exc
    return run_id


def _replace_artifacts(client: "MlflowClient", run_id: str, files: Sequence[Path]) -> None:
    """Upload ``files`` to the run's artifact root after removing what the last compare put there."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(client.get_run(run_id).info.artifact_uri)
    keep = {p.name for p in files}
    for info in client.list_artifacts(run_id):
        if info.path not in keep:  # files of the new report overwrite themselves
            try:
                repo.delete_artifacts(info.path)
            except NotImplementedError:  # a store that cannot delete: the stale file stays, harmlessly
                break
    for path in files:
        client.log_artifact(run_id, str(path))
