"""One training run: config -> data -> model -> strategy -> epochs -> tracking -> summary.

Everything that can be checked is checked before the MLflow run is opened, so
a bad setting fails fast and leaves nothing in the store.
"""

from __future__ import annotations

import copy
import math
import platform
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from . import features as feature_cache
from .config import ConfigError, TrainConfig
from .console import Reporter, SilentReporter
from .data import (EvalPreset, ImageData, Splits, TrainPreset, data_params, load_data, make_splits,
                   small_class_warning, split_manifest, subset_train)
from .engine import (DeviceSettings, confusion_matrix, evaluate, iterate_batches, resolve_device,
                     resolve_precision, train_one_epoch)
from .models import Classifier, build_model, count_parameters, get_spec
from .strategies import apply_strategy, get_strategy, thaw

if TYPE_CHECKING:
    from .tracking import FitLogger

_ANNOUNCED: set[tuple[str, int | str]] = set()  # what this process already told the user
EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "epoch_time_s", "lr", "train_samples_per_s")


@dataclass
class RunSummary:
    """What a finished run reports back (the same numbers it logged)."""

    run_id: str
    config: TrainConfig
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    status: str = "FINISHED"


@dataclass
class Prepared:
    """Everything checked and built before a run is opened."""

    config: TrainConfig
    data: ImageData
    splits: Splits
    model: Classifier
    settings: DeviceSettings
    param_groups: list[dict[str, Any]]


