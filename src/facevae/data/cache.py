"""The image cache: images decoded and resized once, stored uint8 so that training never decodes a file.

A cache is a directory:
    manifest.json    what made it: format_version, source, size, crop, channels, split scheme and seed, counts,
                     skipped files, attribute names
    images.npy       uint8 (N, C, H, W), memory-mappable (numpy .npy)
    splits.npy       int8 (N,): index of each image's split in manifest["split_names"]
    attributes.npy   int8 (N, A) of -1/1, only when the source has attributes (CelebA)

It is written under `<name>.partial/` and renamed to its final name only when complete, so a directory with the
final name is always a finished cache. While it is being written, `<name>.partial/` also holds progress.json (what
the slots of images.npy mean) and done.npy (which slots hold their final pixels), so that an interrupted prepare
can be finished by running it again.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facevae.errors import UserError
from facevae.fileio import LOCK, MARKER, check_output_dir, fsync_path, fsync_tree, mark_dir, remove_own_dir

FORMAT_VERSION = 1
SPLIT_NAMES = ("train", "valid", "test")
MANIFEST = "manifest.json"
PROGRESS = "progress.json"  # in <name>.partial/ only: {"key": ...}, the job the slots of images.npy belong to
DONE = "done.npy"  # in <name>.partial/ only: bool (N,), True where images.npy holds the image's final pixels
PARTIAL_WRITES = {"images.npy", "splits.npy", "attributes.npy", MANIFEST, PROGRESS, DONE, DONE + ".tmp", MARKER, LOCK}
MOVE_BLOCK = 32 << 20  # bytes moved at a time when compacting images.npy


def cache_root() -> Path:
    """Where prepared caches live unless a path is given: $FACEVAE_CACHE, else ~/.cache/facevae."""
    return Path(os.environ.get("FACEVAE_CACHE") or Path.home() / ".cache" / "facevae")


def is_cache(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


@dataclass(frozen=True)
class Settings:
    """What `prepare` makes of a source: image side, CelebA's center crop, split scheme and its seed."""

    size: int = 64
    crop: int = 148  # CelebA only
    scheme: str = "official"  # CelebA only: official or deck
    seed: int = 0  # the deck scheme's seed
    max_pixels: int | None = None  # the pixel budget of one decoded image (None: decode.MAX_PIXELS); not an identity


def path_tag(kind: str, path: str | Path) -> str:
    """The start of a source folder's cache name: kind, folder name and a digest of its resolved path."""
    resolved = str(Path(path).expanduser().resolve())
    return f"{kind}-{Path(resolved).name or kind}-{hashlib.sha1(resolved.encode()).hexdigest()[:8]}"


def seeded_split(count: int, test: int, seed: int) -> np.ndarray:
    """Split codes int8 (count,): `test` images drawn by a seeded permutation are test, the others train."""
    codes = np.full(count, SPLIT_NAMES.index("train"), dtype=np.int8)
    order = np.random.default_rng(seed).permutation(count)
    codes[order[:test]] = SPLIT_NAMES.index("test")
    return codes


@dataclass
class Cache:
    """A prepared cache, memory-mapped."""

    path: Path
    manifest: dict[str, Any]
    images: np.ndarray  # uint8 (N, C, H, W), memory-mapped read-only
    split_codes: np.ndarray  # int8 (N,)
    attributes: np.ndarray | None  # int8 (N, A) or None

    def split_indices(self, split: str) -> np.ndarray:
        """The indices of the images of `split` (train, valid or test), int64 (N_split,)."""
        names = self.manifest["split_names"]
        empty = {n for n, count in self.manifest.get("splits", {}).items() if count == 0}  # counts may be absent
        if split not in names or split in empty:
            have = [n for n in names if n not in empty]
            raise UserError(f"the data has no '{split}' split (it has: {', '.join(have)}); "
                            f"choose one of those with --split")
        return np.flatnonzero(self.split_codes == names.index(split)).astype(np.int64)


