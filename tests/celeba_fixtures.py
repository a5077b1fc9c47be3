"""Generated CelebA-like fixtures: smooth random 178x218 JPEGs in either layout, with the list files in their exact
formats (never a download). Imported by the tests as a plain module (`import celeba_fixtures`)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ATTRIBUTE_NAMES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair Blond_Hair "
    "Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup High_Cheekbones "
    "Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline "
    "Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick "
    "Wearing_Necklace Wearing_Necktie Young"
).split()
WIDTH, HEIGHT = 178, 218  # CelebA's aligned images


@dataclass
class CelebaFixture:
    """A generated CelebA copy and the truth it was made from."""

    top: Path  # the folder the fixture was made in (the parent of the dataset folder for the original layout)
    dataset: Path  # the folder that holds the lists
    images: Path  # the folder of the JPEGs
    partition: Path
    attributes_file: Path
    names: list[str]  # in list order
    codes: np.ndarray  # int8 (N,) partition codes 0/1/2
    attributes: np.ndarray  # int8 (N, 40) of -1/1
    layout: str


def smooth_image(rng: np.random.Generator, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """A random smooth picture with some texture: uint8 (height, width, 3). Gradients + blobs + mild noise."""
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    c = rng.uniform(0, 1, (3, 4))
    waves = np.stack([c[k, 0] + c[k, 1] * np.sin(9 * xx * c[k, 2] + 7 * yy * c[k, 3]) for k in range(3)], -1)
    blobs = np.asarray(Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
                       .resize((width, height), Image.Resampling.BICUBIC), dtype=np.float64)
    picture = 0.4 * 255 * waves + 0.6 * blobs + rng.normal(0, 6, (height, width, 3))
    return np.clip(picture, 0, 255).astype(np.uint8)


def jpeg_bytes(pixels: np.ndarray, mode: str | None = None, quality: int = 92) -> bytes:
    """Encode uint8 (H, W, 3) pixels as a JPEG (optionally converted to mode "L" or "CMYK" first)."""
    image = Image.fromarray(pixels)
    if mode:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def default_codes(count: int) -> np.ndarray:
    """Partition codes as in CelebA: a long train run, then valid, then test (about 80/10/10)."""
    codes = np.zeros(count, dtype=np.int8)
    codes[int(count * 0.8):] = 1
    codes[int(count * 0.9):] = 2
    return codes


def make_celeba(top: Path, layout: str = "original", count: int = 30, seed: int = 0) -> CelebaFixture:
    """Write a CelebA copy of `count` images under `top` in the "original" or "kaggle" layout."""
    rng = np.random.default_rng(seed)
    if layout == "original":  # top/celeba/img_align_celeba/*.jpg beside the .txt lists
        dataset = top / "celeba"
        images = dataset / "img_align_celeba"
        partition, attributes_file = dataset / "list_eval_partition.txt", dataset / "list_attr_celeba.txt"
    elif layout == "kaggle":  # top/img_align_celeba/img_align_celeba/*.jpg beside the .csv lists
        dataset = top
        images = dataset / "img_align_celeba" / "img_align_celeba"
        partition, attributes_file = dataset / "list_eval_partition.csv", dataset / "list_attr_celeba.csv"
    else:
        raise ValueError(layout)
    images.mkdir(parents=True, exist_ok=True)
    names = [f"{i:06d}.jpg" for i in range(1, count + 1)]
    for name in names:
        (images / name).write_bytes(jpeg_bytes(smooth_image(rng)))
    codes = default_codes(count)
    attributes = rng.choice(np.array([-1, 1], dtype=np.int8), size=(count, len(ATTRIBUTE_NAMES)))
    fixture = CelebaFixture(top, dataset, images, partition, attributes_file, names, codes, attributes, layout)
    write_lists(fixture)
    return fixture


def write_lists(f: CelebaFixture, newline: str = "\n") -> None:
    """Write the partition and attribute lists of a fixture in its layout's exact format."""
    if f.layout == "original":
        partition = [f"{n} {c}" for n, c in zip(f.names, f.codes)]
        # the real file: the count, the 40 names (with a trailing space), then rows padded so that each value takes
        # two characters: "000001.jpg -1  1  1 -1 ..." (one or more spaces between columns)
        attributes = [str(len(f.names)), " ".join(ATTRIBUTE_NAMES) + " "]
        attributes += [n + " " + " ".join(f"{v:2d}" for v in row) for n, row in zip(f.names, f.attributes)]
    else:
        partition = ["image_id,partition"] + [f"{n},{c}" for n, c in zip(f.names, f.codes)]
        attributes = ["image_id," + ",".join(ATTRIBUTE_NAMES)]
        attributes += [n + "," + ",".join(str(v) for v in row) for n, row in zip(f.names, f.attributes)]
    f.partition.write_bytes((newline.join(partition) + newline).encode())
    f.attributes_file.write_bytes((newline.join(attributes) + newline).encode())


