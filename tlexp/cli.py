"""The ``tlexp`` command line: thin Typer commands that build a config and call the core.

A user's mistake (bad option value, missing data, unreachable store...) ends
with one sentence on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Annotated, Iterator, Optional

import typer

from .config import DEFAULT_EXPERIMENT, DEVICES, HEADS, PRECISIONS, STRATEGIES, ConfigError, TrainConfig

app = typer.Typer(
    help="Should you fine-tune a pretrained model or train from scratch, on your data? "
         "Train each strategy as an MLflow run, then compare.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

EXIT_USAGE = 2


@app.callback()
def _root() -> None:
    """tlexp: transfer learning vs training from scratch, tracked with MLflow."""


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can cause into one line on stderr and exit code 2."""
    from .data import DataError
    from .models import WeightsError
    from .tracking import TrackingError

    errors: tuple[type[BaseException], ...] = (ConfigError, DataError, WeightsError, TrackingError)
    try:
        from .compare import CompareError

        errors += (CompareError,)
    except ImportError:  # pragma: no cover - compare is optional while it is being built
        pass
    try:
        yield
    except errors as exc:
        typer.secho(f"Error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(EXIT_USAGE) from None
    except KeyboardInterrupt:
        typer.secho("Interrupted: the run was marked KILLED and its last epoch saved; "
                    "continue it with `tlexp train --resume RUN_ID`.", err=True, fg=typer.colors.YELLOW)
        raise typer.Exit(130) from None
    except torch_oom_types() as exc:
        typer.secho(f"Error: out of memory ({str(exc).splitlines()[0][:120]}); the run was marked FAILED; "
                    f"try a smaller --batch-size or --image-size.", err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from None


def torch_oom_types() -> tuple[type[BaseException], ...]:
    import torch

    return (torch.OutOfMemoryError,)


def parse_samples_per_class(value: str | None) -> int | None:
    if value is None or value.lower() in ("all", "none", ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"--samples-per-class must be a positive integer or 'all', got {value!r}.") from None


def parse_image_size(value: str) -> int | None:
    if value.lower() in ("auto", "none", ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"--image-size must be a whole number of pixels or 'auto', got {value!r}.") from None


def _choices(option: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"Unknown {option} {value!r}; expected one of: {', '.join(allowed)}.")
    return value


@app.command()
def train(
    strategy: Annotated[str, typer.Option(help="scratch | transfer | finetune, or several comma-separated "
                                               "(each is its own run).")] = "transfer",
    data: Annotated[str, typer.Option(help="'digits' (built in, offline), 'flowers102', or a path to an "
                                           "ImageFolder tree (class folders, or train/ val/ [test/]).")] = "digits",
    model: Annotated[str, typer.Option(help="efficientnet_lite0 (offline ImageNet weights), a torchvision "
                                            "model such as resnet50, or a timm model name.")] = "efficientnet_lite0",
    weights: Annotated[Optional[str], typer.Option(help="Local state_dict to use as pretrained weights.")] = None,
    head: Annotated[str, typer.Option(help="mlp (the seed's 512-unit head) | linear.")] = "mlp",
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 15,
    batch_size: Annotated[int, typer.Option(help="Training batch size.")] = 32,
    lr: Annotated[float, typer.Option(help="Adam learning rate (head; whole net for scratch).")] = 1e-3,
    backbone_lr_mult: Annotated[float, typer.Option(help="finetune: backbone lr = lr x this.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed for init, split, shuffling and augmentation.")] = 42,
    image_size: Annotated[str, typer.Option(help="Pixels per side, or 'auto' (224 for photos, "
                                                 "64 for digits).")] = "auto",
    val_fraction: Annotated[float, typer.Option(help="Validation share when the data has no val/ folder.")] = 0.2,
    samples_per_class: Annotated[str, typer.Option(help="Train on N images per class, or 'all'.")] = "all",
    train_fraction: Annotated[float, typer.Option(help="Train on this stratified fraction of the train split.")] = 1.0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto (bf16 on CUDA) | bf16 | fp16 | fp32.")] = "auto",
    channels_last: Annotated[bool, typer.Option(help="Use the channels_last memory format.")] = True,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model.")] = False,
    num_workers: Annotated[int, typer.Option(help="Threads that decode images (once, then cached).")] = 2,
    feature_cache: Annotated[str, typer.Option(help="transfer: compute frozen-backbone features once "
                                                    "(auto | on | off).")] = "auto",
    feature_cache_views: Annotated[int, typer.Option(help="Augmented views per image in the feature cache.")] = 4,
    experiment: Annotated[str, typer.Option(help="MLflow experiment name.")] = DEFAULT_EXPERIMENT,
    run_name: Annotated[Optional[str], typer.Option(help="MLflow run name (default strategy-model-sSEED).")] = None,
    resume: Annotated[Optional[str], typer.Option(help="Continue an interrupted run (its RUN_ID) from its "
                                                       "last completed epoch.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Train one or more strategies, each as its own MLflow run."""
    from .experiment import train as train_run

    with user_errors():
        reporter = _reporter(quiet)
        if resume is not None:
            summary = train_run(TrainConfig(), reporter=reporter, resume_run_id=resume)
            _print_summaries([summary])
            return
        strategies = [s.strip() for s in strategy.split(",") if s.strip()]
        for s in strategies:
            _choices("strategy", s, STRATEGIES)
        _choices("head", head, HEADS)
        _choices("device", device, DEVICES)
        _choices("precision", precision, PRECISIONS)
        base = TrainConfig(
            strategy=strategies[0] if strategies else "", data=data, model=model, weights=weights, head=head,
            epochs=epochs, batch_size=batch_size, lr=lr, backbone_lr_mult=backbone_lr_mult, seed=seed,
            image_size=parse_image_size(image_size), val_fraction=val_fraction,
            samples_per_class=parse_samples_per_class(samples_per_class), train_fraction=train_fraction,
            device=device, precision=precision, channels_last=channels_last, compile=compile,
            num_workers=num_workers, feature_cache=feature_cache, feature_cache_views=feature_cache_views,
            experiment=experiment, run_name=run_name)
        # Validate every strategy's config before the first run starts: fail fast, not after an hour.
        configs = [base.replace(strategy=s).validate() for s in strategies]
        if len(configs) > 1 and run_name is not None:
            raise ConfigError("--run-name names one run; leave it out when training several strategies.")
        summaries = []
        for cfg in configs:
            summaries.append(train_run(cfg, reporter=reporter))
        _print_summaries(summaries)


def _reporter(quiet: bool):
    from .console import RichReporter, SilentReporter

    return SilentReporter() if quiet else RichReporter()


def _print_summaries(summaries: list) -> None:
    from rich.console import Console
    from rich.table import Table

    from .tracking import tracking_uri

    console = Console()
    table = Table(title="tlexp results (validation split)")
    for col in ("strategy", "best val", "@ep", "train", "test", "trainable/total", "time"):
        table.add_column(col, justify="left" if col == "strategy" else "right", no_wrap=True)
    for s in summaries:
        m = s.metrics
        test = f"{m['test_acc']:.1%}" if "test_acc" in m else "-"
        table.add_row(s.config.strategy, f"{m['best_val_acc']:.1%}", str(int(m["best_epoch"])),
                      f"{m['final_train_acc']:.1%}", test,
                      f"{_short(m['params_trainable'])} / {_short(m['params_total'])}", f"{m['total_time_s']:.1f}s")
    console.print(table)
    exp = summaries[0].config.experiment
    for s in summaries:
        console.print(f"run id {s.run_id}  ({s.config.run_name})", soft_wrap=True)
    console.print(f"Tracking store: {tracking_uri()}", soft_wrap=True)
    console.print(f"Look at it: `mlflow ui` (then open http://127.0.0.1:5000) or "
                  f"`tlexp compare --experiment {exp}`.", soft_wrap=True)


def _short(n: float) -> str:
    n = float(n)
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{int(n)}"


def main() -> None:
    """Console-script entry point."""
    app(prog_name="tlexp")


if __name__ == "__main__":  # python -m tlexp.cli (used by the MLproject)
    main()
