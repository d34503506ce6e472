"""`tlexp sweep --executor ray`: cells as Ray tasks on a local 2-CPU instance, in parallel, resumable, and
a cell whose worker is SIGKILLed continues the same run."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from fake_store import new_store
from tlexp import tracking
from tlexp.cli import app

ray = pytest.importorskip("ray")

CURVE = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")


@pytest.fixture(scope="module")
def local_ray():
    """One Ray instance (2 CPUs) for the module: starting one costs seconds."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    for sig, handler in handlers.items():  # Ray's SIGTERM handler must not outlive this module
        signal.signal(sig, handler)
    yield ray
    ray.shutdown()


@pytest.fixture()
def store(tracking_uri, tmp_path) -> str:
    new_store(tmp_path)
    return tracking_uri


def _sweep(*extra: str, seeds: str = "0,1", sizes: str = "5,10", epochs: int = 3, experiment: str = "ray"):
    return CliRunner().invoke(app, [
        "sweep", "--executor", "ray", "--strategies", "scratch", "--seeds", seeds, "--samples-per-class", sizes,
        "--model", "tinycnn", "--data", "digits", "--image-size", "8", "--epochs", str(epochs), "--batch-size", "8",
        "--val-fraction", "0.2", "--experiment", experiment, "--quiet", *extra])


def _children(experiment: str) -> list:
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    return [r for r in runs if r.data.tags.get(tracking.TAG_KIND) == "train"]


def _history(run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key))


@pytest.mark.slow
def test_a_ray_sweep_runs_cells_in_parallel_under_one_parent_and_a_rerun_skips_them(local_ray, store):
    result = _sweep()
    assert result.exit_code == 0, result.output
    children = _children("ray")
    assert len(children) == 4 and {r.info.status for r in children} == {"FINISHED"}
    assert len({r.data.tags["mlflow.parentRunId"] for r in children}) == 1
    spans = [(r.info.start_time, r.info.end_time) for r in children]
    overlapping = [(a, b) for i, a in enumerate(spans) for b in spans[i + 1:] if a[0] < b[1] and b[0] < a[1]]
    assert overlapping, f"no two cells ran at the same time: {spans}"
    pids = {r.data.tags[tracking.TAG_PID] for r in children}
    assert len(pids) >= 2  # trained in more than one worker process
    assert all(pid.split(":")[-1] != str(os.getpid()) for pid in pids)  # and none in the driver

    again = _sweep()
    assert again.exit_code == 0, again.output
    assert "4 cells: 4 already finished, 0 to run." in again.output
    assert len(_children("ray")) == 4


@pytest.mark.slow
def test_a_cell_whose_worker_is_sigkilled_continues_the_same_run(local_ray, store):
    epochs = 8
    reference = _sweep(seeds="0", sizes="10", epochs=epochs, experiment="reference")
    assert reference.exit_code == 0, reference.output
    (ref,) = _children("reference")

    killed: dict[str, str] = {}

    def kill_the_worker_after_a_checkpoint() -> None:
        deadline = time.monotonic() + 400  # a loaded machine starts Ray workers slowly
        while time.monotonic() < deadline and not killed:
            for run in _children_or_none("killed"):
                if tracking.has_checkpoint(run.info.run_id):
                    pid = int(run.data.tags[tracking.TAG_PID].split(":")[-1])
                    killed.update(run_id=run.info.run_id, pid=str(pid),
                                  epoch=str(tracking.load_checkpoint(run.info.run_id)["epoch"]))
                    os.kill(pid, signal.SIGKILL)
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_worker_after_a_checkpoint, daemon=True)
    killer.start()
    result = _sweep(seeds="0", sizes="10", epochs=epochs, experiment="killed")
    killer.join(timeout=5)
    assert result.exit_code == 0, result.output
    assert killed, "the cell finished before its worker could be killed"
    (run,) = _children("killed")  # the retried task continued the run; it did not start another
    assert run.info.run_id == killed["run_id"] and run.info.status == "FINISHED"
    assert int(run.data.tags["tlexp.resumed_after_epoch"]) >= int(killed["epoch"])
    assert run.data.tags[tracking.TAG_PID].split(":")[-1] != killed["pid"]  # finished by another worker
    assert [s for s, _ in _history(run.info.run_id, "epoch_time_s")] == list(range(1, epochs + 1))
    for key in CURVE:
        assert _history(run.info.run_id, key) == _history(ref.info.run_id, key), key
    for key in ("best_val_acc", "best_epoch", "final_val_acc", "test_acc"):
        assert run.data.metrics[key] == ref.data.metrics[key], key


@pytest.mark.slow
def test_ctrl_c_in_the_driver_cancels_the_running_cells_and_their_runs_end_killed(local_ray, store):
    import _thread

    interrupted: dict[str, str] = {}

    def ctrl_c_after_a_checkpoint() -> None:
        deadline = time.monotonic() + 400  # a loaded machine starts Ray workers slowly
        while time.monotonic() < deadline:
            for run in _children_or_none("stopped"):
                if tracking.has_checkpoint(run.info.run_id):
                    interrupted["run_id"] = run.info.run_id
                    _thread.interrupt_main()  # Ctrl-C, delivered to the driver's main thread
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=ctrl_c_after_a_checkpoint, daemon=True)
    thread.start()
    result = _sweep(seeds="0", sizes="10", epochs=40, experiment="stopped")
    thread.join(timeout=5)
    assert interrupted, result.output
    assert result.exit_code == 130, result.output
    assert "running cell(s) were cancelled" in result.stderr
    assert "Re-run the same `tlexp sweep` command" in result.stderr
    (child,) = _children("stopped")
    assert child.info.status == "KILLED"
    assert tracking.has_checkpoint(child.info.run_id)  # what a resume continues from
    parent = MlflowClient().get_run(child.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "KILLED"


def _children_or_none(experiment: str) -> list:
    return _children(experiment) if MlflowClient().get_experiment_by_name(experiment) else []


@pytest.mark.slow
def test_a_local_store_is_refused_when_the_cluster_has_other_machines(local_ray, store, monkeypatch):
    from tlexp import executors

    nodes = [{"Alive": True, "NodeManagerAddress": "127.0.0.1"}, {"Alive": True, "NodeManagerAddress": "10.9.8.7"}]
    monkeypatch.setattr(local_ray, "nodes", lambda: nodes)
    result = _sweep()
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"Error: Tracking store {store!r} is a file on this machine, but the Ray cluster has nodes on other "
        f"machines (10.9.8.7) that cannot write to it; set MLFLOW_TRACKING_URI to a server every node reaches "
        f"(e.g. http://HEAD:5000).")
    assert MlflowClient().get_experiment_by_name("ray") is None  # refused before any run was created
    executors.check_reachable_store(local_ray, "http://head:5000")  # a server is fine


def test_ray_options_need_the_ray_executor(store):
    result = CliRunner().invoke(app, ["sweep", "--ray-address", "auto", "--model", "tinycnn"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "Error: --ray-address goes with --executor ray; add it or leave the option out."
    bad = CliRunner().invoke(app, ["sweep", "--executor", "dask", "--model", "tinycnn"])
    assert bad.exit_code == 2
    assert bad.stderr.strip() == "Error: --executor 'dask' is not one of: local, ray."
