"""The ``tlexp`` command line: thin Typer commands that build a config and call the core.

A user's mistake (bad option value, missing data, unreachable store...) ends
with one sentence on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import shlex
import sys
from contextlib import contextmanager
from enum import Enum
from typing import Annotated, Any, Callable, Iterator, Optional

import typer
from typer.core import TyperGroup

from .config import (DEFAULT_EXPERIMENT, STRATEGIES, ConfigError, Device, FeatureCache, Head, Precision, Strategy,
                     TrainConfig, choices)

# Typer's usage errors (BadParameter, NoSuchOption, ...) share this base class; Typer exports only BadParameter.
_UsageError: type[Exception] = typer.BadParameter.__mro__[1]


class OneLineErrors(TyperGroup):
    """Typer's usage errors (an unknown choice, a malformed number) as one line on stderr and exit code 2,
    like tlexp's own checks, instead of a usage block and a boxed message."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except _UsageError as exc:
            message = exc.format_message()  # type: ignore[attr-defined]
            if not message.strip() or "\n" in message.strip():  # no arguments: the help text
                exc.show()  # type: ignore[attr-defined]
                sys.exit(exc.exit_code)  # type: ignore[attr-defined]
            message = " ".join(message.replace("Value error, ", "").split())
            typer.secho(f"Error: {message}", err=True, fg=typer.colors.RED)
            sys.exit(EXIT_USAGE)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
    help="Should you fine-tune a pretrained model or train from scratch, on your data? "
         "Train each strategy as an MLflow run, then compare.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

EXIT_USAGE = 2


@app.callback()
def _root() -> None:
    """tlexp: transfer learning vs training from scratch, tracked with MLflow."""
    # MLflow's INFO lines ("Creating initial MLflow database tables...") drown the progress output;
    # its warnings stay. A user's own MLFLOW_LOGGING_LEVEL wins.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # tlexp draws its own bars


