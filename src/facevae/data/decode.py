"""Decoding image files into a cache, in parallel: the machinery shared by CelebA and folders of images.

Each image gets a slot (its position in the list of candidate files). Worker processes decode a chunk of slots and
write each image straight into the cache's images.npy at its slot's offset (os.pwrite into the file the writer has
memory-mapped), so no pixels travel between processes and no process holds more than one image: memory stays flat
whatever the number of images. Workers report back only which slots succeeded and why the others failed; the
parent keeps the done-mask (saved periodically, so an interrupted prepare resumes), then drops failed slots by
compacting the file before the cache is committed, so the cache holds usable images only.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import math
import os
import signal
import stat
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from facevae.data.cache import FORMAT_VERSION, MANIFEST, CacheWriter
from facevae.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")
# Antialiased bilinear (a triangle filter as wide as the reduction), as torchvision's Resize on PIL images: the
# "center crop 148, resize 64" convention of PyTorch VAE code, reproduced exactly. It is also the fastest antialiased
# filter (about 95 us per 148 -> 64 image against 155 for bicubic and 245 for Lanczos), which matters here: the
# resize costs about half as much as decoding the JPEG.
RESAMPLE = Image.Resampling.BILINEAR
RESAMPLE_NAME = "bilinear"
# Reduced-scale JPEG decoding (libjpeg's DCT scaling by 1/2, 1/4, 1/8) is used only while the reduced crop keeps at
# least DRAFT_MARGIN times the output side: measured on natural images, a margin of 2 stays within 0.5 grey level
# mean absolute difference of a full-resolution decode, while a margin just above 1 (148 -> 74 -> 64) gives 1.2-1.7.
DRAFT_MARGIN = 2
DECODER_VERSION = 1  # bump when the pixels a given file decodes to change (invalidates partial caches)
SAVE_EVERY_S = 5.0  # seconds between saves of the done-mask
MAX_WORKERS = 8
# The pixel budget of one decoded image (after reduced JPEG decoding): a 6000x4000 photo. Far above CelebA's 178x218,
# and it keeps a worker's memory near 100 MB (RGBA plus its RGB copy) where a 13000x13000 PNG would need 3.5 GB.
MAX_PIXELS = 24_000_000
# A JPEG codes every 8x8 block of every component in at least a bit or so (a flat block: a DC difference and an
# end-of-block code); a file with less than one byte per JPEG_PIXELS_PER_BYTE pixels of its header's size has lost
# its data (libjpeg would fill the rest with grey without an error).
JPEG_PIXELS_PER_BYTE = 2048
ORIENTATION = 0x0112  # EXIF tag: how a camera photo must be turned to stand upright


def worker_count() -> int:
    """Decoding processes: $FACEVAE_WORKERS if set, else min(os.cpu_count(), 8)."""
    value = os.environ.get("FACEVAE_WORKERS", "").strip()
    if not value:
        return max(1, min(os.cpu_count() or 1, MAX_WORKERS))
    try:
        workers = int(value)
    except ValueError:
        workers = 0
    if workers < 1:
        raise UserError(f"FACEVAE_WORKERS={value!r} is not a positive whole number; set it to e.g. 2 or unset it")
    return workers


@dataclass
class Listing:
    """One folder's entries as prepare sees them."""

    files: list[str]  # regular files and links to regular files
    folders: list[str]  # sub-folders (links to folders are not followed)
    refused: dict[str, str]  # name -> why it is never opened (a pipe, a device, a broken link)
    outside: dict[str, str]  # name -> the resolved target of a link that leads out of the source folder


def scan_folder(folder: str, root: str) -> Listing:
    """The entries of `folder` (not recursive; hidden names passed over); `root`: the resolved source folder that
    links are checked against. Raises OSError when the folder cannot be read."""
    listing = Listing([], [], {}, {})
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                listing.folders.append(entry.name)
            elif not entry.is_file():  # follows a link: what it leads to must be a regular file
                kind = "a broken link" if entry.is_symlink() else "a pipe, device or socket"
                listing.refused[entry.name] = f"not a regular file: {kind} is never read"
            else:
                listing.files.append(entry.name)
                target = os.path.realpath(entry.path) if entry.is_symlink() else None
                if target is not None and os.path.commonpath([target, root]) != root:
                    listing.outside[entry.name] = target
    return listing


