"""Image grids as PNG files: real faces beside their reconstructions, samples from the prior."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from facevae.fileio import atomic_write


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) float in [0, 1] or uint8 -> uint8 numpy (N, H, W, C)."""
    if images.dtype != torch.uint8:
        images = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return images.cpu().permute(0, 2, 3, 1).numpy()


def grid(images: torch.Tensor, *, columns: int = 8, padding: int = 2, min_tile: int = 64) -> Image.Image:
    """Tile images (N, C, H, W) into rows of `columns`, upscaled (nearest) so that each tile is >= min_tile pixels."""
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    canvas = np.full((rows * (h + padding) + padding, columns * (w + padding) + padding, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        canvas[y:y + h, x:x + w] = arr[i]
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    scale = max(1, -(-min_tile // max(h, w)))
    return img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST) if scale > 1 else img


def pairs(real: torch.Tensor, predicted: torch.Tensor, *, columns: int = 8) -> torch.Tensor:
    """Interleave rows: a row of real images, then the row of their predictions, and so on; a short last row is
    padded with white tiles. (2 * rows * columns, C, H, W)."""
    real, predicted = _same_type(real), _same_type(predicted)
    out = []
    for start in range(0, len(real), columns):
        for row in (real[start:start + columns], predicted[start:start + columns]):
            blank = torch.ones(columns - len(row), *row.shape[1:])  # white tiles keep a short last row in its row
            out += [row, blank]
    return torch.cat(out)


def save_png(image: Image.Image, *paths: str | Path) -> Path:
    """Encode a PNG once and write it atomically to each path (a half-written picture never replaces a good one);
    return the first path."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    for path in map(Path, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, buf.getvalue())
    return Path(paths[0])


def _same_type(images: torch.Tensor) -> torch.Tensor:
    return images.float().cpu() / 255 if images.dtype == torch.uint8 else images.float().cpu().clamp(0, 1)


def sample_run(run_dir: str | Path, *, n: int = 64, seed: int = 0, out: str | Path | None = None) -> Path:
    """n faces from a run's prior (means of p(x|z), z ~ N(0, I)) as a PNG grid."""
    from facevae.checkpoint import load_run
    from facevae.errors import UserError

    if n < 1:
        raise UserError(f"-n must be at least 1, got {n}")
    vae = load_run(run_dir)
    faces = vae.sample(n, generator=torch.Generator().manual_seed(seed))
    return save_png(grid(faces), out or Path(run_dir) / "images" / "sample.png")


def reconstruct_run(run_dir: str | Path, *, split: str = "test", n: int = 32, out: str | Path | None = None) -> Path:
    """The first n images of a split (upper rows) above their reconstructions (lower rows) as a PNG grid."""
    from facevae.checkpoint import load_run
    from facevae.data import open_split_view
    from facevae.errors import UserError

    if n < 1:
        raise UserError(f"-n must be at least 1, got {n}")
    vae = load_run(run_dir)
    real = open_split_view(vae.config, split)[:n]  # only these n images are read
    rec = vae.reconstruct(real.float() / 255)
    return save_png(grid(pairs(real, rec)), out or Path(run_dir) / "images" / "reconstruct.png")
