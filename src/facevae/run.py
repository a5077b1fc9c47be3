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

import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

import facevae.checkpoint as ckpt
from facevae.config import MAX_SEED, Config, toml_value
from facevae.data import NO_DATA, SplitView, checked_cache, split_view, with_data_shape
from facevae.errors import UserError
from facevae.fileio import (LOCK, MARKER, DirLock, atomic_write, check_output_dir, check_output_file, is_png,
                            mark_dir, marker_kind)
from facevae.images import MAX_GRID_IMAGES, reconstruction_picture, sample_picture, save_png
from facevae.model import VAE
from facevae.pixels import to_float, to_uint8

# Keys that fix the network's shape: a resumed run cannot change them.
ARCHITECTURE_KEYS = ("image_size", "channels", "widths", "latent_dim", "likelihood")
DATA_KEYS = ("data", "split_scheme", "split_seed", "crop")  # what data a run's images come from
CONFIG_HEADER = "# facevae run configuration"  # the first line of every config.toml facevae writes
RUN_ENTRIES = {"config.toml", ckpt.MODEL_FILE, ckpt.CHECKPOINT_DIR, f"{ckpt.CHECKPOINT_DIR}.old",
               f"{ckpt.CHECKPOINT_DIR}.new", "metrics.jsonl", "images", "eval.json", "attributes.safetensors", MARKER,
               LOCK}  # everything a run of facevae holds
