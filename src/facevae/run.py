"""A run directory and everything done with one: its paths, its config, its model, its data, eval.json, pictures.

    RUN_DIR/config.toml        the resolved configuration
    RUN_DIR/model.safetensors  the model to use (weights; config in its metadata)
    RUN_DIR/checkpoint/        what resume needs (facevae.checkpoint)
    RUN_DIR/metrics.jsonl      one JSON object per logged step and per epoch
    RUN_DIR/images/            pictures: per-epoch grids, sample.png, reconstruct.png
    RUN_DIR/eval.json          what `facevae evaluate` last computed

Training, evaluation, sampling, reconstruction and comparison all take a Run; tools that read a trained run (latent
tools, reports, export) take one too, and checks on what may be written into a run (locks, safe outputs) live here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

import facevae.checkpoint as ckpt
from facevae.config import Config
from facevae.data import SplitView, checked_cache, split_view
from facevae.errors import UserError
from facevae.fileio import atomic_write
from facevae.images import grid, pairs, save_png
from facevae.model import VAE
from facevae.pixels import to_float

# Keys that fix the network's shape: a resumed run cannot change them.
ARCHITECTURE_KEYS = ("image_size", "channels", "widths", "latent_dim", "likelihood")
EVAL_KEYS = ("elbo_nats", "nll_iw_nats", "psnr_db", "likelihood")  # what makes a file an evaluation report


class Run:
    """A run directory: the paths of its files and the operations on them. Creating one touches nothing."""

    def __init__(self, path: "str | Path | Run"):
        self.path = Path(path.path if isinstance(path, Run) else path)
        self.config_file = self.path / "config.toml"
        self.model_file = self.path / ckpt.MODEL_FILE
        self.metrics_file = self.path / "metrics.jsonl"
        self.images_dir = self.path / "images"
        self.eval_file = self.path / "eval.json"

    def __str__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------ config
    def resolve_config(self, base: Config | None, overrides: list[str]) -> Config:
        """The run's config: defaults < config file (else the run's saved config.toml when resuming) < overrides.

        A run that has a checkpoint keeps its network: changing an architecture key is refused.
        """
        saved = Config.from_toml(self.config_file) if self.config_file.is_file() else None
        config = (base or saved or Config()).with_overrides(overrides).validate()
        if saved is not None and ckpt.has_checkpoint(self.path):
            changed = [k for k in ARCHITECTURE_KEYS if getattr(config, k) != getattr(saved, k)]
            if changed:
                raise UserError(f"{self} was trained with other {', '.join(changed)} "
                                f"({', '.join(f'{k} = {getattr(saved, k)}' for k in changed)}); "
                                f"use a new --out to train a different network")
        return config

    def write_config(self, config: Config) -> None:
        """Create the directory (if new) and write the resolved config.toml."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write(self.config_file, config.to_toml())
        except OSError as e:
            raise UserError(f"cannot write to run directory {self}: {e.strerror or e}; "
                            f"choose a writable --out") from None

    # ------------------------------------------------------------ model and data
    def load_model(self, *, device: str | torch.device = "cpu") -> VAE:
        """The trained model, in eval mode, on `device` (CPU unless given)."""
        if not self.path.is_dir():
            raise UserError(f"run directory {self} does not exist; train one with `facevae train --out {self}`")
        if not self.model_file.is_file():
            raise UserError(f"{self} holds no trained model ({ckpt.MODEL_FILE} is missing); "
                            f"train it with `facevae train --out {self}`")
        return ckpt.load_model(self.model_file, device=device)

    def data(self, config: Config, split: str) -> SplitView:
        """A split of the data the run's config names (prepared on first use), read through the cache."""
        return split_view(checked_cache(config), split)

    # ------------------------------------------------------------ eval.json
    def write_eval(self, report: dict[str, Any]) -> None:
        atomic_write(self.eval_file, json.dumps(report, indent=2) + "\n")

    def read_eval(self) -> dict[str, Any]:
        """eval.json; a UserError telling to run `facevae evaluate` when it is missing or unreadable."""
        if not self.path.is_dir():
            raise UserError(f"run directory {self} does not exist")
        if not self.eval_file.is_file():
            raise UserError(f"{self} has no {self.eval_file.name}; run `facevae evaluate {self}` first")
        try:
            report = json.loads(self.eval_file.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{self.eval_file} is unreadable ({e}); run `facevae evaluate {self}` again") from None
        missing = [k for k in EVAL_KEYS if not isinstance(report, dict) or k not in report]
        if missing:
            raise UserError(f"{self.eval_file} is not a facevae evaluation report (missing {missing}); "
                            f"run `facevae evaluate {self}` again")
        return report

    def eval_is_stale(self) -> bool:
        """Whether the model file is newer than eval.json."""
        return self.model_file.stat().st_mtime > self.eval_file.stat().st_mtime

    # ------------------------------------------------------------ pictures
    def picture(self, name: str) -> Path:
        """The path of a picture of the run: RUN_DIR/images/NAME."""
        return self.images_dir / name


def load_run(run_dir: str | Path | Run, *, device: str | torch.device = "cpu") -> VAE:
    """The trained model of a run directory, in eval mode, on `device` (CPU unless given)."""
    return Run(run_dir).load_model(device=device)


def _check_count(n: int) -> None:
    if n < 1:
        raise UserError(f"-n must be at least 1, got {n}")


def reconstruct_run(run: str | Path | Run, *, split: str = "test", n: int = 32, out: str | Path | None = None) -> Path:
    """The first n images of a split (upper rows) above their reconstructions (lower rows) as a PNG grid."""
    _check_count(n)
    run = Run(run)
    vae = run.load_model()
    real = run.data(vae.config, split)[:n]  # only these n images are read
    rec = vae.reconstruct(to_float(real))
    return save_png(grid(pairs(real, rec)), out or run.picture("reconstruct.png"))


@torch.no_grad()
def save_epoch_pictures(run: Run, vae: VAE, real: torch.Tensor, epoch: int, *, seed: int, count: int) -> None:
    """images/reconstructions_eNNN.png (real rows above predicted rows) and images/samples_eNNN.png, plus the latest.

    The prior draws come from their own generator (the same every epoch, so the grids show progress) and leave the
    training RNG untouched.
    """
    vae.eval()
    device = next(vae.parameters()).device
    rec = vae.reconstruct(to_float(real, device))
    samples = vae.sample(count, generator=torch.Generator().manual_seed(seed))
    for name, img in (("reconstructions", grid(pairs(real, rec))), ("samples", grid(samples))):
        save_png(img, run.picture(f"{name}_e{epoch:03d}.png"), run.picture(f"{name}.png"))
