"""Drawing only: image grids and PNG files (real faces beside their reconstructions, samples). No models, no runs.

Every picture says what it shows (a caption column naming each row, a title line) in Pillow's built-in font (no
font file needed), and draws faces at least MIN_TILE pixels wide.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from facevae.fileio import PNG_SOFTWARE, atomic_write
from facevae.pixels import to_float, to_uint8

CAPTION_SIZE = 11  # pixels; Pillow's built-in font at its default 10 drops the colon of "test:0"
MAX_GRID_IMAGES = 4096  # faces in one picture: 64 rows of 64 at most (a 64x64 face grid of about 17 MB)


def to_hwc(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) float in [0, 1] or uint8 -> uint8 numpy (N, H, W, C)."""
    return to_uint8(images).cpu().permute(0, 2, 3, 1).numpy()


MIN_TILE = 64  # faces are drawn at least this many pixels wide unless a scale is given


def tile_scale(side: int, scale: int | None = None) -> int:
    """The nearest-neighbour factor for images of `side` pixels: `scale` when given, else the smallest that draws
    them at least MIN_TILE pixels wide."""
    if scale is not None:
        if scale < 1:
            raise ValueError(f"scale must be at least 1, got {scale}")
        return scale
    return max(1, -(-MIN_TILE // side))


def grid(images: torch.Tensor, *, columns: int = 8, padding: int = 2, scale: int | None = None) -> Image.Image:
    """Tile images (N, C, H, W) into rows of `columns`, upscaled by `scale` (nearest neighbour; default: tiles of
    at least MIN_TILE pixels)."""
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
    scale = tile_scale(max(h, w), scale)
    return img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST) if scale > 1 else img


def captioned(picture: Image.Image, row_labels: list[str], *, rows: int | None = None,
              title: str | None = None) -> Image.Image:
    """The picture with a caption column on its left, one label per row of tiles (`rows` rows of equal height, by
    default one per label), and an optional title line above; text in Pillow's built-in font, sized to the rows."""
    row_height = picture.height / max(1, rows or len(row_labels))
    font = ImageFont.load_default(size=int(min(max(11, row_height / 5), 20)))  # Pillow >= 10.1: a scalable font
    probe = ImageDraw.Draw(picture)
    margin = 8 + max(int(probe.textlength(label, font=font)) for label in row_labels) if row_labels else 0
    title_height = int(font.size * 1.6) if title else 0
    white, black = (255, 0) if picture.mode == "L" else ((255, 255, 255), (0, 0, 0))
    canvas = Image.new(picture.mode, (picture.width + margin, picture.height + title_height), white)
    canvas.paste(picture, (margin, title_height))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, title_height // 2), title, fill=black, font=font, anchor="lm")
    for i, label in enumerate(row_labels):  # each label centred on its row ("lm": left, middle)
        draw.text((4, title_height + int((i + 0.5) * row_height)), label, fill=black, font=font, anchor="lm")
    return canvas


def pair_labels(n: int, *, columns: int = 8) -> list[str]:
    """The caption column of a `pairs` grid of n images: "real", "reconstruction", "real", ..."""
    return ["real", "reconstruction"] * -(-n // columns)


def reconstruction_picture(real: torch.Tensor, predicted: torch.Tensor, *, title: str,
                           scale: int | None = None) -> Image.Image:
    """Rows of real images, each followed by the row of their reconstructions, captioned, with a title."""
    columns = min(8, len(real))
    return captioned(grid(pairs(real, predicted, columns=columns), columns=columns, scale=scale),
                     pair_labels(len(real), columns=columns), title=title)


def sample_picture(samples: torch.Tensor, *, title: str, scale: int | None = None) -> Image.Image:
    """Faces drawn from the prior, in rows of 8, with a title."""
    return captioned(grid(samples, scale=scale), [], rows=-(-len(samples) // 8), title=title)


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


def labelled_grid(rows: list[torch.Tensor], *, row_labels: list[str] | None = None,
                  column_labels: list[str] | None = None, title: str | None = None, scale: int | None = None,
                  padding: int = 4) -> Image.Image:
    """Rows of images, each (K, C, H, W) float in [0, 1] or uint8, with a caption left of each row, one above each
    column and an optional title (Pillow's built-in font). Tiles are upscaled (nearest) by `scale` (default: to at
    least MIN_TILE pixels); a short row leaves white space at its end."""
    arrays = [to_hwc(r) for r in rows]  # (K, H, W, C) uint8 each
    h, w = arrays[0].shape[1:3]
    scale = tile_scale(max(h, w), scale)
    th, tw = h * scale, w * scale  # tile size on the canvas
    font = ImageFont.load_default(size=CAPTION_SIZE)
    line = _text_size(font, "Ag")[1] + padding  # one caption line
    left = max(_text_size(font, _fit(font, t, 4 * tw))[0] for t in row_labels) + 2 * padding if row_labels else 0
    top = line * (bool(title) + bool(column_labels))
    columns = max(len(a) for a in arrays)
    canvas = Image.new("RGB", (left + columns * (tw + padding) + padding,
                               top + len(arrays) * (th + padding) + padding), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((padding, padding // 2), _fit(font, title, canvas.width - 2 * padding), fill="black", font=font)
    for k, label in enumerate(column_labels or []):
        x = left + padding + k * (tw + padding) + tw // 2
        draw.text((x, top - line // 2), _fit(font, label, tw + padding), fill="black", font=font, anchor="mm")
    for r, tiles in enumerate(arrays):
        y = top + padding + r * (th + padding)
        for k, tile in enumerate(tiles):
            face = Image.fromarray(tile[..., 0] if tile.shape[-1] == 1 else tile).convert("RGB")
            canvas.paste(face.resize((tw, th), Image.Resampling.NEAREST), (left + padding + k * (tw + padding), y))
        if row_labels:
            draw.text((padding, y + th // 2), _fit(font, row_labels[r], 4 * tw), fill="black", font=font, anchor="lm")
    return canvas


def _text_size(font: ImageFont.ImageFont | ImageFont.FreeTypeFont, text: str) -> tuple[int, int]:
    left, upper, right, lower = font.getbbox(text)
    return right - left, lower - upper


def _fit(font: ImageFont.ImageFont | ImageFont.FreeTypeFont, text: str, width: int) -> str:
    """The text, cut short with an ellipsis where it is wider than `width` pixels."""
    if _text_size(font, text)[0] <= width:
        return text
    while text and _text_size(font, text + "...")[0] > width:
        text = text[:-1]
    return text + "..."


def save_png(image: Image.Image, *paths: str | Path) -> Path:
    """Encode a PNG once and write it atomically to each path (a half-written picture never replaces a good one);
    return the first path."""
    buf = io.BytesIO()
    info = PngInfo()
    info.add_text("Software", PNG_SOFTWARE)  # marks the picture as facevae's: it may replace it later
    image.save(buf, format="PNG", pnginfo=info)
    for path in map(Path, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, buf.getvalue())
    return Path(paths[0])