MAX_MANIFEST_BYTES = 256 << 20  # a manifest names skipped files: some MB for CelebA-sized sources


def load_cache(path: str | Path) -> Cache:
    """Open a finished cache; refuse one whose format version this facevae does not know. Every .npy header is
    checked against its file's size (and the others' shapes) before anything is mapped or read."""
    path = Path(path)
    manifest = read_manifest(path)
    try:
        shape = npy_shape(path / "images.npy", np.uint8, ndim=4)
        codes = npy_shape(path / "splits.npy", np.int8, ndim=1)
        names = manifest.get("attribute_names", [])
        attributes = path / "attributes.npy"
        if codes != shape[:1] or (attributes.exists() and
                                  npy_shape(attributes, np.int8, ndim=2) != (shape[0], len(names))):
            raise ValueError(f"images {shape}, split codes {codes}, {len(names)} attribute names disagree")
        images = np.load(path / "images.npy", mmap_mode="c")  # copy-on-write: torch can wrap it; never written
        split_codes = np.load(path / "splits.npy")
        attributes = np.load(attributes) if attributes.exists() else None
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"cache {path} is damaged ({' '.join(str(e).split())[:200]}); delete it and prepare the "
                        f"data again") from None
    return Cache(path, manifest, images, split_codes, attributes)


def read_manifest(path: Path) -> dict[str, Any]:
    """A cache's manifest.json, checked: a JSON object of this format version with its split names."""
    file = path / MANIFEST
    try:
        if file.stat().st_size > MAX_MANIFEST_BYTES:
            raise UserError(f"{file} is larger than {MAX_MANIFEST_BYTES >> 20} MB; it is not a facevae manifest")
        manifest = json.loads(file.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is not a prepared data cache (no {MANIFEST}); run `facevae prepare` first") from None
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"{file} is damaged ({' '.join(str(e).split())[:200] or 'nested too deeply'}); delete the "
                        f"cache and prepare it again") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise UserError(f"cache {path} has format version {str(version)[:20]}, this facevae reads version "
                        f"{FORMAT_VERSION}; prepare the data again")
    names, counts = manifest.get("split_names"), manifest.get("splits", {})
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names) and isinstance(counts, dict)
            and isinstance(manifest.get("attribute_names", []), list)):
        raise UserError(f"{file} is damaged (no list of split names); delete the cache and prepare it again")
    return manifest


def npy_shape(path: Path, dtype: type, *, ndim: int) -> tuple[int, ...]:
    """The shape of a C-order .npy file of `dtype` and `ndim` dimensions, read from its header and checked against
    the file's size, so that nothing is allocated from a header that lies; ValueError otherwise."""
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)  # literal_eval'd header, at most 10,000 bytes: no code runs
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            header = read(f)  # (shape, fortran_order, dtype)
        except (ValueError, EOFError, SyntaxError, TypeError) as e:
            raise ValueError(f"{path.name} has no .npy header: {e}") from None
        shape, fortran, found = header
        offset = f.tell()
    if found != np.dtype(dtype) or fortran or len(shape) != ndim:
        raise ValueError(f"{path.name} holds {found} {shape}, not {np.dtype(dtype)} of {ndim} dimension(s)")
    size = os.stat(path).st_size
    if offset + int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize != size:
        raise ValueError(f"{path.name}'s header says {shape} but the file holds {size - offset:,} bytes of data")
    return tuple(int(n) for n in shape)


def partial_dir(final: Path) -> Path:
    """`<final>.partial`, where a cache is made, created and marked as facevae's. An existing folder facevae did not
    mark is refused (UserError), even an empty one: everything in it may be replaced or removed, the folder too."""
    partial = final.with_name(final.name + ".partial")
    check_output_dir(partial, "cache", what=f"{partial} (where prepare keeps the cache while it is made)",
                     empty_ok=False)
    mark_dir(partial, "cache")
    return partial


