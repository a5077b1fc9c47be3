"""Tiny trained runs for the tests of what a run shows and ships (curves, TensorBoard, report, export)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

import pytest

from facevae.cli import main

TINY_TRAIN = ["--data", "lfw", "--quiet", "--set", "image_size=32", "--set", "channels=1", "--set", "widths=[8, 16]",
              "--set", "latent_dim=4", "--set", "batch_size=40", "--set", "log_every=1", "--set", "image_count=8",
              "--set", "likelihood=gaussian"]  # the deck's fixed-sigma decoder (the built-in default is another)


def train_tiny(out: Path, *args: str, epochs: int = 2) -> Path:
    """Train a tiny run (two steps an epoch on the bundled faces) through the command line, in this process."""
    assert main(["train", "--out", str(out), "--epochs", str(epochs), *TINY_TRAIN, *args]) == 0
    return out


def import_extra(name: str, extra: str) -> ModuleType:
    """Import a package of an optional extra; skip the module's tests, saying so, where it is missing, except in CI
    (CI=true), which installs every extra these tests need (`make test`): there a missing one fails."""
    try:
        return importlib.import_module(name)
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{name} is not installed: pip install 'facevae[{extra}]' (`make test` installs it)",
                    allow_module_level=True)
