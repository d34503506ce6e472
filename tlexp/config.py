"""Run configuration: one frozen dataclass, one place for defaults, logged whole.

The config is resolved once (``resolve``) before any data is read, so every
default that depends on something else (image size per dataset, the device)
is fixed and visible in the MLflow params of the run.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

STRATEGIES = ("scratch", "transfer", "finetune")
HEADS = ("mlp", "linear")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
FEATURE_CACHE = ("auto", "on", "off")
BUILTIN_DATASETS = ("digits", "flowers102")

DEFAULT_EXPERIMENT = "tl-vs-scratch"
# Photo folders use the seed notebook's 224 px; the 8x8 digits are upscaled
# only as far as the model needs (EfficientNet downsamples 32x, so 32 px
# leaves a 1x1 final feature map; 64 px keeps 2x2 and is still fast on a CPU).
DEFAULT_IMAGE_SIZE = {"digits": 64}
DEFAULT_PHOTO_IMAGE_SIZE = 224


class ConfigError(ValueError):
    """A user-supplied setting is invalid. The message is one sentence for the user."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines one training run (the seed notebook's CONFIG, made explicit)."""

    strategy: str = "transfer"
    model: str = "efficientnet_lite0"
    data: str = "digits"  # "digits", "flowers102" or a path to an ImageFolder tree
    weights: str | None = None  # local state_dict path; None = the model's built-in pretrained source
    head: str = "mlp"  # "mlp": Linear-512-ReLU-Dropout(0.3)-Linear as the seed; "linear": one layer
    epochs: int = 15
    batch_size: int = 32
    lr: float = 1e-3  # Adam learning rate of the head (and of everything for scratch)
    backbone_lr_mult: float = 0.1  # finetune: backbone lr = lr * mult
    seed: int = 42
    image_size: int | None = None  # None = per dataset (224 for photos, 64 for digits)
    val_fraction: float = 0.2  # used only when the data has no val/ split
    samples_per_class: int | None = None  # stratified subset of the train split; None = all
    train_fraction: float = 1.0  # stratified fraction of the train split
    device: str = "auto"
    precision: str = "auto"  # auto = bf16 autocast on CUDA when supported, fp32 elsewhere
    channels_last: bool = True
    compile: bool = False
    num_workers: int = 2  # threads that decode images (once; the decoded cache is reused)
    feature_cache: str = "auto"  # transfer: compute frozen-backbone features once (auto = on)
    feature_cache_views: int = 4  # augmented views per training image in the feature cache
    eval_batch_size: int = 256  # evaluation runs without gradients, so it can take bigger batches
    experiment: str = DEFAULT_EXPERIMENT
    run_name: str | None = None
    cache_dir: str | None = None  # None = $TLEXP_CACHE_DIR or ~/.cache/tlexp

    # ----------------------------------------------------------------- helpers
    @property
    def dataset_name(self) -> str:
        """Short dataset name for tags and run names: the built-in name or the folder's name."""
        if self.data in BUILTIN_DATASETS:
            return self.data
        return os.path.basename(os.path.normpath(self.data)) or self.data

    @property
    def pretrained(self) -> bool:
        return self.strategy != "scratch"

    def default_run_name(self) -> str:
        parts = [self.strategy, self.model, f"s{self.seed}"]
        if self.samples_per_class is not None:
            parts.append(f"n{self.samples_per_class}")
        elif self.train_fraction < 1.0:
            parts.append(f"f{self.train_fraction:g}")
        return "-".join(parts)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_params(self) -> dict[str, str]:
        """The whole config as MLflow params (strings; None logged as 'none')."""
        out: dict[str, str] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = "none" if value is None else str(value)
        out["samples_per_class"] = "all" if self.samples_per_class is None else str(self.samples_per_class)
        out["dataset"] = self.dataset_name
        return out

    @classmethod
    def from_params(cls, params: dict[str, str]) -> "TrainConfig":
        """Inverse of ``to_params`` (used by ``--resume`` and the sweep's skip logic)."""
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in params:
                continue
            # Under `mlflow run` the MLproject's raw value (image_size=auto) is kept and tlexp's is <key>_resolved.
            raw = params.get(f"{f.name}_resolved", params[f.name])
            kwargs[f.name] = _parse_field(f, raw)
        return cls(**kwargs)

    # ------------------------------------------------------------- validation
    def validate(self) -> "TrainConfig":
        """Check every setting that can be checked without touching data; raise ConfigError."""
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("head", self.head, HEADS)
        _choice("device", self.device, DEVICES)
        _choice("precision", self.precision, PRECISIONS)
        _choice("feature cache", self.feature_cache, FEATURE_CACHE)
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be at least 1, got {self.epochs}.")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be greater than 0, got {self.lr}.")
        if not self.backbone_lr_mult > 0:
            raise ConfigError(f"--backbone-lr-mult must be greater than 0, got {self.backbone_lr_mult}.")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}.")
        if self.eval_batch_size < 1:
            raise ConfigError(f"--eval-batch-size must be at least 1, got {self.eval_batch_size}.")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be between 0 and 1 (exclusive), got {self.val_fraction}.")
        if not 0.0 < self.train_fraction <= 1.0:
            raise ConfigError(f"--train-fraction must be in (0, 1], got {self.train_fraction}.")
        if self.samples_per_class is not None and self.samples_per_class < 1:
            raise ConfigError(f"--samples-per-class must be at least 1, got {self.samples_per_class}.")
        if self.samples_per_class is not None and self.train_fraction < 1.0:
            raise ConfigError("Use either --samples-per-class or --train-fraction, not both.")
        if self.image_size is not None and self.image_size < 8:
            raise ConfigError(f"--image-size must be at least 8 pixels, got {self.image_size}.")
        if self.feature_cache_views < 1:
            raise ConfigError(f"--feature-cache-views must be at least 1, got {self.feature_cache_views}.")
        if self.num_workers < 0:
            raise ConfigError(f"--num-workers must be 0 or more, got {self.num_workers}.")
        if not self.experiment:
            raise ConfigError("--experiment must not be empty.")
        return self

    def resolve(self) -> "TrainConfig":
        """Validate and fill the defaults that depend on other settings."""
        self.validate()
        changes: dict[str, Any] = {}
        if self.image_size is None:
            changes["image_size"] = DEFAULT_IMAGE_SIZE.get(self.data, DEFAULT_PHOTO_IMAGE_SIZE)
        if self.strategy == "scratch" and self.weights is not None:
            changes["weights"] = None  # scratch starts from random init: pretrained weights do not apply
        if self.run_name is None:
            changes["run_name"] = self.replace(**changes).default_run_name()
        return self.replace(**changes) if changes else self


def cache_root(config: TrainConfig | None = None) -> str:
    """Where decoded images and features are cached between runs."""
    if config is not None and config.cache_dir:
        return config.cache_dir
    return os.environ.get("TLEXP_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tlexp")


def _choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"Unknown {what} {value!r}; expected one of: {', '.join(allowed)}.")


def _parse_field(f: dataclasses.Field, raw: str) -> Any:
    if raw in ("none", "None") or (f.name == "samples_per_class" and raw == "all"):
        return None
    kind = str(f.type)
    if kind.startswith("bool"):
        return raw in ("True", "true", "1")
    if kind.startswith("int"):
        return int(raw)
    if kind.startswith("float"):
        return float(raw)
    return raw


__all__ = ["TrainConfig", "ConfigError", "STRATEGIES", "HEADS", "DEVICES", "DEFAULT_EXPERIMENT", "cache_root"]