class CacheWriter:
    """Writes a cache under `<final>.partial/` and renames it into place on commit().

    Fill `images` (a writable memory map, uint8 (N, C, H, W)), `split_codes` and `attributes`, then call commit().
    Reopening a partial cache of the same shape and `key` keeps what was written (`resumed` is True) together with
    `done` (bool (N,), which images are finished, as last saved by save_progress()), so a prepare can finish an
    interrupted job. `key` names what the slots mean (e.g. a digest of the ordered file list and the settings); a
    partial cache made for another key is started afresh.
    """

    def __init__(self, final: str | Path, *, count: int, channels: int, size: int,
                 attribute_names: list[str] | None = None, key: str = ""):
        self.final = Path(final)
        self.partial = partial_dir(self.final)  # never a folder of someone else's: its files are replaced, removed
        shape = (count, channels, size, size)
        image_file = self.partial / "images.npy"
        self.resumed = False
        if image_file.exists() and _read_key(self.partial / PROGRESS) == key:
            try:
                existing = np.lib.format.open_memmap(image_file, mode="r+")
                self.resumed = existing.shape == shape and existing.dtype == np.uint8
            except (OSError, ValueError):
                existing = None
            if self.resumed:
                self.images = existing
            else:
                del existing
        self.done = np.zeros(count, dtype=bool)
        if self.resumed:
            self.done = _read_done(self.partial / DONE, count)
        else:
            (self.partial / DONE).unlink(missing_ok=True)
            self.images = np.lib.format.open_memmap(image_file, mode="w+", dtype=np.uint8, shape=shape)
            (self.partial / PROGRESS).write_text(json.dumps({"key": key}) + "\n")
        self.split_codes = np.zeros(count, dtype=np.int8)
        self.attribute_names = attribute_names or []
        self.attributes = np.zeros((count, len(self.attribute_names)), dtype=np.int8) if attribute_names else None

    @property
    def image_file(self) -> Path:
        """The .npy file behind `images` (others may write into it by offset, e.g. decoding processes)."""
        return self.partial / "images.npy"

    def save_progress(self) -> None:
        """Make the written pixels durable, then record `done` (atomically), so a rerun skips finished images."""
        self.images.flush()
        fsync_path(self.image_file)
        tmp = self.partial / (DONE + ".tmp")
        _save_npy(tmp, self.done)
        os.replace(tmp, self.partial / DONE)

    def compact(self, keep: np.ndarray) -> None:
        """Drop the images where `keep` (bool (N,)) is False; the rest move down in place, streamed block by block."""
        keep = np.asarray(keep, dtype=bool)
        if keep.all():
            return
        count, *item_shape = self.images.shape
        item = int(np.prod(item_shape))  # bytes per image (uint8)
        offset = int(self.images.offset)  # bytes of the .npy header
        self.images.flush()
        del self.images  # unmap before the file shrinks
        # From here on the slots no longer mean what done.npy says: an interruption must start the decoding over.
        (self.partial / DONE).unlink(missing_ok=True)
        kept = np.flatnonzero(keep)
        fd = os.open(self.image_file, os.O_RDWR)
        try:
            target = 0
            for start, stop in _runs(kept):
                if start != target:  # the destination never overtakes the source, so moving in order is safe
                    _move(fd, offset + start * item, offset + target * item, (stop - start) * item)
                target += stop - start
            os.pwrite(fd, _npy_header(fd, offset, (len(kept), *item_shape)), 0)
            os.ftruncate(fd, offset + len(kept) * item)
        finally:
            os.close(fd)
        self.images = np.lib.format.open_memmap(self.image_file, mode="r+")
        self.done = self.done[keep]
        self.split_codes = self.split_codes[keep]
        if self.attributes is not None:
            self.attributes = self.attributes[keep]

    def abort(self) -> None:
        """Remove the partial cache (when nothing usable could be made of the source)."""
        if hasattr(self, "images"):
            del self.images
        try:
            remove_own_dir(self.partial, PARTIAL_WRITES)
        except UserError:  # it holds files facevae did not write: left as it is (the caller says why it stopped)
            pass

    def commit(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Write the lists and the manifest, flush everything to disk, and move the cache to its final name."""
        self.images.flush()
        _save_npy(self.partial / "splits.npy", self.split_codes)
        if self.attributes is not None:
            _save_npy(self.partial / "attributes.npy", self.attributes)
        names = list(SPLIT_NAMES)
        full = {
            "format_version": FORMAT_VERSION,
            **manifest,
            "images": int(len(self.images)),
            "channels": int(self.images.shape[1]),
            "size": int(self.images.shape[2]),
            "split_names": names,
            "splits": {n: int((self.split_codes == i).sum()) for i, n in enumerate(names)},
            "attribute_names": self.attribute_names,
        }
        (self.partial / MANIFEST).write_text(json.dumps(full, indent=2) + "\n")
        for name in (DONE, PROGRESS):  # progress records belong to the partial cache only
            (self.partial / name).unlink(missing_ok=True)
        fsync_tree(self.partial)
        del self.images  # close the memory map before the rename
        try:
            if self.final.exists():
                self.final.rmdir()  # an empty folder the user named (prepare refuses any other); never a tree
            os.replace(self.partial, self.final)
        except OSError as e:
            raise UserError(f"could not move the prepared cache to {self.final} ({e.strerror}); it is complete in "
                            f"{self.partial}: move it there yourself") from None
        fsync_path(self.final.parent)
        return full


def _read_key(path: Path) -> str | None:
    """The job key recorded in a partial cache's progress.json (None when absent or unreadable)."""
    try:
        return json.loads(path.read_text()).get("key")
    except (OSError, ValueError, AttributeError):
        return None


def _read_done(path: Path, count: int) -> np.ndarray:
    """A partial cache's done mask, bool (count,); all False when absent or damaged."""
    try:
        if npy_shape(path, np.bool_, ndim=1) == (count,):
            return np.load(path)
    except (OSError, ValueError):
        pass
    return np.zeros(count, dtype=bool)


def _runs(index: np.ndarray) -> list[tuple[int, int]]:
    """Sorted indices -> [(start, stop), ...] of their runs of consecutive values."""
    if len(index) == 0:
        return []
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(index)]])
    return [(int(index[a]), int(index[b - 1]) + 1) for a, b in zip(starts, stops)]