def pillow_square(path: Path, crop: int | None, size: int) -> np.ndarray:
    """The reference: full-resolution decode, RGB, center crop (or largest square), antialiased bilinear resize (as
    torchvision's Resize on PIL images): uint8 (3, S, S)."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        w, h = image.size
        side = min(w, h) if crop is None else crop
        left, top = (w - side) // 2, (h - side) // 2
        square = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(square).transpose(2, 0, 1)


def make_folder(root: Path, seed: int = 0) -> dict[str, tuple[int, int]]:
    """A folder tree of images of every supported format and various sizes; returns {relative path: (w, h)}."""
    rng = np.random.default_rng(seed)
    specs = {
        "a.jpg": (178, 218), "b.JPEG": (300, 200), "sub/c.png": (120, 160), "sub/d.bmp": (64, 48),
        "sub/deeper/e.webp": (200, 200), "f.gif": (90, 70), "sub/g.jpg": (1200, 900), "h.png": (33, 77),
    }
    for name, (w, h) in specs.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(smooth_image(rng, w, h))
        if name.endswith(".png") and name.startswith("sub"):
            image = image.convert("RGBA")  # an alpha channel, fully opaque
        if name.endswith(".gif"):
            image = image.convert("P")
        image.save(path, quality=92) if name.lower().endswith((".jpg", ".jpeg")) else image.save(path)
    for i in range(12):  # enough images for a 90/10 split to have a test part
        path = root / "more" / f"{i:02d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg_bytes(smooth_image(rng, 150, 150)))
        specs[f"more/{i:02d}.jpg"] = (150, 150)
    return specs


# Where the planted attributes show in a 178x218 CelebA-aligned image (rows, columns): inside the 148 px centre crop,
# at the eyes and at the mouth. In a prepared image of side S they cover rows EYE_ROWS / 148 * S (about 0.44-0.59 S)
# and MOUTH_ROWS / 148 * S (about 0.71-0.87 S), after the crop's offset of 35 rows.
EYE_ROWS, EYE_COLUMNS = (100, 122), (30, 148)
MOUTH_ROWS, MOUTH_COLUMNS = (140, 164), (50, 128)
PLANTED = ("Eyeglasses", "Smiling")  # a dark band across the eyes; a bright bar at the mouth


def planted_image(rng: np.random.Generator, eyeglasses: bool, smiling: bool) -> np.ndarray:
    """A plain face-like picture, uint8 (218, 178, 3): a random skin tone and soft light, with a dark band across the
    eyes when `eyeglasses` and a bright bar at the mouth when `smiling`."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH] / HEIGHT
    tone = rng.uniform(110, 170) * np.array([1.0, 0.85, 0.75]) * rng.uniform(0.9, 1.1, 3)
    light = 25 * rng.uniform(-1, 1) * (xx - 0.4) + 25 * rng.uniform(-1, 1) * (yy - 0.5)  # a soft gradient
    picture = tone + light[..., None] + rng.normal(0, 4, (HEIGHT, WIDTH, 3))
    if eyeglasses:
        picture[slice(*EYE_ROWS), slice(*EYE_COLUMNS)] = 25
    if smiling:
        picture[slice(*MOUTH_ROWS), slice(*MOUTH_COLUMNS)] = 240
    return np.clip(picture, 0, 255).astype(np.uint8)


def make_planted_celeba(top: Path, count: int = 800, seed: int = 0) -> CelebaFixture:
    """A CelebA copy (original layout) in which Eyeglasses and Smiling are drawn into the pictures and the other 38
    attributes are coin flips that nothing in the pictures shows; half the images train, half test."""
    rng = np.random.default_rng(seed)
    dataset = top / "celeba"
    images = dataset / "img_align_celeba"
    images.mkdir(parents=True, exist_ok=True)
    names = [f"{i:06d}.jpg" for i in range(1, count + 1)]
    attributes = rng.choice(np.array([-1, 1], dtype=np.int8), size=(count, len(ATTRIBUTE_NAMES)))
    eyes, mouth = (ATTRIBUTE_NAMES.index(name) for name in PLANTED)
    for name, row in zip(names, attributes):
        (images / name).write_bytes(jpeg_bytes(planted_image(rng, row[eyes] > 0, row[mouth] > 0)))
    codes = np.where(np.arange(count) < count // 2, 0, 2).astype(np.int8)  # train, then test
    fixture = CelebaFixture(top, dataset, images, dataset / "list_eval_partition.txt",
                            dataset / "list_attr_celeba.txt", names, codes, attributes, "original")
    write_lists(fixture)
    return fixture