def prepare(config: TrainConfig, *, reporter: Reporter | None = None, data: ImageData | None = None) -> Prepared:
    """Validate the config, load data, build and check the model. Raises ConfigError/DataError/WeightsError."""
    reporter = reporter or SilentReporter()
    config = config.resolve()
    try:
        strategy = get_strategy(config.strategy)
        spec = get_spec(config.model)
        device = resolve_device(config.device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if config.image_size < spec.min_image_size:
        raise ConfigError(f"--image-size {config.image_size} is too small for {config.model}; "
                          f"use at least {spec.min_image_size}.")
    settings = DeviceSettings(device=device, amp_dtype=resolve_precision(config.precision, device),
                              channels_last=config.channels_last and device.type != "mps")

    if data is None:
        if (config.data, config.image_size) not in _ANNOUNCED:  # a sweep loads the same data per cell
            _ANNOUNCED.add((config.data, config.image_size))
            reporter.stage(f"loading {config.data} at {config.image_size}px (decoded once, then cached)")
        data = load_data(config.data, image_size=config.image_size, cache_dir=_cache_dir(config),
                         num_workers=config.num_workers)
    # Val and test are fixed by split_seed (the same test images for every run of a study); --seed moves
    # only which training images a --samples-per-class / --train-fraction subset keeps.
    splits = make_splits(data, val_fraction=config.val_fraction, test_fraction=config.test_fraction,
                         split_seed=config.split_seed)
    warning = small_class_warning(splits)
    if warning and (data.cache_key, "small-classes") not in _ANNOUNCED:
        _ANNOUNCED.add((data.cache_key, "small-classes"))
        reporter.stage(warning)
    train = subset_train(splits.train, data.labels, data.classes, samples_per_class=config.samples_per_class,
                         train_fraction=config.train_fraction, seed=config.seed)
    splits = splits.replace_train(train)

    torch.manual_seed(config.seed)  # head init (and the whole net for scratch) depends on the seed only
    model = build_model(config.model, num_classes=data.num_classes, pretrained=strategy.pretrained,
                        head=config.head, weights=config.weights)
    _probe(model, config)
    groups = apply_strategy(model, strategy, lr=config.lr, backbone_lr_mult=config.backbone_lr_mult)
    model.to(device)
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    return Prepared(config=config, data=data, splits=splits, model=model, settings=settings, param_groups=groups)


def preflight(configs: list[TrainConfig], *, reporter: Reporter | None = None) -> None:
    """Check the store and prepare every config (data, weights, sizes) without training; raises like ``prepare``.

    Several strategies trained in a row must not fail on the second one's weights after the first has
    trained for an hour. Each run prepares again (seeding its own init), so results do not change.
    """
    from . import tracking

    for config in configs:
        tracking.check_store(experiment=config.experiment)
        prepare(config, reporter=reporter)


def _cache_dir(config: TrainConfig) -> str:
    from .config import cache_root

    return cache_root(config)


def _probe(model: Classifier, config: TrainConfig) -> None:
    """One tiny forward pass, so an impossible input size fails now rather than mid-epoch."""
    model.eval()
    try:
        with torch.inference_mode():
            model(torch.zeros(2, 3, config.image_size, config.image_size))
    except RuntimeError as exc:
        raise ConfigError(f"Model {config.model} cannot take {config.image_size}px images "
                          f"({str(exc).splitlines()[0][:120]}); try a larger --image-size.") from None


def use_feature_cache(config: TrainConfig) -> bool:
    """Whether the run trains on frozen-body features (transfer throughout, lpft during its linear probe)."""
    return config.strategy in ("transfer", "lpft") and config.feature_cache != "off"


def run_params(prep: Prepared) -> dict[str, Any]:
    """The whole resolved config plus dataset facts and versions (logged once as params)."""
    import mlflow
    import torchvision

    cfg = prep.config
    params: dict[str, Any] = dict(cfg.to_params())
    params.update(prep.splits.sizes())
    params.update(data_params(prep.data, prep.splits))
    params.update({
        "num_classes": prep.data.num_classes,
        "device_resolved": str(prep.settings.device),
        "amp_dtype": str(prep.settings.amp_dtype).replace("torch.", "") if prep.settings.amp_dtype else "fp32",
        "feature_cache_used": use_feature_cache(cfg),  # lpft: during its linear probe
        "augmentation": "flip(0.5), rotation(15), color_jitter(0.2, 0.2, 0.2, 0.1)",
        "weights_source": get_spec(cfg.model).weights_source if cfg.weights is None else cfg.weights,
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "mlflow_version": mlflow.__version__,
        "python_version": platform.python_version(),
    })
    switch = get_strategy(cfg.strategy).switch_epoch(cfg.lp_epochs)
    if switch is not None:  # lpft: the first epoch that trains the whole network
        params["lp_switch_epoch"] = switch
    return params


def train(config: TrainConfig, *, reporter: Reporter | None = None, data: ImageData | None = None,
          parent_run_id: str | None = None, resume_run_id: str | None = None,
          prepared: Prepared | None = None, extra_tags: dict[str, str] | None = None) -> RunSummary:
    """Train one strategy as one MLflow run and return its summary."""
    from . import tracking

    reporter = reporter or SilentReporter()
    checkpoint = None
    tracking.check_store(experiment=None if resume_run_id else config.experiment)
    if resume_run_id is not None:
        run = tracking.resumable_run(resume_run_id)
        resume_run_id = run.info.run_id  # the whole id, also when the user typed a prefix of it
        checkpoint = tracking.load_checkpoint(resume_run_id)
        config = TrainConfig.from_params(run.data.params)
    prep = prepared or prepare(config, reporter=reporter, data=data)
    cfg = prep.config
    tags = {"strategy": cfg.strategy, "model": cfg.model, "dataset": cfg.dataset_name, **(extra_tags or {})}
    start_epoch = int(checkpoint["epoch"]) if checkpoint else 0
    with tracking.training_run(experiment=cfg.experiment, run_name=cfg.run_name or cfg.default_run_name(),
                               tags=tags, parent_run_id=parent_run_id, resume_run_id=resume_run_id,
                               start_step=start_epoch) as logger:
        if checkpoint is None:
            logger.log_params(run_params(prep))
            _log_data_artifacts(logger, prep)
        try:
            summary = fit(prep, logger, reporter, checkpoint)
        except Diverged as exc:  # recorded, so that --resume can say why continuing would diverge again
            logger.set_tags({tracking.TAG_DIVERGED_EPOCH: str(exc.epoch)})
            raise
    return RunSummary(run_id=logger.run_id, config=cfg, metrics=summary["metrics"], history=summary["history"])


def _log_data_artifacts(logger: Any, prep: Prepared) -> None:
    import pandas as pd

    logger.log_text(pd.DataFrame(split_manifest(prep.data, prep.splits)).to_csv(index=False), "data/split_manifest.csv")
    if prep.data.skipped:
        skipped = pd.DataFrame(prep.data.skipped, columns=["path", "reason"])
        logger.log_text(skipped.to_csv(index=False), "data/skipped_files.csv")


def fit(prep: Prepared, logger: FitLogger, reporter: Reporter, checkpoint: dict | None) -> dict[str, Any]:
    """The epochs of one prepared run, then the final evaluation and results, written through ``logger``
    (a ``tracking.RunLogger``; ``tracking.NullLogger`` writes nothing). ``checkpoint``: resume from it."""
    cfg, model, settings, data, splits = prep.config, prep.model, prep.settings, prep.data, prep.splits
    strategy = get_strategy(cfg.strategy)
    switch_epoch = strategy.switch_epoch(cfg.lp_epochs)  # lpft: the first epoch that fine-tunes everything
    optimizer = torch.optim.Adam(prep.param_groups, lr=cfg.lr)
    scaler = torch.amp.GradScaler(settings.device.type) if settings.amp_dtype == torch.float16 else None
    shuffle_gen = torch.Generator().manual_seed(cfg.seed)
    augment_gen = torch.Generator().manual_seed(cfg.seed + 10_000)
    train_preset, eval_preset = TrainPreset(), EvalPreset()
    # No cudnn.benchmark: on an H200, autotuning each new batch shape cost 10-40 s per run, more than all
    # of a small dataset's epochs. The plain path cuts its batches from the decoded uint8 images, on the
    # GPU when they fit there.
    images = data.images if use_feature_cache(cfg) and switch_epoch is None else settings.stage(data.images)
    labels = data.labels
    step_model = torch.compile(model) if cfg.compile else model

    history: list[dict[str, float]] = []
    best = {"acc": -1.0, "epoch": 0, "state": None}
    start_epoch = 0
    state: dict[str, Any] = {}  # the last kept checkpoint
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        if switch_epoch is not None and int(checkpoint["epoch"]) >= switch_epoch:  # saved after the switch
            optimizer = _start_finetune(model, cfg)
        optimizer.load_state_dict(checkpoint["optimizer"])
        shuffle_gen.set_state(checkpoint["shuffle_gen"])
        augment_gen.set_state(checkpoint["augment_gen"])
        restore_rng_states(checkpoint, settings)
        history = [dict(h) for h in checkpoint["history"]]
        best = {"acc": float(checkpoint["best_acc"]), "epoch": int(checkpoint["best_epoch"]),
                "state": checkpoint["best_state"]}
        start_epoch = int(checkpoint["epoch"])
        state = checkpoint
        logger.keep_checkpoint(state)  # what the final steps record below goes into it

    cached = None
    # The frozen-backbone features are part of what transfer costs: their time is added to the first
    # epoch this process trains, so epoch times, totals and time-to-accuracy charts all include it.
    feature_cache_s = 0.0
    if use_feature_cache(cfg) and strategy.body_frozen_in(start_epoch + 1, lp_epochs=cfg.lp_epochs):
        reporter.stage(f"computing frozen-backbone features once ({cfg.feature_cache_views} augmented views)")
        t0 = time.perf_counter()
        cached = _cached_features(prep, train_preset)
        settings.synchronize()  # so that the time below is the features' time, not only their launch
        feature_cache_s = time.perf_counter() - t0
        if checkpoint is None:  # a resumed run logged it already (nothing is logged twice)
            logger.log_metrics({"feature_cache_time_s": feature_cache_s}, step=0)
            torch.manual_seed(cfg.seed + 1)  # dropout stream independent of how features were computed

    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        if epoch == switch_epoch:
            # The linear probe is over: the whole net trains from here, on images (the cached features of
            # the frozen body no longer describe it), with a fresh Adam over finetune's groups.
            reporter.stage(f"epoch {epoch}: linear probe done; fine-tuning the whole network")
            optimizer, cached = _start_finetune(model, cfg), None
        n_batches = -(-len(splits.train) // cfg.batch_size)
        reporter.epoch_start(epoch, cfg.epochs, n_batches)
        on_batch = lambda n, stats: reporter.batch(stats)  # noqa: E731
        if cached is not None:
            view = torch.randint(cfg.feature_cache_views, (len(splits.train),), generator=augment_gen)
            train_x = cached["train"][view.to(cached["train"].device), torch.arange(len(splits.train))]
            train_y = labels[splits.train]
            batches = iterate_batches(train_x, train_y, torch.arange(len(train_y)), batch_size=cfg.batch_size,
                                      settings=settings, shuffle=True, generator=shuffle_gen)
            tr = train_one_epoch(model.head, batches, optimizer, settings=settings, scaler=scaler, on_batch=on_batch)
            val_batches = iterate_batches(cached["val"], labels[splits.val], torch.arange(len(splits.val)),
                                          batch_size=cfg.eval_batch_size, settings=settings)
            va = evaluate(model.head, val_batches, settings=settings)
        else:
            batches = iterate_batches(images, labels, splits.train, batch_size=cfg.batch_size, settings=settings,
                                      transform=train_preset, shuffle=True, generator=shuffle_gen,
                                      transform_generator=augment_gen)
            tr = train_one_epoch(step_model, batches, optimizer, settings=settings, scaler=scaler, on_batch=on_batch)
            va = evaluate(step_model, iterate_batches(images, labels, splits.val, batch_size=cfg.eval_batch_size,
                                                      settings=settings, transform=eval_preset), settings=settings)
        _check_finite(epoch, tr, va, cfg, logger)
        row = {"epoch": epoch, "train_loss": tr["loss"], "train_acc": tr["acc"], "val_loss": va["loss"],
               "val_acc": va["acc"],
               "epoch_time_s": time.perf_counter() - t0 + (feature_cache_s if epoch == start_epoch + 1 else 0.0),
               "lr": optimizer.param_groups[-1]["lr"], "train_samples_per_s": tr["samples_per_s"]}
        # Ctrl-C/SIGTERM inside waits until metrics and checkpoint agree, so --resume repeats no epoch.
        with logger.atomic():
            history.append(row)
            logger.log_metrics({k: row[k] for k in EPOCH_METRICS}, step=epoch)
            reporter.epoch_end(epoch, cfg.epochs, row)
            if va["acc"] > best["acc"]:
                best = {"acc": va["acc"], "epoch": epoch, "state": _cpu_state(model)}
            # Copies: the next epoch updates the optimizer's moments in place before the checkpoint is saved.
            state = {
                "epoch": epoch, "model": _cpu_state(model), "optimizer": _cpu_copy(optimizer.state_dict()),
                "shuffle_gen": shuffle_gen.get_state(), "augment_gen": augment_gen.get_state(),
                **rng_states(settings), "history": [dict(h) for h in history],
                "best_acc": best["acc"], "best_epoch": best["epoch"], "best_state": best["state"]}
            logger.keep_checkpoint(state)
    reporter.done()

    # A signal during the final evaluation and logging waits for their end (the run then ends FINISHED
    # with one whole model). A second one acts at once: the checkpoint then says what was already
    # logged, so that --resume logs the rest and nothing twice.
    with logger.finishing():
        logged = set(state.get("final_logged", []))

        def done(step: str) -> None:
            logged.add(step)
            logger.keep_checkpoint({**state, "final_logged": sorted(logged)})

        model.load_state_dict(best["state"])
        metrics = _summary_metrics(history, best, model)
        results = {"val": _final_eval(prep, cached, "val")}
        if splits.test is not None and len(splits.test):
            results["test"] = _final_eval(prep, cached, "test")
            metrics["test_acc"], metrics["test_loss"] = results["test"]["acc"], results["test"]["loss"]
        metrics["train_samples_per_class"] = len(splits.train) / data.num_classes
        if "summary" not in logged:
            logger.log_metrics(metrics, step=0, synchronous=True)
            done("summary")
        _log_results(logger, prep, history, results)  # artifacts: logging one again replaces it
        if "model" not in logged:
            _log_model(logger, prep)
            done("model")
    return {"metrics": metrics, "history": history}


def rng_states(settings: DeviceSettings) -> dict[str, Any]:
    """The global random states a resumed run must continue (dropout draws from them): the CPU's, and
    on CUDA every device's, so that a resumed GPU run draws what the uninterrupted one would have."""
    out: dict[str, Any] = {"torch_rng": torch.get_rng_state()}
    if settings.device.type == "cuda":
        out["cuda_rng"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng_states(checkpoint: dict[str, Any], settings: DeviceSettings) -> None:
    """Undo ``rng_states``. A run resumed on another kind of device draws another stream anyway."""
    torch.set_rng_state(checkpoint["torch_rng"])
    if "cuda_rng" in checkpoint and settings.device.type == "cuda":
        for index, cuda_state in enumerate(checkpoint["cuda_rng"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


class Diverged(ConfigError):
    """Training produced a non-finite loss: the run is FAILED; the last finite epoch's checkpoint is kept."""

    def __init__(self, message: str, *, epoch: int) -> None:
        super().__init__(message)
        self.epoch = epoch


def _check_finite(epoch: int, tr: dict[str, Any], va: dict[str, Any], cfg: TrainConfig, logger: Any) -> None:
    """Divergence is a failure, not a result: NaN logits predict class 0 and would score chance accuracy.

    The epoch's losses are host floats already (one sync per epoch), so this costs nothing per batch.
    """
    for split, loss in (("training", tr["loss"]), ("validation", va["loss"])):
        if not math.isfinite(loss):
            kept = f"epoch {epoch - 1}'s checkpoint is kept" if epoch > 1 else "no epoch had finished"
            run = getattr(logger, "run_id", None)
            raise Diverged(f"Training diverged at epoch {epoch}: the {split} loss is {loss}"
                           f"{f'; run {run} was marked FAILED' if run else ''} ({kept}); train again with "
                           f"a smaller --lr than {cfg.lr:g}.", epoch=epoch)


def _start_finetune(model: Classifier, cfg: TrainConfig) -> torch.optim.Optimizer:
    """lpft's second phase: the body thawed, a fresh Adam over finetune's groups (body at lr x mult)."""
    return torch.optim.Adam(thaw(model, lr=cfg.lr, backbone_lr_mult=cfg.backbone_lr_mult), lr=cfg.lr)


def _cached_features(prep: Prepared, preset: TrainPreset) -> dict[str, torch.Tensor]:
    cfg, data, splits, settings = prep.config, prep.data, prep.splits, prep.settings
    key = (data.fingerprint, cfg.model, cfg.weights, cfg.image_size, str(settings.amp_dtype), cfg.channels_last,
           str(settings.device), cfg.seed, cfg.feature_cache_views)
    store = feature_cache.feature_store(key, num_images=len(data.images), views=cfg.feature_cache_views,
                                        seed=cfg.seed)
    body = prep.model.features
    out = {"train": store.get_augmented(body, data.images, splits.train, settings=settings,
                                        batch_size=cfg.eval_batch_size, preset=preset),
           "val": store.get_clean(body, data.images, splits.val, settings=settings, batch_size=cfg.eval_batch_size)}
    if splits.test is not None and len(splits.test):
        out["test"] = store.get_clean(body, data.images, splits.test, settings=settings,
                                      batch_size=cfg.eval_batch_size)
    return out


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _cpu_copy(obj: Any) -> Any:
    """A deep copy with every tensor copied to the CPU (an optimizer's state_dict holds live tensors)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


def _final_eval(prep: Prepared, cached: dict | None, split: str) -> dict[str, Any]:
    index = getattr(prep.splits, split)
    labels = prep.data.labels
    if cached is not None:
        batches = iterate_batches(cached[split], labels[index], torch.arange(len(index)),
                                  batch_size=prep.config.eval_batch_size, settings=prep.settings)
        return evaluate(prep.model.head, batches, settings=prep.settings)
    batches = iterate_batches(prep.data.images, labels, index, batch_size=prep.config.eval_batch_size,
                              settings=prep.settings, transform=EvalPreset())
    return evaluate(prep.model, batches, settings=prep.settings)


def _summary_metrics(history: list[dict[str, float]], best: dict, model: Classifier) -> dict[str, float]:
    total, trainable = count_parameters(model)
    last = history[-1]
    return {
        "best_val_acc": best["acc"], "best_epoch": best["epoch"],
        "final_train_acc": last["train_acc"], "final_val_acc": last["val_acc"],
        "total_time_s": sum(h["epoch_time_s"] for h in history),
        "avg_epoch_time_s": sum(h["epoch_time_s"] for h in history) / len(history),
        "params_total": total, "params_trainable": trainable, "trainable_fraction": trainable / total,
    }


def _log_results(logger: FitLogger, prep: Prepared, history: list[dict[str, float]], results: dict[str, Any]) -> None:
    import pandas as pd

    from .plots import confusion_figure

    logger.log_text(pd.DataFrame(history).to_csv(index=False), "history.csv")
    classes = prep.data.classes
    for split, res in results.items():
        cm = confusion_matrix(res["pred"], res["target"], len(classes))
        support = cm.sum(1).tolist()
        # A class with no image in this split was not measured: "n/a", not an accuracy of 0.
        per_class = pd.DataFrame({
            "class": classes, "support": support, "correct": cm.diag().tolist(),
            "accuracy": [c / s if s else "n/a" for c, s in zip(cm.diag().tolist(), support)]})
        logger.log_text(per_class.to_csv(index=False), f"eval/per_class_accuracy_{split}.csv")
        logger.log_figure(confusion_figure(cm.numpy(), classes, title=f"Confusion matrix ({split})"),
                          f"eval/confusion_matrix_{split}.png")
    logger.log_dict({"classes": classes}, "model_classes.json")


def _log_model(logger: FitLogger, prep: Prepared) -> None:
    model = copy.deepcopy(prep.model).to("cpu").to(memory_format=torch.contiguous_format).eval()
    # Batch of 2: an example of batch size 1 freezes the exported (pt2) model to batch size 1.
    example = (prep.data.images[prep.splits.val[:2]].float() / 255.0).numpy()
    logger.log_model(model, input_example=example, class_names=prep.data.classes)

