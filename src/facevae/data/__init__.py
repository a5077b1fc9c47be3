"""Data sources and the uint8 image set that training reads.

A data SPEC names a source: `lfw` (faces bundled with scikit-image), `celeba:PATH` (either CelebA layout),
`folder:PATH` (any folder of images), or the path of a prepared cache. Sources are decoded and resized once by
`prepare` into a cache (facevae.data.cache); everything after that reads the cache.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facevae.data.cache import Cache, cache_root, is_cache, load_cache
from facevae.errors import UserError

SPEC_HELP = "use lfw, celeba:PATH, folder:PATH or the path of a prepared cache"


@dataclass
class ImageSet:
    """One split of a prepared cache: uint8 images (N, C, H, W) with attributes where the source has them."""

    images: torch.Tensor  # uint8 (N, C, H, W)
    attributes: torch.Tensor | None  # int8 (N, A) of -1/1, or None
    attribute_names: list[str]
    split: str
    manifest: dict[str, Any]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index]


def parse_spec(spec: str) -> tuple[str, str | None]:
    """`lfw` -> ("lfw", None); `celeba:PATH` -> ("celeba", PATH); a cache directory -> ("cache", PATH)."""
    if spec == "lfw":
        return "lfw", None
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("celeba", "folder"):
        if not rest:
            raise UserError(f"data source '{spec}' names no path; {SPEC_HELP}")
        return kind, rest
    if is_cache(spec):
        return "cache", spec
    if Path(spec).exists():
        raise UserError(f"'{spec}' is not a prepared cache (no manifest.json); "
                        f"for a folder of images use folder:{spec}, for CelebA celeba:{spec}")
    raise UserError(f"unknown data source '{spec}'; {SPEC_HELP}")


def default_cache_path(spec: str, *, size: int, crop: int, split: str, seed: int = 0) -> Path:
    """Where `prepare` puts the cache of a source when no --out is given (one cache per source and settings)."""
    kind, path = parse_spec(spec)
    if kind == "cache":
        return Path(path)
    if kind == "lfw":
        return cache_root() / f"lfw-{size}"
    resolved = str(Path(path).expanduser().resolve())
    digest = hashlib.sha1(resolved.encode()).hexdigest()[:8]
    name = Path(resolved).name or kind
    suffix = f"{size}-crop{crop}-{split}" if kind == "celeba" else f"{size}"
    if kind == "celeba" and split == "deck":
        suffix += f"-seed{seed}"  # the deck split is drawn from a seed
    return cache_root() / f"{kind}-{name}-{digest}-{suffix}"


def prepare(spec: str, *, size: int = 64, crop: int = 148, split: str = "official", seed: int = 0,
            out: str | Path | None = None, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Decode and resize a source once into a cache; return its path and manifest. A finished cache is reused."""
    kind, path = parse_spec(spec)
    if kind == "cache":
        cache = load_cache(path)
        return cache.path, cache.manifest
    if size < 1 or crop < 1:
        raise UserError(f"--size and --crop must be positive (got size {size}, crop {crop})")
    target = Path(out) if out else default_cache_path(spec, size=size, crop=crop, split=split, seed=seed)
    if is_cache(target):
        manifest = load_cache(target).manifest
        wanted = {"size": size}
        if kind == "celeba":  # the split decides which images are test images: a cache of another split is not this one
            wanted.update(crop=crop, split={"scheme": split, "seed": seed} if split == "deck" else {"scheme": split})
        have = {k: manifest.get(k) for k in wanted}
        if have == wanted:
            return target, manifest
        raise UserError(f"{target} already holds a cache made with other settings ({have}, not {wanted}); "
                        f"choose another --out")
    target.parent.mkdir(parents=True, exist_ok=True)
    if kind == "lfw":
        from facevae.data.bundled import prepare_lfw

        return target, prepare_lfw(target, size=size)
    if kind == "celeba":
        from facevae.data.celeba import prepare_celeba

        return target, prepare_celeba(Path(path), target, size=size, crop=crop, split=split, seed=seed,
                                      progress=progress)
    from facevae.data.folder import prepare_folder

    return target, prepare_folder(Path(path), target, size=size, progress=progress)


def open_dataset(spec: str = "lfw", split: str = "test", *, size: int = 64, crop: int = 148,
                 scheme: str = "official", split_seed: int = 0, progress: bool = True) -> ImageSet:
    """The images of one split of a data source (prepared on first use) as uint8 (N, C, H, W); `scheme` is how
    CelebA is split (official or deck)."""
    path, _ = prepare(spec, size=size, crop=crop, split=scheme, seed=split_seed, progress=progress)
    return image_set(load_cache(path), split)


def image_set(cache: Cache, split: str) -> ImageSet:
    """One split of an opened cache, copied into memory as a torch tensor."""
    view = split_view(cache, split)
    index = view.index.numpy()
    attributes = torch.from_numpy(cache.attributes[index]) if cache.attributes is not None else None
    return ImageSet(view[:], attributes, list(cache.manifest.get("attribute_names", [])), split, cache.manifest)


class SplitView:
    """The images of one split without copying them: the memory-mapped cache, read through the split's indices.

    Indexing with an int, a slice or an index tensor gathers those images as a uint8 tensor (B, C, H, W); memory
    holds the cache's pages as they are touched, never a second copy of the split.
    """

    def __init__(self, images: torch.Tensor, index: torch.Tensor):
        self.images = images  # uint8 (N_all, C, H, W), memory-mapped
        self.index = index  # int64 (N_split,)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, idx) -> torch.Tensor:
        return self.images[self.index[idx]]

    def head(self, n: int) -> "SplitView":
        """The first n images of the split, still without a copy."""
        return SplitView(self.images, self.index[:n])

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self.images.shape[1:])

    def to(self, device: torch.device, *, chunk: int = 8192) -> "SplitView | torch.Tensor":
        """On a GPU, the split gathered into device memory chunk by chunk (no host copy of the whole); else self."""
        if torch.device(device).type == "cpu":
            return self
        out = torch.empty(self.shape, dtype=torch.uint8, device=device)
        for start in range(0, len(self), chunk):
            out[start:start + chunk] = self[start:start + chunk].to(device, non_blocking=False)
        return out


def checked_cache(config, *, progress: bool = True) -> Cache:
    """The cache of the data a config (facevae.config.Config) names, prepared on first use, checked against it."""
    path, _ = prepare(config.data, size=config.image_size, crop=config.crop, split=config.split,
                      seed=config.split_seed, progress=progress)
    cache = load_cache(path)
    _, c, h, _ = cache.images.shape
    if c != config.channels:
        raise UserError(f"the data has {c} channel(s) but the config says channels = {config.channels}; "
                        f"set channels = {c} (--set channels={c})")
    if h != config.image_size:
        raise UserError(f"the data cache holds {h}x{h} images but image_size = {config.image_size}; "
                        f"prepare it at that size or set image_size = {h}")
    return cache


def split_view(cache: Cache, split: str) -> SplitView:
    """One split of an opened cache, read through its indices (no copy)."""
    index = torch.from_numpy(cache.split_indices(split).astype(np.int64))
    return SplitView(torch.from_numpy(cache.images), index)


def open_split_view(config, split: str, *, progress: bool = True) -> SplitView:
    """One split of the data a config names, without copying it (see SplitView)."""
    return split_view(checked_cache(config, progress=progress), split)


def open_split(config, split: str, *, progress: bool = True) -> ImageSet:
    """One split of the data a config names, in memory, with its attributes and manifest."""
    return image_set(checked_cache(config, progress=progress), split)
