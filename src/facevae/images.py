"""Drawing only: image grids and PNG files (real faces beside their reconstructions, samples). No models, no runs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from facevae.fileio import atomic_write
from facevae.pixels import to_float, to_uint8


def to_hwc(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) float in [0, 1] or uint8 -> uint8 numpy (N, H, W, C)."""
    return to_uint8(images).cpu().permute(0, 2, 3, 1).numpy()


def grid(images: torch.Tensor, *, columns: int = 8, padding: int = 2, min_tile: int = 64) -> Image.Image:
    """Tile images (N, C, H, W) into rows of `columns`, upscaled (nearest) so that each tile is >= min_tile pixels."""
    arr = to_hwc(images)
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
    real, predicted = to_float(real.cpu()), to_float(predicted.cpu())
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


