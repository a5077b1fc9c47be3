"""Faces in and out of a trained model: face arguments -> images -> posterior means -> latent arithmetic -> faces.

A face argument is an image file (any size: EXIF turn, centre square and resize as `prepare` does for folders) or
`SPLIT:N`, image N of a split of the run's data (`test:3`, `train:0`). The tensor functions here (encode, decode,
interpolate, traverse, edit, analogy) take a loaded model and are what the commands and the web page call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from facevae.config import Config
from facevae.data import checked_cache, split_view
from facevae.data.cache import SPLIT_NAMES
from facevae.data.decode import failure_reason, load_square
from facevae.device import autocast
from facevae.errors import UserError
from facevae.latent import latent_grid, latent_path
from facevae.model import VAE
from facevae.pixels import to_float
from facevae.vocabulary import FACE_HELP

_DATA_FACE = re.compile(rf"^({'|'.join(SPLIT_NAMES)}):(\d+)$")


# ---------------------------------------------------------------- faces in
def load_image(path: str | Path | BinaryIO, *, size: int, channels: int) -> torch.Tensor:
    """An image file (a path, or a binary file object such as an upload) as the model sees it: uint8 (channels, size,
    size). Turned upright by its EXIF orientation, cut to its largest centre square and resized exactly as `prepare`
    does for a folder; grey for 1 channel."""
    source, path = (path, "the image") if hasattr(path, "read") else (str(path), path)  # path: what messages say
    try:
        square = load_square(source, crop=None, size=size)  # uint8 (3, size, size)
    except IsADirectoryError:
        raise UserError(f"{path} is a folder, not an image file") from None
    except Exception as e:  # any decoder error: the file cannot be used, said in one line
        raise UserError(f"{path}: {failure_reason(e)}") from None
    if channels == 1:  # ITU-R 601 luma, as Pillow's "L" mode
        square = np.asarray(Image.fromarray(square.transpose(1, 2, 0)).convert("L"))[None]
    return torch.from_numpy(np.array(square))  # a writable, contiguous copy


def load_face(config: Config, face: str) -> torch.Tensor:
    """One face argument (an image file, or SPLIT:N of the run's data) as uint8 (C, S, S)."""
    match = _DATA_FACE.match(face)
    if match is None or Path(face).exists():  # a file named like "test:3" is still a file
        if not Path(face).exists():
            raise UserError(f"{face}: no such file (a face is {FACE_HELP})")
        return load_image(face, size=config.image_size, channels=config.channels)
    split, n = match.group(1), int(match.group(2))
    view = split_view(checked_cache(config, progress=False), split)
    if n >= len(view):
        raise UserError(f"{face}: the '{split}' split has {len(view)} images, numbered 0 to {len(view) - 1}")
    return view[n]


def load_faces(config: Config, faces: list[str]) -> torch.Tensor:
    """Several face arguments as uint8 (N, C, S, S)."""
    return torch.stack([load_face(config, f) for f in faces])


def face_label(face: str) -> str:
    """A short caption for a face argument: the file's name, or test:N as given."""
    return face if _DATA_FACE.match(face) and not Path(face).exists() else Path(face).name


# ---------------------------------------------------------------- codes and faces of a loaded model
def _device(vae: VAE) -> torch.device:
    return next(vae.parameters()).device


@torch.no_grad()
def encode(vae: VAE, images: torch.Tensor) -> torch.Tensor:
    """Posterior means of images (N, C, S, S), uint8 or float in [0, 1]: (N, latent_dim) float32."""
    return vae.encode(to_float(images, _device(vae))).mean.float()


@torch.no_grad()
def decode(vae: VAE, z: torch.Tensor) -> torch.Tensor:
    """Faces of codes z (..., latent_dim): the means of p(x|z), (..., C, S, S) float in [0, 1], on the CPU."""
    flat = z.reshape(-1, z.shape[-1]).float().to(_device(vae))
    faces = vae.decode(flat).mean.float().clamp(0, 1).cpu()
    return faces.reshape(*z.shape[:-1], *faces.shape[1:])


def interpolate(vae: VAE, a: torch.Tensor, b: torch.Tensor, *, steps: int = 8, mode: str = "slerp") -> torch.Tensor:
    """Faces on the path between the posterior means of images a and b (C, S, S): (steps, C, S, S); the first and
    the last are the reconstructions of a and b. mode: slerp (the default) or lerp."""
    za, zb = encode(vae, torch.stack([a, b]))
    return decode(vae, latent_path(za, zb, steps, mode))


def traverse(vae: VAE, center: torch.Tensor, dims: list[int], values: torch.Tensor) -> torch.Tensor:
    """Each of `dims` moved alone by `values` (prior standard deviations) from a code center (latent_dim,):
    faces (len(dims), len(values), C, S, S)."""
    unit = torch.eye(center.shape[-1])[dims]  # (R, D): one unit vector per traversed dimension
    return decode(vae, latent_grid(center.float().cpu(), unit, values))


def edit(vae: VAE, image: torch.Tensor, direction: torch.Tensor, *, steps: int = 5) -> torch.Tensor:
    """From the reconstruction of an image (C, S, S) to its posterior mean plus `direction` (latent_dim,) in
    `steps` equal steps: faces (steps, C, S, S)."""
    z = encode(vae, image[None])[0].cpu()
    return decode(vae, latent_grid(z, direction[None].float(), torch.linspace(0, 1, steps))[0])


def analogy(vae: VAE, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """C + (B - A) on the posterior means of three images (C, S, S) each: one face (C, S, S)."""
    za, zb, zc = encode(vae, torch.stack([a, b, c]))
    return decode(vae, zc + (zb - za))


# ---------------------------------------------------------------- one pass over a split
@dataclass
class Encoded:
    """What one encoder pass over a set of images gives."""

    means: torch.Tensor  # (N, latent_dim) float32 on the CPU: the posterior means
    kl_per_dim: torch.Tensor  # (latent_dim,) float64: average KL(q(z_d|x) || N(0, 1)) over the images, nats
    activity: torch.Tensor  # (latent_dim,) float64: Var_x of the posterior mean (Burda et al.'s unit activity)


@torch.inference_mode()
def encode_split(vae: VAE, images, *, batch_size: int = 256, device: torch.device | str = "cpu",
                 precision: str = "float32", progress: bool = False) -> Encoded:
    """Encode uint8 images (N, C, S, S) (a tensor or a SplitView) in batches at evaluation speed: the model on
    `device` in eval mode, autocast at `precision`, no host sync until the end."""
    device = torch.device(device)
    vae = vae.eval().to(device)
    means, kl = [], torch.zeros(vae.config.latent_dim, dtype=torch.float64, device=device)
    for start in tqdm(range(0, len(images), batch_size), desc="encode", unit="batch", disable=not progress,
                      leave=False):
        x = to_float(images[start:start + batch_size], device)  # (B, C, S, S) uint8 -> float in [0, 1]
        with autocast(device, precision):
            posterior = vae.encode(x)  # mean, logvar (B, D) in float32
        means.append(posterior.mean)
        kl += posterior.kl_per_dim().double().sum(0)
    all_means = torch.cat(means).cpu()  # (N, D): one transfer at the end
    return Encoded(all_means, kl.cpu() / max(len(images), 1), all_means.double().var(0, correction=0))