def _move(fd: int, source: int, target: int, nbytes: int) -> None:
    """Copy nbytes within a file from `source` to a lower offset `target`, block by block (memory stays small)."""
    done = 0
    while done < nbytes:
        block = os.pread(fd, min(MOVE_BLOCK, nbytes - done), source + done)
        os.pwrite(fd, block, target + done)
        done += len(block)


def _npy_header(fd: int, length: int, shape: tuple[int, ...]) -> bytes:
    """A uint8 C-order .npy header for `shape`, padded to the `length` bytes of the file's current header."""
    prefix = os.pread(fd, 8, 0)  # magic string (6 bytes) and format version (2 bytes)
    size_bytes = 2 if prefix[6] == 1 else 4  # version 1.0 stores the header length in 2 bytes, 2.0 and 3.0 in 4
    text = repr({"descr": "|u1", "fortran_order": False, "shape": tuple(int(n) for n in shape)})
    room = length - len(prefix) - size_bytes  # the dictionary, space padding and the final newline
    if len(text) + 1 > room:
        raise RuntimeError(f"no room for a .npy header of shape {shape} in {length} bytes")
    body = (text + " " * (room - len(text) - 1) + "\n").encode("latin1")
    return prefix + room.to_bytes(size_bytes, "little") + body


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)
