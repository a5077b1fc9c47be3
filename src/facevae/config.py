"""One flat configuration for model, data and training: TOML in and out, `--set key=value`, clear errors."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import os
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facevae.errors import UserError
from facevae.fileio import check_path_text

DEVICES = ("auto", "cpu", "cuda")
SPLIT_SCHEMES = ("official", "deck")
RENAMED = {"split": "split_scheme"}  # old key -> new key: old configs still load, with a one-line notice
MAX_IMAGE_SIZE = 1024  # image side: a 1024x1024x3 batch of 64 is already 800 MB of float input
MAX_LAYERS = 10  # len(widths): 2**10 = 1024, the largest image side
MAX_WIDTH = 8192  # channels of one layer
MAX_LATENT = 65536
MAX_SEED = 2**32 - 1  # numpy's seed range
MAX_COUNT = 1 << 20  # batch sizes and picture counts: more than any memory holds
MAX_SET_CHARS = 4096  # one --set value or TOML string: a path at most
MAX_CONFIG_BYTES = 1 << 20  # a config file
AUTO = "auto"
AUTO_KEYS = ("image_size", "channels")  # keys that may be "auto": taken from the data (facevae.data.with_data_shape)
PRECISIONS = ("auto", "float32", "bf16", "fp16")


@dataclass
class Config:
    """Every setting of a run. Flat keys, the same in TOML and in `--set key=value`."""

    # --- data
    data: str = "lfw"  # a data SPEC: lfw, celeba:PATH, folder:PATH or a prepared cache
    split_scheme: str = "official"  # how CelebA is split: official (train/valid/test) or deck (the deck's 70/30)
    split_seed: int = 0  # the seed of the deck's random 70/30 split (kept apart from `seed`: same split, any run)
    crop: int = 148  # center crop before resizing CelebA (148 as the PyTorch VAE repos; 140 and 128 also used)
    hflip: bool = False  # random horizontal flips during training (on the device)
    # --- model
    # "auto": the data's own (a prepared cache's size and channels; lfw 32x32 grey; CelebA and folders 64x64 RGB,
    # prepare's default size), so `--data` alone is enough. A number that disagrees with the data is an error.
    image_size: int | str = "auto"  # side of the square images: 32, 64, 128 (a multiple of 2**len(widths)) or auto
    channels: int | str = "auto"  # 1 for grey, 3 for RGB, or auto
    widths: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])  # encoder conv widths, k3 s2
    latent_dim: int = 128  # size of z
    # The decoder's p(x|z): a name in facevae.distributions.LIKELIHOODS. The discretised logistic by default: at the
    # same budget on the demo faces it had the best bits/dim and SSIM of all seven (README, Results), its figures are
    # exact 8-bit likelihoods, and it learns its own per-pixel scale, so no sigma needs tuning. A fixed sigma = 1 on
    # [0, 1] pixels (the deck's MSE decoder) weighs the reconstruction so little against the KL that faces blur; it
    # stays in the deck's recipes.
    likelihood: str = "discretized_logistic"
    sigma: float = 1.0  # the fixed sigma of likelihood = gaussian, in [0, 1] pixel units
    min_sigma: float = 1e-3  # lower bound on learned or optimal sigma (log sigma >= log(min_sigma))
    # --- objective
    kl_weight: float = 1.0  # beta in loss = -recon + beta * KL; 1 is the true ELBO
    kl_warmup_steps: int = 0  # linear warm-up of the KL weight from 0 over this many steps (0: none)
    # --- training
    seed: int = 0  # seeds weights, data order and sampling
    epochs: int = 10
    max_steps: int = 0  # stop (with a checkpoint) after this many training batches in all (0: no limit)
    batch_size: int = 64
    learning_rate: float = 1e-3  # Adam
    weight_decay: float = 0.0
    eval_batch_size: int = 0  # images per decoder call when evaluating (0: by device, 32 on a CPU, 256 on a GPU)
    log_every: int = 100  # steps between logged training metrics (the deck prints PSNR every 100 batches)
    image_every: int = 1  # epochs between reconstruction and sample grids in images/ (the last epoch always has them)
    checkpoint_every: int = 0  # steps between checkpoints inside an epoch (0: at the end of each epoch only)
    image_count: int = 32  # images in the per-epoch reconstruction and sample grids
    max_bad_steps: int = 10  # consecutive non-finite batches (each skipped) that stop the run; checked when logging
    tensorboard: bool = False  # also write metrics and grids to RUN_DIR/tensorboard/ (needs facevae[tensorboard])
    # --- hardware
    device: str = "auto"  # auto (cuda when present), cpu or cuda
    # auto: bf16 autocast where the device has native bf16 (CUDA, AVX512-BF16/AMX CPUs), else float32; likelihood and
    # KL sums stay float32 (how close bf16 comes to float32: README, Results).
    precision: str = "auto"
    threads: int = 0  # CPU threads for torch (0: torch's default)
    channels_last: bool = True  # NHWC memory layout: faster convolutions on CPUs (oneDNN) and GPU tensor cores
    compile: bool = False  # torch.compile the network: faster steps after a compile of a minute or so

    # ---------------------------------------------------------------- validation
    def validate(self) -> "Config":
        """Check every value; raise UserError naming the key on the first bad one ("auto" shapes pass unchecked)."""
        self._validate_ranges()
        if self.channels not in (1, 3, AUTO):
            raise UserError(f"config key 'channels' must be 1 (grey) or 3 (RGB), got {self.channels}")
        if not 1 <= len(self.widths) <= MAX_LAYERS or any(not 1 <= w <= MAX_WIDTH for w in self.widths):
            raise UserError(f"config key 'widths' must be a list of 1 to {MAX_LAYERS} integers from 1 to "
                            f"{MAX_WIDTH}, got {_short(self.widths)}")
        stride = 2 ** len(self.widths)
        if self.image_size != AUTO and self.image_size % stride:
            raise UserError(
                f"config key 'image_size' = {self.image_size} cannot pass through {len(self.widths)} stride-2 "
                f"layers: use a multiple of {stride} (e.g. 32, 64, 128) or change 'widths'")
        from facevae.distributions import LIKELIHOODS  # here, not at the top: the command line's parser reads Config
        # and must not import torch

        for key, allowed in (("likelihood", tuple(LIKELIHOODS)), ("device", DEVICES), ("precision", PRECISIONS),
                             ("split_scheme", SPLIT_SCHEMES)):
            if getattr(self, key) not in allowed:
                raise UserError(f"config key '{key}' must be one of {', '.join(allowed)}; got "
                                f"'{_short(getattr(self, key))}'")
        check_path_text(self.data, "config key 'data'")
        cores = os.cpu_count() or 1
        if self.threads > cores:
            raise UserError(f"config key 'threads' = {self.threads} but this machine has {cores} cores; use at most "
                            f"{cores}, or 0 for torch's default")
        return self

    def _validate_ranges(self) -> None:
        """Every number within its range: counts, sizes, seeds, finite rates and weights."""
        limits = {"image_size": (1, MAX_IMAGE_SIZE), "channels": (1, 3), "latent_dim": (1, MAX_LATENT),
                  "epochs": (1, None), "batch_size": (1, MAX_COUNT), "eval_batch_size": (0, MAX_COUNT),
                  "log_every": (1, None), "image_count": (1, 4096), "max_bad_steps": (1, None),
                  "image_every": (1, None), "crop": (1, None), "kl_warmup_steps": (0, None), "max_steps": (0, None),
                  "checkpoint_every": (0, None), "threads": (0, None), "seed": (0, MAX_SEED),
                  "split_seed": (0, MAX_SEED)}
        for key, (low, high) in limits.items():
            value = getattr(self, key)
            if key in AUTO_KEYS and value == AUTO:
                continue  # taken from the data later (facevae.data.with_data_shape)
            if value < low or (high is not None and value > high):
                bound = f"between {low} and {high}" if high is not None else f"at least {low}"
                raise UserError(f"config key '{key}' must be {bound}, got {value}")
        for key in ("weight_decay", "kl_weight"):
            if not (getattr(self, key) >= 0 and math.isfinite(getattr(self, key))):
                raise UserError(f"config key '{key}' must be a finite number, not negative, got {getattr(self, key)}")
        for key in ("learning_rate", "sigma", "min_sigma"):
            if not (getattr(self, key) > 0 and math.isfinite(getattr(self, key))):
                raise UserError(f"config key '{key}' must be a positive number, got {getattr(self, key)}")

    # ---------------------------------------------------------------- TOML / dict
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The config as TOML text (flat keys), readable by `Config.from_toml`."""
        lines = ["# facevae run configuration (resolved: defaults < config file < flags)"]
        for key, value in self.to_dict().items():
            lines.append(f"{key} = {toml_value(value)}")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> "Config":
        """A config from a flat mapping; unknown keys and wrong types are UserErrors."""
        if not isinstance(values, dict):
            raise UserError(f"the config in {source} is a {type(values).__name__}, not a table of keys")
        return cls().updated(values, source=source)

    @classmethod
    def from_toml(cls, path: str | Path) -> "Config":
        return cls.from_dict(read_toml(path), source=str(path))

    def updated(self, values: dict[str, Any], *, source: str = "config") -> "Config":
        """A copy with `values` applied, each checked against the field's type."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        changes = {}
        for key, value in _renamed(values, source).items():
            if key not in fields:
                raise UserError(f"unknown config key {_short(key)} in {source}; known keys: {', '.join(fields)}")
            changes[key] = _coerce(key, value, getattr(self, key), source)
        return dataclasses.replace(self, **changes)

    def with_overrides(self, assignments: list[str]) -> "Config":
        """Apply `key=value` strings from the command line; values are parsed as TOML, else taken as strings."""
        values = {}
        for item in assignments:
            key, sep, text = item.partition("=")
            if not sep or not key.strip():
                raise UserError(f"--set expects key=value, got '{item}'")
            if len(text) > MAX_SET_CHARS:
                raise UserError(f"--set {key.strip()}= is {len(text):,} characters long; at most {MAX_SET_CHARS:,}")
            values[key.strip()] = parse_value(text.strip())
        return self.updated(values, source="--set")

    @property
    def shape_known(self) -> bool:
        """Whether channels and image_size are numbers (not yet "auto")."""
        return AUTO not in (self.channels, self.image_size)

    @property
    def data_dims(self) -> int:
        """D: the number of values in one image (channels * height * width)."""
        if not self.shape_known:
            raise ValueError("channels and image_size are 'auto': resolve them from the data first "
                             "(facevae.data.with_data_shape)")
        return self.channels * self.image_size * self.image_size


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file, turning a missing or malformed file into a one-line UserError."""
    path = Path(path)
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            raise UserError(f"config file {path} is not a regular file")
        with path.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror or e}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise UserError(f"config file {path} is larger than {MAX_CONFIG_BYTES >> 20} MB; it is not a facevae config")
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"config file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except (tomllib.TOMLDecodeError, RecursionError) as e:
        raise UserError(f"config file {path} is not valid TOML: {str(e)[:200] or 'nested too deeply'}") from None