def draft_factor(side: int, size: int) -> int:
    """The JPEG reduction (1, 2, 4 or 8) allowed for a `side` px crop resized to `size` px."""
    for factor in (8, 4, 2):
        if side >= DRAFT_MARGIN * factor * size:
            return factor
    return 1


class BadImage(ValueError):
    """An image file refused before it is decoded; the message is the reason named in the manifest."""


def open_regular(path: str):
    """A regular file (or a link to one) opened for reading; a FIFO, device or socket is refused without blocking."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "is a folder", path)
        raise BadImage("not a regular file: a pipe, device or socket is never read")
    return os.fdopen(fd, "rb")


def _check_budget(im: Image.Image, stored: tuple[int, int], file_size: int, max_pixels: int) -> None:
    """Refuse an image over the pixel budget (as it will be decoded) or a JPEG whose data ends long before the size
    its header gives."""
    w, h = im.size
    if w * h > max_pixels:
        raise BadImage(f"too large: {w}x{h} pixels to decode, more than the budget of {max_pixels:,} (--max-pixels)")
    if im.format == "JPEG" and file_size * JPEG_PIXELS_PER_BYTE < stored[0] * stored[1]:
        raise BadImage(f"truncated: {file_size:,} bytes cannot hold the {stored[0]}x{stored[1]} pixels its header "
                       f"gives")


def _opened(source: str | BinaryIO) -> contextlib.AbstractContextManager[BinaryIO]:
    """A path opened by open_regular; a binary file object (an upload) as it is, left open for its owner."""
    return contextlib.nullcontext(source) if hasattr(source, "read") else open_regular(source)


def _file_size(f: BinaryIO) -> int:
    """Bytes in an open file: from its descriptor, or by seeking to its end (a file object in memory)."""
    try:
        return os.fstat(f.fileno()).st_size
    except (OSError, ValueError):  # io.UnsupportedOperation: no descriptor
        position = f.tell()
        size = f.seek(0, os.SEEK_END)
        f.seek(position)
        return size


def load_square(path: str | BinaryIO, *, crop: int | None, size: int, draft: bool = True,
                max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode one image (a path, or a binary file object such as an upload), center-crop a square (`crop` px, or
    the largest one), resize it: uint8 (3, size, size)."""
    with _opened(path) as f, Image.open(f) as im:
        w, h = im.size  # as stored, before any EXIF turn
        side = min(w, h) if crop is None else min(crop, w, h)
        scale = 1.0  # stored pixels per decoded pixel
        factor = draft_factor(side, size) if draft and im.format == "JPEG" else 1
        if factor > 1:
            got = im.draft("RGB", (max(1, w // factor), max(1, h // factor)))
            if got is not None:
                scale = w / got[1][2]  # draft returns the decoded box, in stored pixels / factor
        _check_budget(im, (w, h), _file_size(f), max_pixels)
        rgb = _to_rgb(im)  # decodes; after that, the EXIF data of any format is in im.info
        orientation = _orientation(im) if "exif" in im.info else 1
        if orientation in _TRANSPOSE:
            rgb = rgb.transpose(_TRANSPOSE[orientation])
            if orientation >= 5:  # a quarter turn: width and height swap
                w, h = h, w
        left, top = (w - side) // 2, (h - side) // 2  # the center square, in stored (full-resolution) pixels
        box = (left / scale, top / scale, (left + side) / scale, (top + side) / scale)
        square = rgb.resize((size, size), RESAMPLE, box=box)  # antialiased; box = crop without a copy
    return np.asarray(square).transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)


_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1 = upright); damaged EXIF data counts as upright rather than spoiling the image."""
    try:
        return int(im.getexif().get(ORIENTATION, 1))
    except Exception:  # Pillow raises several kinds on malformed EXIF blocks
        return 1


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any mode -> RGB: grey and CMYK converted, transparency composited on white, 16-bit grey scaled down."""
    if im.mode == "RGB":
        im.load()
        return im
    if im.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grey (PNG): 0..65535 -> 0..255
        grey = np.asarray(im.convert("I"), dtype=np.float32) / 257.0
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8)).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def failure_reason(error: Exception) -> str:
    """One line saying why a file could not be used."""
    if isinstance(error, FileNotFoundError):
        return "missing: the file disappeared while preparing"
    if isinstance(error, UnidentifiedImageError):
        return "not an image: its contents are not a known image format"
    if isinstance(error, BadImage):
        return str(error)
    text = " ".join(str(error).split())[:200] or type(error).__name__
    if "truncated" in text.lower():
        return f"unreadable: truncated ({text})"
    return f"unreadable: {type(error).__name__}: {text}"


