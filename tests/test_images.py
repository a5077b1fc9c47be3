"""Grids: rows of real images alternate with rows of their reconstructions, each tile exactly its image."""

from __future__ import annotations

import numpy as np
import torch

from facevae.images import grid, pairs


def _tile(img: np.ndarray, row: int, col: int, side: int, padding: int, scale: int) -> np.ndarray:
    y = (padding + row * (side + padding)) * scale
    x = (padding + col * (side + padding)) * scale
    return img[y:y + side * scale, x:x + side * scale]


def test_pairs_grid_layout_and_pixels():
    real = torch.randint(0, 256, (10, 1, 32, 32), dtype=torch.uint8)
    recon = torch.rand(10, 1, 32, 32)
    img = np.asarray(grid(pairs(real, recon, columns=4), columns=4))  # scale 2: tiles of >= 64 pixels
    scale, padding, side = 2, 2, 32
    rows = 2 * 3  # 10 images in rows of 4: 3 rows of real images, each followed by its reconstructions
    assert img.shape == ((rows * (side + padding) + padding) * scale, (4 * (side + padding) + padding) * scale)
    up = lambda t: np.kron(t, np.ones((scale, scale), dtype=np.uint8))  # noqa: E731 - nearest-neighbour upscale
    expected_recon = (recon.clamp(0, 1) * 255).round().to(torch.uint8)
    for i in range(10):
        r, c = divmod(i, 4)
        assert np.array_equal(_tile(img, 2 * r, c, side, padding, scale), up(real[i, 0].numpy()))
        assert np.array_equal(_tile(img, 2 * r + 1, c, side, padding, scale), up(expected_recon[i, 0].numpy()))
    for c in (2, 3):  # the short last rows are padded with white, not filled with the next row's images
        assert (_tile(img, 4, c, side, padding, scale) == 255).all() and (_tile(img, 5, c, side, padding, scale) == 255).all()


def test_rgb_grid_keeps_channels():
    images = torch.rand(3, 3, 64, 64)
    img = np.asarray(grid(images, columns=3))
    assert img.shape == (64 + 4, 3 * 66 + 2, 3)  # 64-pixel tiles need no upscaling
    assert np.array_equal(_tile(img, 0, 2, 64, 2, 1), (images[2].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())


def _find(canvas: np.ndarray, tile: np.ndarray) -> list[tuple[int, int]]:
    """Top-left corners where `tile` (h, w, 3) stands in `canvas` (H, W, 3) pixel for pixel."""
    h, w = tile.shape[:2]
    ys, xs = np.nonzero((canvas == tile[0, 0]).all(-1))
    return [(y, x) for y, x in zip(ys, xs) if np.array_equal(canvas[y:y + h, x:x + w], tile)]


def test_labelled_grid_places_upscaled_tiles_under_their_captions():
    from facevae.images import labelled_grid

    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=g),
            torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=g)]  # a short second row
    img = np.asarray(labelled_grid(rows, row_labels=["first row", "second"], column_labels=["a", "b", "c"],
                                   title="a title"))
    corners = {}
    for r, row in enumerate(rows):
        for k, tile in enumerate(row):
            up = np.kron(tile.permute(1, 2, 0).numpy(), np.ones((4, 4, 1), dtype=np.uint8))  # 16 -> 64, nearest
            found = _find(img, up)
            assert len(found) == 1, (r, k)
            corners[r, k] = found[0]
    assert corners[0, 0][0] == corners[0, 2][0] < corners[1, 0][0] == corners[1, 1][0]  # rows
    assert corners[0, 1][1] == corners[1, 1][1] and corners[0, 1][1] - corners[0, 0][1] >= 64  # columns
    top, left = corners[0, 0]
    dark = img.min(-1) < 128
    for r in range(2):  # a caption left of each row, one above each column
        y = corners[r, 0][0]
        assert dark[y:y + 64, :left].any()
    for k in range(3):
        x = corners[0, k][1]
        assert dark[:top, x:x + 64].any()
    assert (img[corners[1, 1][0]:, corners[0, 2][1]:] == 255).all()  # the short row ends in white


def test_tiles_are_at_least_64_pixels_unless_a_scale_is_given():
    from facevae.images import tile_scale

    assert [tile_scale(side) for side in (25, 32, 64, 128)] == [3, 2, 1, 1]
    assert tile_scale(32, 5) == 5
    img = grid(torch.rand(4, 1, 32, 32), columns=4, scale=3)
    assert img.size == ((4 * 34 + 2) * 3, 36 * 3)


def test_captions_name_each_row_and_leave_the_faces_untouched():
    from facevae.images import captioned, pair_labels, reconstruction_picture

    real = torch.randint(0, 256, (10, 1, 32, 32), dtype=torch.uint8)
    recon = torch.rand(10, 1, 32, 32)
    plain = np.asarray(grid(pairs(real, recon, columns=8), columns=8))
    labelled = np.asarray(reconstruction_picture(real, recon, title="epoch 7: faces"))
    assert pair_labels(10) == ["real", "reconstruction"] * 2
    rows, (height, width) = 4, plain.shape
    top, left = labelled.shape[0] - height, labelled.shape[1] - width
    assert top > 0 and left > 0  # a title line above, a caption column on the left
    assert np.array_equal(labelled[top:, left:], plain)  # the grid itself, pixel for pixel
    assert (labelled[:top] < 128).any()  # the title is written
    band = height // rows
    for r in range(rows):  # every row has its caption, in dark text on white
        assert (labelled[top + r * band:top + (r + 1) * band, :left] < 128).any(), r
    no_labels = np.asarray(captioned(grid(recon), [], rows=2, title=None))
    assert no_labels.shape == np.asarray(grid(recon)).shape  # nothing to say: nothing added


def test_rgb_captions_stay_rgb():
    from facevae.images import sample_picture

    picture = sample_picture(torch.rand(3, 3, 64, 64), title="samples")
    assert picture.mode == "RGB" and picture.width == 3 * 66 + 2
