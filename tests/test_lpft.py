"""lpft (linear probe, then fine-tune): the body is bit-for-bit frozen through --lp-epochs, then trains;
one run, one curve, the switch logged; a resumed run (stopped mid-probe or mid-fine-tune) ends identical."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from helpers import all_runs, tiny_weights
from tlexp import experiment, tracking
from tlexp.cli import app
from tlexp.config import ConfigError, TrainConfig
from tlexp.models import build_model
from tlexp.strategies import apply_strategy, get_strategy, thaw

CURVE = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")


def _body(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The body's entries of a Classifier state_dict: weights and BatchNorm running statistics."""
    return {k: v for k, v in state.items() if k.startswith("body.")}


@pytest.mark.parametrize("cache", ["on", "off"])
def test_lpft_keeps_the_body_frozen_through_the_probe_and_trains_it_after(cache, schema_store, tmp_path, monkeypatch):
    states: list[dict] = []
    real = tracking.RunLogger.keep_checkpoint
    monkeypatch.setattr(tracking.RunLogger, "keep_checkpoint",
                        lambda self, state: (states.append(state), real(self, state))[1])
    weights = tiny_weights(tmp_path / "w.pt")
    result = CliRunner().invoke(app, [
        "train", "--strategy", "lpft", "--model", "tinycnn", "--weights", str(weights), "--image-size", "12",
        "--samples-per-class", "10", "--epochs", "4", "--lp-epochs", "2", "--lr", "0.01",
        "--feature-cache", cache, "--quiet"])
    assert result.exit_code == 0, result.output

    # One state per completed epoch (the end of the run may update the last one with what it logged).
    states = list({s["epoch"]: s for s in reversed(states)}.values())[::-1]
    assert [s["epoch"] for s in states] == [1, 2, 3, 4]
    pretrained = {f"body.{k}": v for k, v in torch.load(weights, weights_only=True).items()
                  if not k.startswith("fc.")}
    bn_stats = [k for k in pretrained if "running_" in k]
    assert bn_stats
    for state in states[:2]:  # the linear probe: every body tensor, BatchNorm statistics included, untouched
        assert all(torch.equal(state["model"][k], v) for k, v in pretrained.items())
    for state in states[2:]:  # fine-tuning: weights and BatchNorm statistics move
        assert any(not torch.equal(state["model"][k], pretrained[k]) for k in pretrained if k not in bn_stats)
        assert any(not torch.equal(state["model"][k], pretrained[k]) for k in bn_stats)
    # The head learns in both phases.
    heads = [{k: v for k, v in s["model"].items() if k.startswith("head.")} for s in states]
    assert all(any(not torch.equal(a[k], b[k]) for k in a) for a, b in zip(heads, heads[1:]))

    client = MlflowClient()
    (run,) = all_runs()
    assert run.info.status == "FINISHED"
    assert run.data.params["lp_switch_epoch"] == "3" and run.data.params["strategy"] == "lpft"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1, 2, 3, 4]
    assert run.data.metrics["trainable_fraction"] == 1.0  # the whole net trained in the end


def test_lpft_switches_to_finetune_groups():
    """After the probe the optimizer holds finetune's groups: body at lr x backbone_lr_mult, head at lr."""
    strategy = get_strategy("lpft")
    assert [strategy.body_frozen_in(e, lp_epochs=2) for e in (1, 2, 3, 4)] == [True, True, False, False]
    model = build_model("tinycnn", num_classes=3, pretrained=False)
    groups = apply_strategy(model, strategy, lr=1e-2, backbone_lr_mult=0.1)
    assert [g["name"] for g in groups] == ["head"] and not any(p.requires_grad for p in model.body.parameters())
    model.train()
    assert not model.body.training  # frozen BatchNorm stays in eval mode
    groups = thaw(model, lr=1e-2, backbone_lr_mult=0.1)
    assert {g["name"]: g["lr"] for g in groups} == {"body": 1e-3, "head": 1e-2}
    assert all(p.requires_grad for p in model.parameters()) and model.body.training


@pytest.mark.parametrize("lp_epochs, epochs", [(3, 3), (5, 2)])
def test_lpft_needs_fewer_probe_epochs_than_epochs(lp_epochs, epochs, schema_store):
    with pytest.raises(ConfigError, match=f"--lp-epochs {lp_epochs} with --epochs {epochs}"):
        TrainConfig(strategy="lpft", epochs=epochs, lp_epochs=lp_epochs).validate()
    TrainConfig(strategy="transfer", epochs=epochs, lp_epochs=lp_epochs).validate()  # only lpft probes
    result = CliRunner().invoke(app, ["train", "--strategy", "lpft", "--epochs", str(epochs),
                                      "--lp-epochs", str(lp_epochs), "--quiet"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert not all_runs()


@pytest.mark.parametrize("stop_in_epoch", [2, 3, 4])  # checkpoint mid-probe, at the switch, mid-fine-tune
def test_lpft_resumed_mid_probe_or_mid_finetune_ends_identical(stop_in_epoch, schema_store, tmp_path, monkeypatch):
    config = TrainConfig(strategy="lpft", model="tinycnn", weights=str(tiny_weights(tmp_path / "w.pt")),
                         image_size=12, samples_per_class=10, epochs=4, lp_epochs=2, batch_size=16,
                         num_workers=0, lr=0.01)
    reference = experiment.train(config)

    real, calls = experiment.train_one_epoch, {"n": 0}

    def flaky(model, batches, optimizer, **kwargs):
        calls["n"] += 1
        if calls["n"] == stop_in_epoch:
            raise KeyboardInterrupt()
        return real(model, batches, optimizer, **kwargs)

    monkeypatch.setattr(experiment, "train_one_epoch", flaky)
    with pytest.raises(KeyboardInterrupt) as caught:
        experiment.train(config.replace(run_name="interrupted"))
    monkeypatch.undo()
    assert caught.value.epoch == stop_in_epoch - 1

    resumed = experiment.train(TrainConfig(), resume_run_id=caught.value.run_id)
    client = MlflowClient()

    def curves(run_id):
        return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in CURVE}

    assert client.get_run(resumed.run_id).info.status == "FINISHED"
    assert curves(resumed.run_id) == curves(reference.run_id)
    for key in ("best_val_acc", "best_epoch", "final_val_acc", "final_train_acc", "test_acc"):
        assert resumed.metrics.get(key) == reference.metrics.get(key), key
