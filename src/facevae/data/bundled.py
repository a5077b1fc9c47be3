"""Faces that ship inside a package: scikit-image's LFW subset (the demo data, no download needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from facevae.data.cache import SPLIT_NAMES, CacheWriter

LFW_FACES = 100  # lfw_subset() holds 100 faces followed by 100 non-faces; only the faces are used
LFW_TEST = 20  # a fixed 80 / 20 train / test split
LFW_SPLIT_SEED = 0


def lfw_faces() -> np.ndarray:
    """The 100 LFW faces of scikit-image as uint8 (100, 25, 25) grey images."""
    from skimage.data import lfw_subset

    faces = lfw_subset()[:LFW_FACES]  # float64 in [0, 1]
    return np.round(faces * 255).clip(0, 255).astype(np.uint8)


def prepare_lfw(out: Path, *, size: int) -> dict[str, Any]:
    """Resize the bundled faces to size x size (Lanczos, antialiased) and write them as a cache."""
    faces = lfw_faces()
    writer = CacheWriter(out, count=len(faces), channels=1, size=size)
    for i, face in enumerate(faces):
        writer.images[i, 0] = np.asarray(Image.fromarray(face).resize((size, size), Image.Resampling.LANCZOS))
    order = np.random.default_rng(LFW_SPLIT_SEED).permutation(len(faces))
    writer.split_codes[:] = SPLIT_NAMES.index("train")
    writer.split_codes[order[:LFW_TEST]] = SPLIT_NAMES.index("test")
    return writer.commit({
        "source": {"kind": "lfw", "path": "skimage.data.lfw_subset()", "layout": "bundled"},
        "crop": None,
        "split": {"scheme": "fixed", "seed": LFW_SPLIT_SEED},
        "skipped": [],
    })
