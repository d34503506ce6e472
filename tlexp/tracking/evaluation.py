"""The run of a ``tlexp evaluate``: a model scored on new labelled images, beside its training run."""

from __future__ import annotations

from typing import Any

from .store import TAG_EXPERIMENT, TAG_KIND, TrackingError, _first_line, retry_locked

KIND_EVALUATION = "evaluation"
TAG_MODEL_RUN = "tlexp.model_run_id"
TAG_MODEL_URI = "tlexp.model_uri"


def log_evaluation_run(evaluation: Any, *, figure: Any, predictions: Any) -> str:
    """Log ``evaluation`` (``tlexp.evaluate.Evaluation``) as a FINISHED run in the model's experiment, tagged
    ``tlexp.kind=evaluation`` and naming the model's run. Never left RUNNING."""
    import os

    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    client = MlflowClient()
    model_run = client.get_run(evaluation.model_run_id) if evaluation.model_run_id else None
    experiment_id = model_run.info.experiment_id if model_run else client.get_experiment_by_name("Default").experiment_id
    tags = {TAG_KIND: KIND_EVALUATION, TAG_MODEL_URI: evaluation.model_uri,
            "mlflow.note.content": f"{evaluation.model} on {evaluation.data}: accuracy {evaluation.accuracy:.1%} "
                                   f"(95% CI {evaluation.ci_low:.1%}-{evaluation.ci_high:.1%}, n={evaluation.n})"}
    if model_run is not None:
        tags[TAG_MODEL_RUN] = model_run.info.run_id
        if TAG_EXPERIMENT in model_run.data.tags:
            tags[TAG_EXPERIMENT] = model_run.data.tags[TAG_EXPERIMENT]
    name = f"evaluate-{os.path.basename(evaluation.data)}"
    run_id = retry_locked(client.create_run, experiment_id, run_name=name, tags=tags).info.run_id
    try:
        metrics = {"eval_acc": evaluation.accuracy, "eval_acc_ci_low": evaluation.ci_low,
                   "eval_acc_ci_high": evaluation.ci_high, "eval_images": evaluation.n,
                   "eval_skipped": len(evaluation.skipped)}
        for row in evaluation.per_class.itertuples():
            if row.support:
                metrics[f"eval_acc_{_metric_safe(row[1])}"] = row.accuracy
        params = {"data_path": evaluation.data, "model": evaluation.model, "model_uri": evaluation.model_uri}
        retry_locked(client.log_batch, run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()],
                     params=[Param(k, str(v)[:6000]) for k, v in params.items()],
                     tags=[RunTag(k, v) for k, v in tags.items()])
        client.log_text(run_id, evaluation.per_class.to_csv(index=False), "eval/per_class_accuracy.csv")
        client.log_text(run_id, predictions.to_csv(index=False), "eval/predictions.csv")
        client.log_figure(run_id, figure, "eval/confusion_matrix.png")
        client.set_terminated(run_id, status="FINISHED")
    except BaseException as exc:  # Ctrl-C included: the run must not stay RUNNING
        try:
            client.set_terminated(run_id, status="FAILED" if isinstance(exc, Exception) else "KILLED")
        except Exception:  # noqa: BLE001 - the store itself failed; the error below says so
            pass
        if not isinstance(exc, Exception):
            raise
        raise TrackingError(f"The evaluation was computed but logging it to MLflow failed ({type(exc).__name__}: "
                            f"{_first_line(exc)}).") from exc
    return run_id


def _metric_safe(name: str) -> str:
    """A class name as part of a metric key (MLflow allows letters, digits, _-./ and spaces)."""
    return "".join(ch if ch.isalnum() or ch in "_-./ " else "_" for ch in str(name))
