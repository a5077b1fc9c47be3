"""Data sources and the uint8 split views that training, evaluation and the pictures read.

A data SPEC names a source: `lfw` (faces bundled with scikit-image), `celeba:PATH` (either CelebA layout),
`folder:PATH` (any folder of images), or the path of a prepared cache. Each source is a module of this package with
`cache_name`, `identity` and `prepare`, listed in SOURCES; `prepare` decodes and resizes a source once into a cache
(facevae.data.cache), and everything after that reads the cache through a SplitView.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from facevae.data import celeba, folder, lfw
from facevae.data.cache import Cache, Settings, cache_root, is_cache, load_cache
from facevae.errors import UserError

if TYPE_CHECKING:
    from facevae.config import Config

# The table of sources: SPEC kind -> module. A new source is one module (cache_name, identity, prepare) and one line.
SOURCES: dict[str, ModuleType] = {
    "lfw": lfw,  # `lfw`: the faces bundled with scikit-image
    "celeba": celeba,  # `celeba:PATH`: CelebA in either layout, with attributes
    "folder": folder,  # `folder:PATH`: any folder of images
}
SPEC_HELP = "use lfw, celeba:PATH, folder:PATH or the path of a prepared cache"


class SplitView:
    """One split of a prepared cache, without copying it: the memory-mapped images read through the split's indices.

    Indexing with an int, a slice or an index tensor gathers those images as a uint8 tensor (B, C, H, W); memory
    holds the cache's pages as they are touched, never a second copy of the split. `images` and `attributes` gather
    the whole split (a copy).
    """

    def __init__(self, source: torch.Tensor, index: torch.Tensor, *, split: str = "", cache: Cache | None = None):
        self.source = source  # uint8 (N_all, C, H, W), memory-mapped
        self.index = index  # int64 (N_split,)
        self.split = split
        self.cache = cache

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, idx) -> torch.Tensor:
        return self.source[self.index[idx]]

    @property
    def images(self) -> torch.Tensor:
        """The whole split as one uint8 tensor (N, C, H, W) (a copy)."""
        return self[:]

    @property
    def attributes(self) -> torch.Tensor | None:
        """int8 (N, A) of -1/1 where the source has attributes (CelebA), else None."""
        if self.cache is None or self.cache.attributes is None:
            return None
        return torch.from_numpy(self.cache.attributes[self.index.numpy()])

    @property
    def attribute_names(self) -> list[str]:
        return list(self.manifest.get("attribute_names", []))

    @property
    def manifest(self) -> dict[str, Any]:
        return self.cache.manifest if self.cache is not None else {}

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self.source.shape[1:])

    def head(self, n: int) -> "SplitView":
        """The first n images of the split, still without a copy."""
        return SplitView(self.source, self.index[:n], split=self.split, cache=self.cache)

    def to(self, device: torch.device, *, chunk: int = 8192) -> "SplitView | torch.Tensor":
        """On a GPU, the split gathered into device memory chunk by chunk (no host copy of the whole); else self."""
        if torch.device(device).type == "cpu":
            return self
        out = torch.empty(self.shape, dtype=torch.uint8, device=device)
        for start in range(0, len(self), chunk):
            out[start:start + chunk] = self[start:start + chunk].to(device, non_blocking=False)
        return out


ImageSet = SplitView  # the public name of an opened split (facevae.ImageSet)


def parse_spec(spec: str) -> tuple[str, str | None]:
    """`lfw` -> ("lfw", None); `celeba:PATH` -> ("celeba", PATH); a cache directory -> ("cache", PATH)."""
    if spec in SOURCES:
        return spec, None
    kind, sep, rest = spec.partition(":")
    if sep and kind in SOURCES:
        if not rest:
            raise UserError(f"data source '{spec}' names no path; {SPEC_HELP}")
        return kind, rest
    if is_cache(spec):
        return "cache", spec
    if Path(spec).exists():
        raise UserError(f"'{spec}' is not a prepared cache (no manifest.json); "
                        f"for a folder of images use folder:{spec}, for CelebA celeba:{spec}")
    raise UserError(f"unknown data source '{spec}'; {SPEC_HELP}")


def default_cache_path(spec: str, s: Settings) -> Path:
    """Where `prepare` puts the cache of a source when no --out is given (one cache per source and settings)."""
    kind, path = parse_spec(spec)
    return Path(path) if kind == "cache" else cache_root() / SOURCES[kind].cache_name(path, s)


def prepare(spec: str, *, size: int = 64, crop: int = 148, scheme: str = "official", seed: int = 0,
            out: str | Path | None = None, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Decode and resize a source once into a cache; return its path and manifest. A finished cache is reused."""
    kind, path = parse_spec(spec)
    if kind == "cache":
        cache = load_cache(path)
        return cache.path, cache.manifest
    if size < 1 or crop < 1:
        raise UserError(f"--size and --crop must be positive (got size {size}, crop {crop})")
    s = Settings(size=size, crop=crop, scheme=scheme, seed=seed)
    source = SOURCES[kind]
    target = Path(out) if out else default_cache_path(spec, s)
    if is_cache(target):
        manifest = load_cache(target).manifest
        wanted = source.identity(s)
        have = {k: manifest.get(k) for k in wanted}
        if have == wanted:
            return target, manifest
        raise UserError(f"{target} already holds a cache made with other settings ({have}, not {wanted}); "
                        f"choose another --out")
    target.parent.mkdir(parents=True, exist_ok=True)
    return target, source.prepare(path, target, s, progress=progress)


def open_dataset(spec: str = "lfw", split: str = "test", *, size: int = 64, crop: int = 148,
                 scheme: str = "official", split_seed: int = 0, progress: bool = True) -> SplitView:
    """One split (train, valid or test) of a data source, prepared on first use: uint8 (N, C, H, W) images read
    through the cache, with attributes where known; `scheme` is how CelebA is split (official or deck)."""
    path, _ = prepare(spec, size=size, crop=crop, scheme=scheme, seed=split_seed, progress=progress)
    return split_view(load_cache(path), split)


def checked_cache(config: "Config", *, progress: bool = True) -> Cache:
    """The cache of the data a config names, prepared on first use, checked against it."""
    path, _ = prepare(config.data, size=config.image_size, crop=config.crop, scheme=config.split_scheme,
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
    return SplitView(torch.from_numpy(cache.images), torch.from_numpy(cache.split_indices(split)), split=split,
                     cache=cache)