DECODE_BATCH = 256  # images decoded at once for a picture: memory stays flat whatever -n is
MAX_TEMPERATURE = 100.0  # prior draws z ~ N(0, T^2 I): beyond this every face is saturated noise
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

    # ------------------------------------------------------------ whose folder it is
    def check_writable(self) -> None:
        """Refuse (one line) a folder that is neither new, empty, nor a facevae run; reads only. A run made before
        runs carried the marker is recognised by its entries (only a run's own names) and its config.toml."""
        if self.path.is_dir() and marker_kind(self.path) is None and self._is_unmarked_run():
            return
        check_output_dir(self.path, "run")

    def _is_unmarked_run(self) -> bool:
        """Whether the folder holds only a run's own entries, with a config.toml that facevae wrote."""
        with os.scandir(self.path) as entries:
            names = {e.name for e in entries}
        temporary = {n for n in names if n.startswith(".") and ".tmp-" in n}  # atomic_write's, left by a crash
        if not names or not names <= RUN_ENTRIES | temporary:
            return False
        try:
            with open(self.config_file, "rb") as f:
                return f.readline().decode("utf-8", "replace").startswith(CONFIG_HEADER)
        except OSError:
            return False

    def open_for_training(self, config: Config) -> DirLock:
        """Create the folder (if new), mark it as a run, lock it (the lock is returned, held) and write the resolved
        config.toml; only once the config and the data have been checked."""
        try:
            mark_dir(self.path, "run")
            lock = DirLock(self.path, f"run {self}").__enter__()
        except OSError as e:
            raise UserError(f"cannot write to run directory {self}: {e.strerror or e}; "
                            f"choose a writable --out") from None
        with contextlib.ExitStack() as undo:
            undo.callback(lock.__exit__, None, None, None)
            self.write_config(config)
            undo.pop_all()
        return lock

    # ------------------------------------------------------------ config
    def resolve_config(self, base: Config | None, overrides: list[str]) -> Config:
        """The run's config: defaults < config file (else the run's saved config.toml when resuming) < overrides.

        "auto" channels and image_size become the data's. A run that has a checkpoint keeps its network: changing an
        architecture key is refused (any other change, a learning rate or more epochs, is allowed: changed_settings);
        a checkpoint whose config.toml is gone needs --config. A folder that is not a run is refused before anything in
        it is read.
        """
        self.check_writable()
        saved = Config.from_toml(self.config_file) if self.config_file.exists() else None
        if saved is None and base is None and ckpt.has_checkpoint(self.path):
            raise UserError(f"{self} has a checkpoint but no config.toml to say what network it holds; restore its "
                            f"config.toml, or give the recipe it was trained with (--config FILE)")
        config = with_data_shape((base or saved or Config()).with_overrides(overrides).validate())
        if saved is not None and ckpt.has_checkpoint(self.path):
            changed = [k for k in ARCHITECTURE_KEYS if getattr(config, k) != getattr(saved, k)]
            if changed:
                raise UserError(f"{self} was trained with other {', '.join(changed)} "
                                f"({', '.join(f'{k} = {getattr(saved, k)}' for k in changed)}); "
                                f"use a new --out to train a different network")
        return config

    def changed_settings(self, config: Config) -> list[str]:
        """What `config` changes from the run's saved config.toml, as "key old -> new" (none for a new run): the
        trainer says it once the checkpoint has loaded."""
        if not self.config_file.is_file():
            return []
        saved = Config.from_toml(self.config_file)
        return [f"{k} {toml_value(v)} -> {toml_value(getattr(config, k))}"
                for k, v in saved.to_dict().items() if getattr(config, k) != v]

    def write_config(self, config: Config) -> None:
        """Create the directory (if new) and write the resolved config.toml."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write(self.config_file, config.to_toml())
        except OSError as e:
            raise UserError(f"cannot write to run directory {self}: {e.strerror or e}; "
                            f"choose a writable --out") from None

    # ------------------------------------------------------------ model and data
    def load_model(self, *, device: str | torch.device = "cpu", data: str | None = None) -> VAE:
        """The trained model, in eval mode, on `device` (CPU unless given). Its config's data keys come from the
        run's config.toml (or `data`, --data), never from the weights' metadata alone: a model file cannot make
        facevae read a folder the user did not name."""
        if not self.path.is_dir():
            raise UserError(f"run directory {self} does not exist; train one with `facevae train --out {self}`")
        if not self.model_file.exists():  # a pipe or device in its place is refused by the header check, unread
            raise UserError(f"{self} holds no trained model ({ckpt.MODEL_FILE} is missing); "
                            f"train it with `facevae train --out {self}`")
        vae = ckpt.load_model(self.model_file, device=device)
        vae.config = self.data_config(vae.config, data)
        return vae

    def data_config(self, config: Config, data: str | None = None) -> Config:
        """`config` with its data keys from the run's config.toml, or `data` (--data) when given; without either,
        no data (NO_DATA: a command that needs the run's images then says to give --data)."""
        if data is not None:
            return config.updated({"data": data}, source="--data").validate()
        if not self.config_file.exists():
            return dataclasses.replace(config, data=NO_DATA)
        saved = Config.from_toml(self.config_file).validate()
        return config.updated({k: getattr(saved, k) for k in DATA_KEYS})

    def data(self, config: Config, split: str) -> SplitView:
        """A split of the data the run's config names (prepared on first use), read through the cache."""
        return split_view(checked_cache(config), split)

    # ------------------------------------------------------------ eval.json
    @staticmethod
    def keeps_eval(split: str, limit: int | None) -> bool:
        """Whether an evaluation belongs in eval.json: only a full evaluation of the test split does, so that a
        partial one (--limit, another split) never replaces the figures `facevae compare` reads."""
        return split == "test" and limit is None

    def write_eval(self, report: dict[str, Any]) -> None:
        atomic_write(self.eval_file, json.dumps(report, indent=2) + "\n")

    def training(self) -> dict[str, Any] | None:
        """How far training had gone when the model file was written: {"step", "epoch", "epochs", "finished"}
        (None for a model file that does not record it)."""
        return ckpt.read_training(self.model_file)

    def title(self) -> str:
        """The run's name and how far it was trained, for pictures: "lfw-faces, epoch 200",
        "x, epoch 3 of 10 (unfinished)"."""
        training = self.training()
        if training is None:
            return self.path.resolve().name
        unfinished = "" if training["finished"] else f" of {training['epochs']} (unfinished)"
        return f"{self.path.resolve().name}, epoch {training['epoch']}{unfinished}"

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
    def picture_out(self, out: str | Path | None, name: str, *, force: bool = False) -> Path:
        """Where a picture goes: `out`, else RUN_DIR/images/NAME, checked before any work. It replaces only a PNG
        facevae wrote (or a PNG in the images/ folder of this run, marked as facevae's: one of the run's own files,
        whichever facevae version drew it), unless `force`."""
        path = Path(out) if out else self.picture(name)
        own = (marker_kind(self.path) == "run" and path.parent.resolve() == self.images_dir.resolve()
               and path.exists() and is_png(path))
        return check_output_file(path, force=force or own)

    def picture(self, name: str) -> Path:
        """The path of a picture of the run: RUN_DIR/images/NAME."""
        return self.images_dir / name


def load_run(run_dir: str | Path | Run, *, device: str | torch.device = "cpu") -> VAE:
    """The trained model of a run directory, ready for inference (eval mode, no gradients), on `device` (CPU unless
    given)."""
    return Run(run_dir).load_model(device=device)


def check_count(n: int) -> None:
    """-n of a picture: 1 to MAX_GRID_IMAGES."""
    if not 1 <= n <= MAX_GRID_IMAGES:
        raise UserError(f"-n must be at least 1 and at most {MAX_GRID_IMAGES} (one picture), got {n}")


def prior_faces(vae: VAE, n: int, *, seed: int, temperature: float = 1.0) -> torch.Tensor:
    """n faces from the prior, z ~ N(0, T^2 I), decoded DECODE_BATCH at a time so memory stays flat: uint8 (n, C, S,
    S). n, the seed and the temperature are checked first (one line each)."""
    check_count(n)
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"--seed must be between 0 and {MAX_SEED}, got {seed}")
    if not 0 <= temperature <= MAX_TEMPERATURE:
        raise UserError(f"--temperature must be between 0 and {MAX_TEMPERATURE}, got {temperature}")
    generator = torch.Generator().manual_seed(seed)
    return torch.cat([to_uint8(vae.sample(min(DECODE_BATCH, n - start), generator=generator, temperature=temperature))
                      for start in range(0, n, DECODE_BATCH)])  # uint8: a quarter of float's memory


