"""Run configuration: one frozen dataclass, one place for defaults, logged whole.

The config is resolved once (``resolve``) before any data is read, so every
default that depends on something else (image size per dataset, the device)
is fixed and visible in the MLflow params of the run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from enum import Enum
from typing import Any


# The choices of every option that has choices, declared once: Typer validates them and lists them in
# --help, the config validates them, strategies and the engine read them.
class Strategy(str, Enum):
    SCRATCH = "scratch"  # random init, everything trains
    TRANSFER = "transfer"  # pretrained body frozen, new head trains
    FINETUNE = "finetune"  # pretrained body at lr x backbone_lr_mult, head at lr
    LPFT = "lpft"  # linear probe (frozen body) for lp_epochs, then finetune (Kumar et al., ICLR 2022)


class Head(str, Enum):
    MLP = "mlp"
    LINEAR = "linear"


class Device(str, Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"
    MPS = "mps"


class Precision(str, Enum):
    AUTO = "auto"
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"


class FeatureCache(str, Enum):
    AUTO = "auto"
    ON = "on"
    OFF = "off"


def choices(enum: type[Enum]) -> tuple[str, ...]:
    """The accepted values of a choice, in declaration order."""
    return tuple(member.value for member in enum)


STRATEGIES = choices(Strategy)
HEADS = choices(Head)
DEVICES = choices(Device)
PRECISIONS = choices(Precision)
FEATURE_CACHE = choices(FeatureCache)
BUILTIN_DATASETS = ("digits", "flowers102")

# Settings that cannot change a run's numbers (names, where and how fast it runs), and the seed, which
# is what repeats of "the same settings" differ in. Everything else is part of a run's identity.
NOT_IDENTITY = frozenset({"run_name", "device", "num_workers", "cache_dir", "experiment", "eval_batch_size",
                          "compile", "system_metrics", "seed"})
# Settings only some strategies read: for the others they cannot change a result, so they are not part of
# those runs' identity (a sweep does not re-run scratch because --lp-epochs changed).
STRATEGY_SETTINGS = {
    "backbone_lr_mult": frozenset({"finetune", "lpft"}),
    "lp_epochs": frozenset({"lpft"}),
    "feature_cache": frozenset({"transfer", "lpft"}),
    "feature_cache_views": frozenset({"transfer", "lpft"}),
}

DEFAULT_EXPERIMENT = "tl-vs-scratch"
MAX_SEED = 2**63 - 1  # --seed and --split-seed: what every torch generator accepts, offsets included
# Photo folders use the seed notebook's 224 px; the 8x8 digits are upscaled
# only as far as the model needs (EfficientNet downsamples 32x, so 32 px
# leaves a 1x1 final feature map; 64 px keeps 2x2 and is still fast on a CPU).
DEFAULT_IMAGE_SIZE = {"digits": 64}
DEFAULT_PHOTO_IMAGE_SIZE = 224
# 2048 px is 12 MiB of decoded pixels per image, 9x ImageNet-scale training's 224-512 px: past it a typo
# (200000) would ask for terabytes. The cache's total size is checked against free space before decoding.
MAX_IMAGE_SIZE = 2048


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
    test_fraction: float = 0.2  # held-out test share carved when the data has no test split
    split_seed: int = 0  # fixes the val/test split, the same for every run of a study (--seed does not move it)
    samples_per_class: int | None = None  # stratified subset of the train split; None = all
    train_fraction: float = 1.0  # stratified fraction of the train split
    device: str = "auto"
    precision: str = "auto"  # auto = bf16 autocast on CUDA when supported, fp32 elsewhere
    channels_last: bool = True
    compile: bool = False
    num_workers: int = 2  # threads that decode images (once; the decoded cache is reused)
    feature_cache: str = "auto"  # transfer: compute frozen-backbone features once (auto = on)
    feature_cache_views: int = 4  # augmented views per training image in the feature cache
    lp_epochs: int = 5  # lpft: epochs of linear probing (frozen body) before the whole net fine-tunes
    eval_batch_size: int = 256  # evaluation runs without gradients, so it can take bigger batches
    experiment: str = DEFAULT_EXPERIMENT
    run_name: str | None = None
    cache_dir: str | None = None  # None = $TLEXP_CACHE_DIR or ~/.cache/tlexp
    system_metrics: bool = True  # MLflow's CPU/memory (and GPU) system metrics for the run

    # ----------------------------------------------------------------- helpers
    @property
    def dataset_name(self) -> str:
        """Short dataset name for tags and run names: the built-in name or the folder's name."""
        if self.data in BUILTIN_DATASETS:
            return self.data
        return os.path.basename(os.path.normpath(self.data)) or self.data

    @property
    def pretrained(self) -> bool:
        return self.strategy != Strategy.SCRATCH.value

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

    def identity(self, *, data_id: str | None = None, every_setting: bool = False) -> dict[str, str]:
        """Every resolved setting that can change a result, except the seed: the one definition of
        "the same settings" (compare groups by it, sweep skips finished cells by it).

        ``data_id`` is the data's content fingerprint when known; it replaces the ``--data`` string, so
        ``./base``, ``base/`` and the absolute path are one dataset and a changed folder is another.
        ``every_setting`` keeps the settings this run's strategy does not read (a sweep's base config
        stands for every strategy of the sweep).
        """
        params = self.resolve().to_params()
        ident = {k: v for k, v in params.items() if k not in NOT_IDENTITY and
                 (every_setting or self.strategy in STRATEGY_SETTINGS.get(k, (self.strategy,)))}
        if data_id:
            ident["data"] = data_id
            ident.pop("dataset", None)
        return ident

    def identity_key(self, *, data_id: str | None = None) -> str:
        """A short stable hash of ``identity``."""
        return digest(self.identity(data_id=data_id))

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
        _choice("strategy", self.strategy, Strategy)
        _choice("head", self.head, Head)
        _choice("device", self.device, Device)
        _choice("precision", self.precision, Precision)
        _choice("feature cache", self.feature_cache, FeatureCache)
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be at least 1, got {self.epochs}.")
        for name in ("lr", "backbone_lr_mult", "val_fraction", "test_fraction", "train_fraction"):
            if not math.isfinite(getattr(self, name)):  # `--lr inf` would pass `> 0` and diverge at once
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(self, name)}.")
        for name in ("seed", "split_seed"):
            # torch generators take 64-bit seeds; fit derives seed + 10_000, so the top half stays free.
            if not 0 <= getattr(self, name) <= MAX_SEED:
                raise ConfigError(f"--{name.replace('_', '-')} must be between 0 and {MAX_SEED}, "
                                  f"got {getattr(self, name)}.")
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
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"--test-fraction must be between 0 and 1 (exclusive), got {self.test_fraction}.")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError(f"--val-fraction + --test-fraction must leave images to train on, got "
                              f"{self.val_fraction} + {self.test_fraction}.")
        if self.lp_epochs < 1:
            raise ConfigError(f"--lp-epochs must be at least 1, got {self.lp_epochs}.")
        if self.strategy == Strategy.LPFT.value and self.lp_epochs >= self.epochs:
            raise ConfigError(f"lpft needs --lp-epochs below --epochs (epochs of linear probing, then the rest "
                              f"fine-tunes), got --lp-epochs {self.lp_epochs} with --epochs {self.epochs}.")
        if not 0.0 < self.train_fraction <= 1.0:
            raise ConfigError(f"--train-fraction must be in (0, 1], got {self.train_fraction}.")
        if self.samples_per_class is not None and self.samples_per_class < 1:
            raise ConfigError(f"--samples-per-class must be at least 1, got {self.samples_per_class}.")
        if self.samples_per_class is not None and self.train_fraction < 1.0:
            raise ConfigError("Use either --samples-per-class or --train-fraction, not both.")
        if self.image_size is not None and not 8 <= self.image_size <= MAX_IMAGE_SIZE:
            raise ConfigError(f"--image-size must be at least 8 and at most {MAX_IMAGE_SIZE} pixels, "
                              f"got {self.image_size}.")
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


def digest(obj: Any) -> str:
    """A short stable hash of a JSON-able object (identities, sweep ids)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _choice(what: str, value: str, allowed: type[Enum]) -> None:
    if value not in choices(allowed):
        raise ConfigError(f"Unknown {what} {value!r}; expected one of: {', '.join(choices(allowed))}.")


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


__all__ = ["TrainConfig", "ConfigError", "Strategy", "Head", "Device", "Precision", "FeatureCache", "choices",
           "STRATEGIES", "HEADS", "DEVICES", "DEFAULT_EXPERIMENT", "NOT_IDENTITY", "cache_root", "digest"]
