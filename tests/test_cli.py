"""The command line's contract: every choice listed in --help, usage errors as one line."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from tlexp.cli import app
from tlexp.config import Device, FeatureCache, Head, Precision, Strategy, choices


def _help(command: str) -> str:
    out = CliRunner().invoke(app, [command, "--help"], terminal_width=240, env={"COLUMNS": "240"}).output
    return re.sub(r"\s+", " ", out.replace("│", " "))


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_help_lists_every_choice_of_every_option_with_choices(command):
    text = _help(command)
    for enum in (Strategy, Head, Device, Precision, FeatureCache):
        for value in choices(enum):
            assert value in text, (enum.__name__, value)
    # the shared options are declared once but offered by both commands
    for option in ("--lp-epochs", "--test-fraction", "--split-seed", "--no-system-metrics", "--feature-cache"):
        assert option in text


def test_train_and_sweep_share_defaults_except_where_overridden():
    assert "[default: 15]" in _help("train") and "[default: 10]" in _help("sweep")


@pytest.mark.parametrize("args, needles", [
    (["--head", "wide"], ["--head", "'wide'", "'mlp', 'linear'"]),
    (["--precision", "fp8"], ["--precision", "'fp8'", "'bf16'"]),
    (["--feature-cache", "maybe"], ["--feature-cache", "'maybe'", "'on'"]),
    (["--epochs", "many"], ["--epochs", "integer"]),
])
def test_a_bad_choice_is_one_line_and_exit_2(args, needles):
    result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_importing_the_cli_loads_no_transforms_v2_and_no_benchmark():
    """`tlexp --help` stays cheap, and the package holds no benchmark harness."""
    import subprocess
    import sys

    code = ("import os, pkgutil, sys, tlexp, tlexp.cli, tlexp.data; "
            "loaded = [m for m in sys.modules if m.startswith(('torchvision.transforms.v2', 'tlexp.bench', "
            "'bench_', 'seed_loop', 'benchmarks'))]; "
            "print(loaded, [m.name for m in pkgutil.iter_modules([os.path.dirname(tlexp.__file__)]) "
            "if 'bench' in m.name])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] []", out.stdout + out.stderr