def reconstruct_run(run: str | Path | Run, *, split: str = "test", n: int = 32, out: str | Path | None = None,
                    data: str | None = None, force: bool = False, scale: int | None = None) -> Path:
    """The first n images of a split (upper rows) above their reconstructions (lower rows) as a captioned PNG grid
    (a split with fewer than n images gives all it has, and says so on stderr); the data from the run's config.toml
    (or `data`); `out` replaces only a picture facevae wrote, unless `force`."""
    check_count(n)
    run = Run(run)
    out = run.picture_out(out, "reconstruct.png", force=force)
    vae = run.load_model(data=data)
    view = run.data(vae.config, split)
    if len(view) < n:
        print(f"facevae: the '{split}' split has {len(view)} images: drawing {len(view)}, not {n}", file=sys.stderr)
    real = view[:n]  # only these n images are read
    if len(real) == 0:
        raise UserError(f"the '{split}' split has no images")
    rec = torch.cat([to_uint8(vae.reconstruct(to_float(real[i:i + DECODE_BATCH])))
                     for i in range(0, len(real), DECODE_BATCH)])
    title = f"{run.title()}: {len(real)} '{split}' faces and their reconstructions"
    return save_png(reconstruction_picture(real, rec, title=title, scale=scale), out)


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
    pictures = (("reconstructions", reconstruction_picture(real, rec, title=f"epoch {epoch}: real faces and their "
                                                                            f"reconstructions")),
                ("samples", sample_picture(samples, title=f"epoch {epoch}: faces drawn from the prior")))
    for name, img in pictures:
        save_png(img, run.picture(f"{name}_e{epoch:03d}.png"), run.picture(f"{name}.png"))