@dataclass
class _Job:
    """What a decoding process needs: the files, the geometry and where images.npy's slots are."""

    root: str
    names: list[str]  # file paths relative to root, one per slot
    crop: int | None
    size: int
    image_file: str
    offset: int  # bytes of the .npy header
    pool: bool  # running in a worker process (ignore Ctrl-C there: the parent stops the pool)
    max_pixels: int = MAX_PIXELS  # the pixel budget of one decoded image


_job: _Job | None = None
_fd: int = -1


def _start(job: _Job) -> None:
    """Set up a decoding process: remember the job, open images.npy for writing by offset."""
    global _job, _fd
    if job.pool:
        exit_with_parent()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        warnings.simplefilter("ignore")  # Pillow's warnings about odd files would garble the progress bar
    _job = job
    _fd = os.open(job.image_file, os.O_WRONLY)


def exit_with_parent() -> None:
    """Make this worker process end when its parent dies, even by kill -9: on Linux the kernel sends SIGKILL
    (prctl PR_SET_PDEATHSIG); elsewhere a thread polls the parent's pid once a second."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGKILL, 0, 0, 0) == 0:  # 1 = PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the parent died before the call: nobody will send the signal
                os._exit(1)
            return
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _stop() -> None:
    """Close what _start opened (in-process decoding)."""
    global _job, _fd
    if _fd >= 0:
        os.close(_fd)
    _job, _fd = None, -1


def _decode_chunk(slots: np.ndarray) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Decode the images of `slots` into images.npy; return the slots done and (slot, reason) of the failed ones."""
    job = _job
    assert job is not None, "_start() first"
    item = 3 * job.size * job.size  # bytes per image
    done: list[int] = []
    failed: list[tuple[int, str]] = []
    for slot in slots.tolist():
        try:
            pixels = load_square(os.path.join(job.root, job.names[slot]), crop=job.crop, size=job.size,
                                 max_pixels=job.max_pixels)
        except Exception as e:  # any decoder error means this file cannot be used; it is reported, not raised
            failed.append((slot, failure_reason(e)))
            continue
        os.pwrite(_fd, np.ascontiguousarray(pixels).data, job.offset + slot * item)
        done.append(slot)
    return np.array(done, dtype=np.int64), failed