def parse_value(text: str) -> Any:
    """Parse one `--set` value as a TOML value (1e-3, true, [1, 2], "x"); bare words stay strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    except RecursionError:
        raise UserError(f"--set value {text[:40]}... is nested too deeply") from None


_NOTED: set[str] = set()  # old keys already noted in this process (a run's config.toml and its model both hold one)


def _renamed(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Old key names mapped to their new ones, with a one-line notice on stderr for each, once per process."""
    out = dict(values)
    for old, new in RENAMED.items():
        if old in out and new not in out:
            if old not in _NOTED:
                print(f"facevae: note: config key '{old}' in {source} is now '{new}'; read as {new}", file=sys.stderr)
                _NOTED.add(old)
            out[new] = out.pop(old)
    return out


def _coerce(key: str, value: Any, default: Any, source: str) -> Any:
    def bad() -> UserError:
        return UserError(f"config key '{key}' in {source} must be {type(default).__name__}, "
                         f"got {type(value).__name__} {_short(value)}")

    if key in AUTO_KEYS:
        if value == AUTO or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        raise UserError(f"config key '{key}' in {source} must be an integer or \"auto\", got {value!r}")
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise bad()
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise bad()
        if len(value) > MAX_SET_CHARS:
            raise UserError(f"config key '{key}' in {source} is {len(value):,} characters long; at most "
                            f"{MAX_SET_CHARS:,}")
        return value
    if isinstance(default, list):
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise UserError(f"config key '{key}' in {source} must be a list of integers, got {_short(value)}")
        return list(value)
    raise bad()


def _short(value: Any, limit: int = 80) -> str:
    """repr(value) cut to `limit` characters: a hostile value never floods the one-line error."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def toml_value(value: Any) -> str:
    """One value as TOML text: true, 3, 0.001, \"text\", [32, 64]."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")
