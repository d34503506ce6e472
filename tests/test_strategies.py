import torch

from helpers import tiny_weights
from tlexp.engine import DeviceSettings, iterate_batches, train_one_epoch
from tlexp.models import build_model
from tlexp.strategies import apply_strategy, get_strategy

CPU = DeviceSettings(device=torch.device("cpu"))


def _model(tmp_path, strategy):
    s = get_strategy(strategy)
    weights = str(tiny_weights(tmp_path / "w.pt")) if s.pretrained else None
    model = build_model("tinycnn", num_classes=3, pretrained=s.pretrained, weights=weights)
    groups = apply_strategy(model, s, lr=1e-2, backbone_lr_mult=0.1)
    return model, groups


def _one_epoch(model, groups):
    torch.manual_seed(0)
    images = (torch.rand(24, 3, 12, 12) * 255).to(torch.uint8)
    labels = torch.arange(3).repeat(8)
    batches = iterate_batches(images, labels, torch.arange(24), batch_size=8, settings=CPU,
                              transform=lambda x, g=None: x.float() / 255)
    train_one_epoch(model, batches, torch.optim.Adam(groups), settings=CPU)


def test_transfer_freezes_the_body_bit_for_bit_batchnorm_included(tmp_path):
    model, groups = _model(tmp_path, "transfer")
    assert all(not p.requires_grad for p in model.body.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    assert [g["name"] for g in groups] == ["head"]
    before = {k: v.clone() for k, v in model.body.state_dict().items()}
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    _one_epoch(model, groups)
    bns = [m for m in model.body.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)  # model.train() kept frozen BN in eval mode
    after = model.body.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running_mean/var too
    assert any(not torch.equal(head_before[k], v) for k, v in model.head.state_dict().items())


def test_freezing_gradients_alone_would_let_batchnorm_drift(tmp_path):
    """The seed notebook's freeze: requires_grad=False only. Its BN statistics move -- ours must not."""
    model, groups = _model(tmp_path, "transfer")
    model.body_frozen = False  # undo the eval-mode half of the freeze, keep requires_grad=False
    before = {k: v.clone() for k, v in model.body.state_dict().items() if "running_mean" in k}
    _one_epoch(model, groups)
    assert any(not torch.equal(before[k], model.body.state_dict()[k]) for k in before)


def test_finetune_trains_everything_with_a_slower_backbone(tmp_path):
    model, groups = _model(tmp_path, "finetune")
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs == {"body": 1e-3, "head": 1e-2}
    assert all(p.requires_grad for p in model.parameters())
    before = [p.clone() for p in model.body.parameters()]
    _one_epoch(model, groups)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.body.parameters()))


def test_scratch_is_random_init_all_trainable(tmp_path):
    model, groups = _model(tmp_path, "scratch")
    assert [g["name"] for g in groups] == ["all"]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    pretrained = torch.load(tiny_weights(tmp_path / "p.pt"), weights_only=True)
    assert not torch.equal(model.body.features[0].weight, pretrained["features.0.weight"])