def _results(job: _Job, chunks: list[np.ndarray], workers: int) -> Iterator[tuple[np.ndarray, list]]:
    """Decode the chunks (in this process when workers == 1), yielding each chunk's result as it is ready."""
    if workers == 1:
        _start(job)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for chunk in chunks:
                    yield _decode_chunk(chunk)
        finally:
            _stop()
        return
    import multiprocessing

    # fork starts workers at once without re-importing facevae (and torch); elsewhere spawn is the safe choice.
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start, initargs=(job,))
    try:
        pending: set[Future] = {pool.submit(_decode_chunk, chunk) for chunk in chunks}
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                yield future.result()
    except BrokenProcessPool:
        raise UserError("a decoding process died (out of memory, or a damaged image crashed the decoder); "
                        "run the same command again to go on, with FACEVAE_WORKERS=1 to use less memory") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def decode_into(writer: CacheWriter, root: Path, names: list[str], *, crop: int | None, size: int,
                progress: bool, desc: str = "prepare", max_pixels: int = MAX_PIXELS) -> dict[int, str]:
    """Decode every image not yet done into writer.images by slot; return {slot: reason} of those that failed."""
    todo = np.flatnonzero(~writer.done)
    failures: dict[int, str] = {}
    if len(todo) == 0:
        return failures
    workers = min(worker_count(), math.ceil(len(todo) / 8))
    chunk = min(256, max(8, math.ceil(len(todo) / (workers * 8))))  # a few chunks per worker at least
    chunks = [todo[i:i + chunk] for i in range(0, len(todo), chunk)]
    job = _Job(str(root), names, crop, size, str(writer.image_file), int(writer.images.offset), pool=workers > 1,
               max_pixels=max_pixels)
    results = _results(job, chunks, workers)
    bar = None
    saved = time.monotonic()
    try:
        from tqdm import tqdm

        # the pool starts on the first next(): before tqdm's monitor thread exists, so fork copies no threads
        first = next(results)
        bar = tqdm(total=len(names), initial=len(names) - len(todo), desc=desc, unit="img", file=sys.stderr,
                   disable=not progress, dynamic_ncols=True, mininterval=0.5)
        for ok, failed in itertools.chain([first], results):
            writer.done[ok] = True
            failures.update(failed)
            bar.update(len(ok) + len(failed))
            if time.monotonic() - saved > SAVE_EVERY_S:
                writer.save_progress()
                saved = time.monotonic()
    except BaseException:
        results.close()  # stop the pool before saving, so no worker writes after the mask is taken
        writer.save_progress()
        if bar is not None:
            bar.close()
        print(f"facevae: prepare stopped with {int(writer.done.sum()):,} of {len(names):,} images done; "
              f"run the same command again to finish", file=sys.stderr)
        raise
    bar.close()
    return failures


def job_key(**parts: Any) -> str:
    """A digest of what the slots of a partial cache mean (settings and the ordered file list)."""
    text = json.dumps({"format": FORMAT_VERSION, "decoder": DECODER_VERSION, "resample": RESAMPLE_NAME,
                       "draft_margin": DRAFT_MARGIN, **parts}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()


def decode_all(out: Path, root: Path, names: list[str], *, crop: int | None, size: int, progress: bool,
               attribute_names: list[str] | None, key: str, what: str,
               max_pixels: int | None = None) -> tuple[CacheWriter, np.ndarray, list]:
    """Decode `names` (relative to `root`) into a partial cache at `out`, dropping the files that fail.

    Returns the writer (images compacted to the usable files), the indices into `names` that were kept, and the
    skipped entries of the failed ones. Raises UserError, removing the partial cache, when no file could be used.
    """
    writer = CacheWriter(out, count=len(names), channels=3, size=size, attribute_names=attribute_names, key=key)
    if writer.resumed and writer.done.any() and progress:
        print(f"facevae: resuming an interrupted prepare ({int(writer.done.sum()):,} of {len(names):,} images "
              f"already done)", file=sys.stderr)
    failures = decode_into(writer, root, names, crop=crop, size=size, progress=progress,
                           max_pixels=max_pixels or MAX_PIXELS)
    keep = writer.done.copy()
    skipped = [{"file": names[slot], "reason": reason} for slot, reason in sorted(failures.items())]
    if not keep.any():
        writer.abort()
        example = f" (e.g. {skipped[0]['file']}: {skipped[0]['reason']})" if skipped else ""
        raise UserError(f"none of the {len(names):,} image files of {what} could be read{example}; "
                        f"check that they are image files")
    writer.compact(keep)
    return writer, np.flatnonzero(keep), skipped


def report_skipped(manifest: dict[str, Any], out: Path) -> None:
    """When files were skipped, one line on stderr counting them by reason and saying where they are named."""
    skipped = manifest.get("skipped", [])
    if not skipped:
        return
    reasons = Counter(entry["reason"].split(":")[0] for entry in skipped)
    why = ", ".join(f"{n:,} {reason}" for reason, n in reasons.most_common())
    files = "file" if len(skipped) == 1 else "files"
    print(f"facevae: prepared {manifest['images']:,} images; skipped {len(skipped):,} {files} ({why}), each named "
          f"under \"skipped\" in {out / MANIFEST}", file=sys.stderr)
