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

from facevae.config import MAX_IMAGE_SIZE, MAX_SEED
from facevae.data import celeba, folder, lfw
from facevae.data.cache import Cache, Settings, cache_root, is_cache, load_cache, partial_dir
from facevae.errors import UserError
from facevae.fileio import DirLock, check_output_dir, check_path_text

if TYPE_CHECKING:
    from facevae.config import Config

# The table of sources: SPEC kind -> module. A new source is one module (cache_name, identity, prepare) and one line.
SOURCES: dict[str, ModuleType] = {
    "lfw": lfw,  # `lfw`: the faces bundled with scikit-image
    "celeba": celeba,  # `celeba:PATH`: CelebA in either layout, with attributes
    "folder": folder,  # `folder:PATH`: any folder of images
}
SPEC_HELP = "use lfw, celeba:PATH, folder:PATH or the path of a prepared cache"
NO_DATA = ""  # the data of a run whose config.toml is missing: unknown (a weights file's metadata is not trusted)


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
    check_path_text(spec, "the data SPEC")
    if spec == NO_DATA:
        raise UserError("no data source is known: a run without its config.toml names none (its weights' metadata is "
                        "not trusted for that); restore the config.toml, or give --data SPEC")
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
            out: str | Path | None = None, max_pixels: int | None = None,
            progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Decode and resize a source once into a cache; return its path and manifest. A finished cache is reused.

    `out` must be new, an empty folder or a cache of the same settings: nothing else is ever written into or
    removed. The cache is written under `<out>.partial/` (marked as facevae's), locked against a second prepare of
    it. `max_pixels`: the largest image decoded (facevae.data.decode.MAX_PIXELS by default); larger ones are skipped
    and named.
    """
    kind, path = parse_spec(spec)
    if kind == "cache":
        cache = load_cache(path)
        return cache.path, cache.manifest
    _check_settings(size=size, crop=crop, seed=seed, max_pixels=max_pixels)
    s = Settings(size=size, crop=crop, scheme=scheme, seed=seed, max_pixels=max_pixels)
    target = Path(out).expanduser() if out else default_cache_path(spec, s)
    target = target if target.name else target.resolve()  # "." or "..": the folder's own name
    if is_cache(target):
        return target, _reuse(target, SOURCES[kind], s)
    check_output_dir(target, "cache")
    partial = partial_dir(target)  # locked below; the source's CacheWriter writes there
    with DirLock(partial, f"the cache being prepared at {target}"):
        if is_cache(target):  # another process finished it meanwhile
            return target, _reuse(target, SOURCES[kind], s)
        return target, SOURCES[kind].prepare(path, target, s, progress=progress)


def _check_settings(*, size: int, crop: int, seed: int, max_pixels: int | None) -> None:
    """prepare's numbers, each in its range, before any work."""
    if size < 1 or crop < 1:
        raise UserError(f"--size and --crop must be positive (got size {size}, crop {crop})")
    if size > MAX_IMAGE_SIZE:
        raise UserError(f"--size {size} is larger than facevae trains on ({MAX_IMAGE_SIZE}); choose a smaller size")
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"--seed must be between 0 and {MAX_SEED}, got {seed}")
    if max_pixels is not None and max_pixels < size * size:
        raise UserError(f"--max-pixels {max_pixels} is smaller than one {size}x{size} image")


def _reuse(target: Path, source: ModuleType, s: Settings) -> dict[str, Any]:
    """The manifest of the finished cache at `target` when it was made with these settings; else a UserError."""
    manifest = load_cache(target).manifest
    wanted = source.identity(s)
    have = {k: manifest.get(k) for k in wanted}
    if have != wanted:
        raise UserError(f"{target} already holds a cache made with other settings ({have}, not {wanted}); "
                        f"choose another --out")
    return manifest


def open_dataset(spec: str = "lfw", split: str = "test", *, size: int = 64, crop: int = 148,
                 scheme: str = "official", split_seed: int = 0, progress: bool = True) -> SplitView:
    """One split (train, valid or test) of a data source, prepared on first use: uint8 (N, C, H, W) images read
    through the cache, with attributes where known; `scheme` is how CelebA is split (official or deck)."""
    path, _ = prepare(spec, size=size, crop=crop, scheme=scheme, seed=split_seed, progress=progress)
    return split_view(load_cache(path), split)


def native_shape(spec: str) -> tuple[int, int]:
    """The (channels, image side) of a data source as it comes: a prepared cache's own, else its source's
    NATIVE_SHAPE. Nothing is prepared."""
    kind, path = parse_spec(spec)
    if kind == "cache":
        _, channels, size, _ = load_cache(path).images.shape
        return int(channels), int(size)
    return SOURCES[kind].NATIVE_SHAPE


def with_data_shape(config: "Config") -> "Config":
    """The config with "auto" channels and image_size replaced by the data's own (see native_shape)."""
    if config.shape_known:
        return config
    channels, size = native_shape(config.data)
    auto = {"channels": channels, "image_size": size}
    return config.updated({k: v for k, v in auto.items() if getattr(config, k) == "auto"}).validate()


def checked_cache(config: "Config", *, progress: bool = True) -> Cache:
    """The cache of the data a config names, prepared on first use, checked against it."""
    config = with_data_shape(config)
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
