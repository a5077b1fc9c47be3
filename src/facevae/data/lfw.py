"""The `lfw` source: faces that ship inside scikit-image's LFW subset (the demo data, no download needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from facevae.data.cache import CacheWriter, Settings, seeded_split

LFW_FACES = 100  # lfw_subset() holds 100 faces followed by 100 non-faces; only the faces are used
LFW_TEST = 20  # a fixed 80 / 20 train / test split
LFW_SPLIT_SEED = 0
# (channels, side) when a config says "auto": grey, and the 25 px faces resized to 32, the smallest side the default
# networks take
NATIVE_SHAPE = (1, 32)


def cache_name(path: str | None, s: Settings) -> str:
    """The cache's directory name under the cache root."""
    return f"lfw-{s.size}"


def identity(s: Settings) -> dict[str, Any]:
    """The manifest entries an existing cache must have to be this one."""
    return {"size": s.size}


def lfw_faces() -> np.ndarray:
    """The 100 LFW faces of scikit-image as uint8 (100, 25, 25) grey images."""
    from skimage.data import lfw_subset

    faces = lfw_subset()[:LFW_FACES]  # float64 in [0, 1]
    return np.round(faces * 255).clip(0, 255).astype(np.uint8)


def prepare(path: str | None, out: Path, s: Settings, *, progress: bool = False) -> dict[str, Any]:
    """Resize the bundled faces to size x size (Lanczos, antialiased) and write them as a cache at `out`."""
    faces = lfw_faces()
    writer = CacheWriter(out, count=len(faces), channels=1, size=s.size)
    for i, face in enumerate(faces):
        writer.images[i, 0] = np.asarray(Image.fromarray(face).resize((s.size, s.size), Image.Resampling.LANCZOS))
    writer.split_codes[:] = seeded_split(len(faces), LFW_TEST, LFW_SPLIT_SEED)
    return writer.commit({
        "source": {"kind": "lfw", "path": "skimage.data.lfw_subset()", "layout": "bundled"},
        "crop": None,
        "split": {"scheme": "fixed", "seed": LFW_SPLIT_SEED},
        "skipped": [],
    })