@contextmanager
def user_errors(*, sweep: bool = False) -> Iterator[None]:
    """Turn the errors a user can cause into one line on stderr and exit code 2."""
    try:
        yield
    except _user_error_types() as exc:
        typer.secho(f"Error: {' '.join(str(exc).split(chr(10)))}", err=True, fg=typer.colors.RED)
        raise typer.Exit(EXIT_USAGE) from None
    except KeyboardInterrupt as exc:
        message = interrupted_message(exc)
        if sweep and not hasattr(exc, "user_message"):
            message += (" The sweep's finished cells are kept: re-run the same `tlexp sweep` command to run "
                        "only the cells that are left.")
        typer.secho(message, err=True, fg=typer.colors.YELLOW)
        raise typer.Exit(128 + getattr(exc, "signum", 2)) from None
    except torch_oom_types() as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        run_id = getattr(exc, "tlexp_run_id", None)
        marked = f"run {run_id} was marked FAILED" if run_id else "nothing was logged"
        typer.secho(f"Error: out of memory ({first}); {marked}; try a smaller --batch-size "
                    f"(or --image-size).", err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from None


def _user_error_types() -> tuple[type[BaseException], ...]:
    """The errors a user can cause. Evaluated only once an exception is raised, and only from modules already
    imported (an error of a module that was never imported cannot have been raised): importing data.py or
    models.py just to name their errors would load torch and torchvision, seconds that `compare` against a
    server that is down must not spend."""
    from .tracking import TrackingError

    errors: tuple[type[BaseException], ...] = (ConfigError, TrackingError)
    for module, name in (("tlexp.data", "DataError"), ("tlexp.models", "WeightsError"),
                         ("tlexp.compare", "CompareError")):
        if module in sys.modules:
            errors += (getattr(sys.modules[module], name),)
    return errors


def interrupted_message(exc: BaseException) -> str:
    """What a Ctrl-C / SIGTERM left behind, and how to continue."""
    if hasattr(exc, "user_message"):  # says itself what it left (a Ray sweep's cancelled cells)
        return exc.user_message()
    run_id, epoch = getattr(exc, "run_id", None), getattr(exc, "epoch", None)
    if run_id is None:
        return "Interrupted while no run was open: no run was left unfinished."
    if getattr(exc, "finished", False):
        return f"Interrupted: run {run_id} had finished its final evaluation and logging first; it is FINISHED."
    if epoch is None:
        return (f"Interrupted: run {run_id} was marked KILLED before its first epoch ended, so there is "
                f"nothing to resume; start it again.")
    return (f"Interrupted: run {run_id} was marked KILLED and epoch {epoch} (the last completed) saved; "
            f"continue it with `tlexp train --resume {shlex.quote(run_id)}`.")


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


# ------------------------------------------------------------------ options shared by train and sweep
# Each TrainConfig field that is a command-line option is declared here once (type, help, choices); the
# default is the field's own default in TrainConfig unless a command overrides it.
def _choice_help(text: str, enum: type) -> str:
    return f"{text} ({' | '.join(choices(enum))})."


CONFIG_OPTIONS: dict[str, Any] = {
    "data": Annotated[str, typer.Option(help="'digits' (built in, offline), 'flowers102', or a path to an "
                                             "ImageFolder tree (class folders, or split folders train/, val/, test/).")],
    "model": Annotated[str, typer.Option(help="efficientnet_lite0 (offline ImageNet weights), a torchvision "
                                              "model such as resnet50, or a timm model name.")],
    "weights": Annotated[Optional[str], typer.Option(help="Local state_dict to use as pretrained weights.")],
    "head": Annotated[Head, typer.Option(help="mlp: the seed's 512-unit head; linear: one layer.")],
    "epochs": Annotated[int, typer.Option(help="Training epochs.")],
    "batch_size": Annotated[int, typer.Option(help="Training batch size.")],
    "lr": Annotated[float, typer.Option(help="Adam learning rate (head; whole net for scratch).")],
    "backbone_lr_mult": Annotated[float, typer.Option(help="finetune, lpft: backbone lr = lr x this.")],
    "lp_epochs": Annotated[int, typer.Option(help="lpft: epochs of linear probing before fine-tuning.")],
    "image_size": Annotated[str, typer.Option(help="Pixels per side, or 'auto' (224 for photos, 64 for digits).")],
    "val_fraction": Annotated[float, typer.Option(help="Validation share carved from train when the data has "
                                                       "no val/ folder.")],
    "test_fraction": Annotated[float, typer.Option(help="Held-out test share carved when the data has no test "
                                                        "split.")],
    "split_seed": Annotated[int, typer.Option(help="Seed of the validation/test split (the same for every run "
                                                   "of a study; --seed does not move it).")],
    "device": Annotated[Device, typer.Option(help="Where to train; auto picks cuda, then mps, then cpu.")],
    "precision": Annotated[Precision, typer.Option(help="auto = bf16 autocast on CUDA, fp32 elsewhere.")],
    "channels_last": Annotated[bool, typer.Option(help="Use the channels_last memory format.")],
    "compile": Annotated[bool, typer.Option("--compile", help="torch.compile the model.")],
    "num_workers": Annotated[int, typer.Option(help="Threads that decode images (once, then cached).")],
    "feature_cache": Annotated[FeatureCache, typer.Option(help="transfer, lpft: compute frozen-backbone "
                                                               "features once.")],
    "feature_cache_views": Annotated[int, typer.Option(help="Augmented views per image in the feature cache.")],
    "system_metrics": Annotated[bool, typer.Option(help="Log MLflow system metrics (CPU, memory, GPU).")],
    "experiment": Annotated[str, typer.Option(help="MLflow experiment name.")],
}
CLI_DEFAULTS = {"image_size": "auto"}  # where the option's text differs from the config's value (None)
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


def config_options(*, defaults: dict[str, Any] | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add every option of CONFIG_OPTIONS to a command; it receives them as one dict, ``options``.

    Typer reads a command's options from its signature, so the wrapper's signature is the command's own
    parameters (less ``options``) plus the shared ones, with TrainConfig's defaults (or ``defaults``).
    """
    field_defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    overrides = {**CLI_DEFAULTS, **(defaults or {})}

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "options"]
        names = set(p.name for p in own)
        shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                    default=overrides.get(name, field_defaults[name]))
                  for name, annotation in CONFIG_OPTIONS.items() if name not in names]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            options = {p.name: kwargs.pop(p.name) for p in shared}
            return command(options=options, **kwargs)

        wrapper.__signature__ = inspect.Signature(own + shared)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in own + shared}
        return wrapper

    return decorate


def config_from_options(options: dict[str, Any], **fields: Any) -> TrainConfig:
    """A TrainConfig from the shared options (choices as their values, 'auto' sizes as None) and ``fields``."""
    values = {k: (v.value if isinstance(v, Enum) else v) for k, v in {**options, **fields}.items()}
    if isinstance(values.get("image_size"), str):
        values["image_size"] = parse_image_size(values["image_size"])
    return TrainConfig(**values)


def _split_list(option: str, value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise ConfigError(f"{option} is empty; give one or more comma-separated values.")
    return items


def parse_strategies(option: str, value: str) -> list[str]:
    """Comma-separated strategies, each one of Strategy, none twice."""
    items = _split_list(option, value)
    for item in items:
        if item not in STRATEGIES:
            raise ConfigError(f"Unknown strategy {item!r} in {option}; expected one of: {', '.join(STRATEGIES)}.")
    if len(set(items)) != len(items):
        raise ConfigError(f"{option} lists a strategy twice: {value}; give each once.")
    return items


@app.command()
@config_options()
def train(
    ctx: typer.Context,
    *,
    strategy: Annotated[str, typer.Option(help=_choice_help("One strategy or several comma-separated, each its "
                                                            "own run", Strategy))] = "transfer",
    seed: Annotated[int, typer.Option(help="Seed for init, shuffling, augmentation and subsets.")] = 42,
    samples_per_class: Annotated[str, typer.Option(help="Train on N images per class, or 'all'.")] = "all",
    train_fraction: Annotated[float, typer.Option(help="Train on this stratified fraction of the train split.")] = 1.0,
    run_name: Annotated[Optional[str], typer.Option(help="MLflow run name (default strategy-model-sSEED).")] = None,
    resume: Annotated[Optional[str], typer.Option(help="Continue an interrupted run (its RUN_ID, or the first 8+ "
                                                       "characters of it) from its last saved epoch, with its "
                                                       "own settings.")] = None,
    force: Annotated[bool, typer.Option("--force", help="With --resume: continue a RUNNING run even though "
                                                        "its heartbeat is recent (you know its process is "
                                                        "dead).")] = False,
    quiet: QuietOpt = False,
    options: dict[str, Any],
) -> None:
    """Train one or more strategies, each as its own MLflow run."""
    from .experiment import train as train_run

    with user_errors():
        reporter = _reporter(quiet)
        if resume is not None:
            # A resumed run continues with the settings it logged; an option that would change it is refused,
            # not ignored. (To train longer or at another lr, start a new run: its curve is then its own.)
            changed = [f"--{name.replace('_', '-')}" for name in explicit_options(ctx)
                       if name not in ("resume", "quiet", "force")]
            if changed:
                raise ConfigError(f"--resume continues run {resume} with its own settings, so {', '.join(changed)} "
                                  f"cannot be given with it; leave {'it' if len(changed) == 1 else 'them'} out, or "
                                  f"start a new run.")
            summary = train_run(TrainConfig(), reporter=reporter, resume_run_id=resume, force=force)
            _print_summaries([summary])
            return
        if force:
            raise ConfigError("--force only goes with --resume RUN_ID (it resumes a RUNNING run whose process "
                              "is dead).")
        strategies = parse_strategies("--strategy", strategy)
        base = config_from_options(options, strategy=strategies[0], seed=seed, run_name=run_name,
                                   samples_per_class=parse_samples_per_class(samples_per_class),
                                   train_fraction=train_fraction)
        # Validate every strategy's config before the first run starts: fail fast, not after an hour.
        configs = [base.replace(strategy=s).validate() for s in strategies]
        if len(configs) > 1 and run_name is not None:
            raise ConfigError("--run-name names one run; leave it out when training several strategies.")
        if len(configs) > 1:  # also data, weights and sizes of every strategy, before the first one trains
            from .experiment import preflight

            preflight(configs, reporter=reporter)
        # Under `mlflow run`, several strategies are child runs of the run MLflow created, never one run.
        from .tracking import outer_run_id

        parent = outer_run_id() if len(configs) > 1 else None
        summaries = []
        for cfg in configs:
            summaries.append(train_run(cfg, reporter=reporter, parent_run_id=parent))
        _print_summaries(summaries)


@app.command()
@config_options(defaults={"epochs": 10})
def sweep(
    ctx: typer.Context,
    *,
    strategies: Annotated[str, typer.Option(help=_choice_help("Comma-separated strategies", Strategy))
                          ] = "scratch,transfer,finetune",
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds (the spread over seeds is the noise).")] = "0,1,2",
    samples_per_class: Annotated[str, typer.Option(help="Comma-separated training-set sizes per class; "
                                                        "'all' = the whole train split.")] = "5,20,all",
    lrs: Annotated[Optional[str], typer.Option(help="Comma-separated learning rates: a learning-rate axis, so "
                                                    "each strategy is compared at its best lr on validation "
                                                    "(instead of --lr).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the cells and which would run; train nothing.")] = False,
    executor: Annotated[str, typer.Option(help="Where cells run: 'local' (one after another, in this process) "
                                               "or 'ray' (Ray tasks, in parallel, on one machine or a "
                                               "cluster).")] = "local",
    ray_address: Annotated[Optional[str], typer.Option(help="With --executor ray: 'auto' or HOST:PORT joins a "
                                                            "running Ray cluster (default: start a local "
                                                            "instance).")] = None,
    cpus_per_cell: Annotated[float, typer.Option(help="With --executor ray: CPUs each cell reserves (and its "
                                                      "torch threads).")] = 1.0,
    gpus_per_cell: Annotated[Optional[float], typer.Option(help="With --executor ray: GPUs each cell reserves "
                                                                "(default 1 when the cluster has GPUs, else "
                                                                "0).")] = None,
    quiet: QuietOpt = False,
    options: dict[str, Any],
) -> None:
    """Run a study: every strategy x seed x training-set size (x lr) as nested runs under one parent run
    (resumable)."""
    from .sweep import SweepSpec, plan, run_sweep

    with user_errors(sweep=True):
        strategy_list = parse_strategies("--strategies", strategies)
        seed_list = [_parse_int("--seeds", v) for v in _split_list("--seeds", seeds)]
        sizes = [parse_samples_per_class(v) for v in _split_list("--samples-per-class", samples_per_class)]
        lr_list = [] if lrs is None else [_parse_float("--lrs", v) for v in _split_list("--lrs", lrs)]
        if lr_list and "lr" in explicit_options(ctx):
            raise ConfigError("Give either --lr (one learning rate) or --lrs (a learning-rate axis), not both.")
        if len(lr_list) == 1:  # one lr is no axis: the same study, and the same sweep id, as --lr
            options, lr_list = {**options, "lr": lr_list[0]}, []
        base = config_from_options(options, strategy=strategy_list[0], seed=seed_list[0])
        experiment = base.experiment
        ray = _ray_options(ctx, executor, ray_address=ray_address, cpus_per_cell=cpus_per_cell,
                           gpus_per_cell=gpus_per_cell)
        spec = SweepSpec(base=base, strategies=tuple(strategy_list), seeds=tuple(seed_list),
                         samples_per_class=tuple(sizes), lrs=tuple(lr_list)).validate()
        from rich.console import Console

        console = Console(stderr=True)
        if dry_run:  # reads the store, creates nothing, and never waits minutes on a server that is down
            from . import tracking

            with tracking.quick_http():
                tracking.check_store(read_only=True)
                _print_plan(plan(spec))
            return
        result = run_sweep(spec, reporter=_reporter(quiet, prefix="  "), ray=ray,
                           on_cell=lambda cell, n, eta: console.print(_cell_line(cell, n, eta), soft_wrap=True))
        _print_plan(result.cells, title=f"sweep finished (parent run {result.parent_run_id})")
        Console().print(f"Compare: `tlexp compare --experiment {shlex.quote(experiment)}`", soft_wrap=True,
                        markup=False)
        _print_ui_hint(run_id=result.parent_run_id)
        if result.failed:
            typer.secho(f"Error: {len(result.failed)} cell(s) failed; their runs hold the traceback. Re-run the "
                        f"same command to retry only those.", err=True, fg=typer.colors.RED)
            raise typer.Exit(1)


@app.command()
def compare(
    experiment: Annotated[str, typer.Option(help="MLflow experiment name.")] = DEFAULT_EXPERIMENT,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Report folder (default "
                                                  "reports/<experiment>/).")] = None,
    format: Annotated[str, typer.Option("--format", help="Table formats to write, comma-separated: "
                                                         "md, csv, html (charts are always written).")] = "md,csv,html",
    log: Annotated[bool, typer.Option("--log/--no-log", help="Also log the report to the experiment as a "
                                                             "'comparison' run.")] = True,
    tracking_uri: Annotated[Optional[str], typer.Option(help="Tracking store (default: MLFLOW_TRACKING_URI "
                                                             "or ./mlflow.db).")] = None,
) -> None:
    """Compare the strategies of an experiment from the tracking store alone: table, charts, findings."""
    from . import tracking

    # compare is short: every request it makes fails within seconds when the server is down (not in minutes).
    with user_errors(), tracking.quick_http():
        uri = tracking.check_store(tracking_uri, read_only=True)
        if not tracking.store_exists(uri):
            raise tracking.TrackingError(f"Tracking store {uri!r} does not exist yet, so there is nothing to "
                                         f"compare; train first, or point --tracking-uri (or MLFLOW_TRACKING_URI) "
                                         f"at the store your runs are in.")
        # A store that cannot be written still gets its report: the comparison run is what is left out.
        unlogged = tracking.write_problem(uri) if log else None
        from .compare import run_compare

        result = run_compare(experiment, output=output, formats=format, tracking_uri=uri,
                             log_to_mlflow=log and unlogged is None)
        from rich.console import Console

        Console().print(f"Report: {result.output_dir / 'report.html'}  ({len(result.files)} files in "
                        f"{result.output_dir})", soft_wrap=True)
        _print_ui_hint(run_id=result.run_id, experiment=experiment, uri=uri)
        if unlogged:
            typer.secho(f"Error: the report was written, but not logged to MLflow: tracking store {uri!r} cannot "
                        f"be written ({unlogged}); pass --no-log to skip logging.", err=True, fg=typer.colors.RED)
            raise typer.Exit(EXIT_USAGE)


def _ray_options(ctx: typer.Context, executor: str, *, ray_address: str | None, cpus_per_cell: float,
                 gpus_per_cell: float | None):
    """The Ray settings of `tlexp sweep` (None for --executor local, where Ray options make no sense)."""
    from .executors import RayOptions, parse_executor

    ray_address = ray_address or None  # the MLproject passes "" for "start a local instance"
    if parse_executor(executor) == "local":
        given = [n for n in ("ray_address", "cpus_per_cell", "gpus_per_cell") if n in explicit_options(ctx)
                 and (n != "ray_address" or ray_address)]
        if given:
            raise ConfigError(f"--{given[0].replace('_', '-')} goes with --executor ray; add it or leave the "
                              f"option out.")
        return None
    if cpus_per_cell <= 0:
        raise ConfigError(f"--cpus-per-cell must be a positive number, got {cpus_per_cell:g}.")
    if gpus_per_cell is not None and gpus_per_cell < 0:
        raise ConfigError(f"--gpus-per-cell must be 0 or more, got {gpus_per_cell:g}.")
    return RayOptions(address=ray_address, cpus_per_cell=cpus_per_cell, gpus_per_cell=gpus_per_cell)


@app.command()
def predict(
    paths: Annotated[list[str], typer.Argument(help="Image files, folders (searched recursively) or globs.")],
    model: Annotated[str, typer.Option("--model", "-m", help="A training run id, runs:/RUN_ID, "
                                       "models:/NAME@champion or models:/NAME/VERSION.")],
    output: Annotated[str, typer.Option("--output", "-o", help="CSV to write.")] = "predictions.csv",
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 32,
    top_k: Annotated[int, typer.Option(help="How many classes to list per image.")] = 3,
    device: Annotated[Device, typer.Option(help=_choice_help("Where the model runs", Device))] = Device.AUTO,
    tracking_uri: Annotated[Optional[str], typer.Option(help="Tracking store (default: MLFLOW_TRACKING_URI "
                                                             "or ./mlflow.db).")] = None,
) -> None:
    """Label new images with a logged model: prints the first rows and writes predictions.csv."""
    from .predict import predict as run_predict

    with user_errors():
        _use_store(tracking_uri)
        with _progress_bar("predicting") as advance:
            result = run_predict(model, paths, output=output, batch_size=batch_size, top_k=top_k,
                                 device=device.value, progress=advance)
        _print_predictions(result)


@app.command()
def register(
    experiment: Annotated[str, typer.Option(help="MLflow experiment name.")] = DEFAULT_EXPERIMENT,
    name: Annotated[Optional[str], typer.Option(help="Registered model name (default: the experiment's "
                                                     "name).")] = None,
    tracking_uri: Annotated[Optional[str], typer.Option(help="Tracking store (default: MLFLOW_TRACKING_URI "
                                                             "or ./mlflow.db).")] = None,
) -> None:
    """Register the winner's image model as a new version of NAME and point the alias 'champion' at it.

    Winner: the strategy with the best mean test accuracy (compare's headline); among its runs, the one
    with the best validation accuracy.
    """
    from .registry import register_winner

    with user_errors():
        _use_store(tracking_uri)
        done = register_winner(experiment, name=name, tracking_uri=tracking_uri)
        from rich.console import Console

        champion = done.champion
        Console().print(f"Registered {done.name} version {done.version} ({done.uri}): {champion.finding} Run "
                        f"{champion.run_id}, the best on validation ({champion.run_val_acc:.1%}) of "
                        f"{champion.n_runs} {champion.strategy} run(s).", soft_wrap=True, highlight=False)


@app.command()
def evaluate(
    model: Annotated[str, typer.Option("--model", "-m", help="A training run id, runs:/RUN_ID, "
                                       "models:/NAME@champion or models:/NAME/VERSION.")],
    data: Annotated[str, typer.Option(help="A labelled ImageFolder the model never saw (one folder per "
                                           "class, named as the model's classes).")],
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 32,
    device: Annotated[Device, typer.Option(help=_choice_help("Where the model runs", Device))] = Device.AUTO,
    log: Annotated[bool, typer.Option("--log/--no-log", help="Log the result as an evaluation run.")] = True,
    tracking_uri: Annotated[Optional[str], typer.Option(help="Tracking store (default: MLFLOW_TRACKING_URI "
                                                             "or ./mlflow.db).")] = None,
) -> None:
    """Score a model on new labelled images: accuracy with its 95% interval, per class, confusion matrix."""
    from .evaluate import evaluate_model

    with user_errors():
        _use_store(tracking_uri)
        with _progress_bar("evaluating") as advance:
            result = evaluate_model(model, data, batch_size=batch_size, device=device.value, log=log,
                                    progress=advance)
        from rich.console import Console

        console = Console()
        console.print(f"Accuracy {result.accuracy:.1%} on {result.n} images (95% CI {result.ci_low:.1%} to "
                      f"{result.ci_high:.1%}); {len(result.skipped)} unreadable skipped.", highlight=False)
        for row in result.per_class.itertuples():
            if row.support:
                console.print(f"  {row[1]}: {row.accuracy:.1%} ({row.correct}/{row.support})", highlight=False)
        if result.run_id:
            console.print(f"Logged as evaluation run {result.run_id} (confusion matrix: "
                          f"eval/confusion_matrix.png).", highlight=False)


def _use_store(tracking_uri: str | None) -> None:
    """Point MLflow at ``--tracking-uri`` when given (else MLFLOW_TRACKING_URI, else ./mlflow.db)."""
    if tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)


@contextmanager
def _progress_bar(label: str) -> Iterator[Callable[[int, int], None]]:
    """A transient rich progress bar on stderr; yields advance(n, total)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(label, total=None)

        def advance(n: int, total: int) -> None:
            progress.update(task, advance=n, total=total)

        yield advance


def _print_predictions(result: Any, rows: int = 10) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table("path", "label", "probability", "top-k")
    for row in result.frame.head(rows).itertuples():
        table.add_row(str(row.path), str(row.label), f"{row.probability:.1%}", str(row.top_k))
    console.print(table)
    more = f" (first {rows} shown)" if len(result.frame) > rows else ""
    console.print(f"{len(result.frame)} images labelled{more} at {result.images_per_s:.1f} images/s; "
                  f"wrote {result.output}", soft_wrap=True)
    if result.skipped:
        console.print(f"[yellow]{len(result.skipped)} unreadable file(s) skipped[/yellow], e.g. "
                      f"{result.skipped[0][0]} ({result.skipped[0][1]})", soft_wrap=True)


def _parse_int(option: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{option} takes integers, got {value!r}.") from None


def _parse_float(option: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"{option} takes numbers such as 1e-3, got {value!r}.") from None


def explicit_options(ctx: typer.Context) -> list[str]:
    """The command's parameters the user set (on the command line or through the environment), in order."""
    # ParameterSource is an enum of Typer's bundled Click; its member names are the public contract.
    return [name for name in ctx.params
            if getattr(ctx.get_parameter_source(name), "name", "") in ("COMMANDLINE", "ENVIRONMENT")]


def _cell_line(cell, n: int, eta: float | None) -> str:
    size = "all" if cell.config.samples_per_class is None else cell.config.samples_per_class
    left = f", about {_duration(eta)} left" if eta is not None else ""
    # Ray reports a cell as it ends; the local executor as it starts.
    state = (f"{cell.status.lower()} in {_duration(cell.seconds)}" if cell.status in ("FINISHED", "FAILED")
             else cell.action)
    return (f"[bold]cell {cell.index}/{n}[/bold]: {cell.config.strategy}, seed {cell.config.seed}, "
            f"{size} per class, lr {cell.config.lr:g} ({state}{left})")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _print_plan(cells: list, title: str = "sweep plan") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("cell", "strategy", "seed", "per class", "lr", "action", "status", "run"):
        table.add_column(col, no_wrap=True)
    for c in cells:
        size = "all" if c.config.samples_per_class is None else str(c.config.samples_per_class)
        table.add_row(str(c.index), c.config.strategy, str(c.config.seed), size, f"{c.config.lr:g}", c.action,
                      c.status, (c.run_id or "")[:12])
    console = Console()
    console.print(table)
    skipped = sum(c.action == "skip" for c in cells)
    if all(c.status == "PENDING" for c in cells if c.action != "skip"):
        console.print(f"{len(cells)} cells: {skipped} already finished, {len(cells) - skipped} to run.")
    else:
        counts = {s: sum(c.status == s for c in cells if c.action != "skip") for s in ("FINISHED", "FAILED")}
        console.print(f"{len(cells)} cells: {counts['FINISHED']} trained now, {skipped} skipped (finished "
                      f"before), {counts['FAILED']} failed.")


def _reporter(quiet: bool, prefix: str = ""):
    from .console import RichReporter, SilentReporter

    return SilentReporter() if quiet else RichReporter(prefix=prefix)


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
        console.print(f"run id {s.run_id}  ({s.config.run_name})", soft_wrap=True, markup=False)
    console.print(f"Tracking store: {tracking_uri()}", soft_wrap=True)
    console.print(f"Compare: `tlexp compare --experiment {shlex.quote(exp)}`", soft_wrap=True, markup=False)
    _print_ui_hint(run_id=summaries[-1].run_id)


def _print_ui_hint(*, run_id: str | None, experiment: str | None = None, uri: str | None = None) -> None:
    """The end of train, sweep and compare: the command and the link that open the runs table."""
    from rich.console import Console

    from .tracking import ui_hint

    for line in ui_hint(run_id=run_id, experiment=experiment, uri=uri):
        Console().print(line, soft_wrap=True, markup=False, highlight=False)


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
