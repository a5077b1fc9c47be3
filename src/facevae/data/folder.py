"""The `folder:PATH` source: any folder of images (searched recursively), largest center square, resized.

The split is a fixed, seeded 90/10 train/test draw (seed FOLDER_SPLIT_SEED, recorded in the manifest).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from facevae.data.cache import Settings, path_tag, seeded_split
from facevae.data.decode import IMAGE_EXTENSIONS, RESAMPLE_NAME, decode_all, job_key, report_skipped, scan_folder
from facevae.errors import UserError

FOLDER_SPLIT_SEED = 0
NATIVE_SHAPE = (3, 64)  # (channels, side) when a config says "auto": RGB at `facevae prepare`'s default size
FOLDER_TEST_PERCENT = 10  # of the usable images, rounded half up


def cache_name(path: str, s: Settings) -> str:
    """The cache's directory name under the cache root: one per folder and size."""
    return f"{path_tag('folder', path)}-{s.size}"


def identity(s: Settings) -> dict[str, Any]:
    """The manifest entries an existing cache must have to be this one."""
    return {"size": s.size}


def list_images(root: Path, exclude: tuple[Path, ...] = ()) -> tuple[list[str], list[dict[str, str]], dict[str, str]]:
    """Image files under root, recursively, as sorted relative POSIX paths; the skipped entries (non-image files,
    pipes and devices, unreadable sub-folders, each with its reason); and {path: target} of the links that lead out
    of root (used, and named in the manifest).

    Hidden files and folders (names starting with ".") and the folders in `exclude` (e.g. the cache being
    written, should it lie inside root) are passed over silently.
    """
    root = Path(root).resolve()
    excluded = {str(p.resolve()) for p in exclude}
    images: list[str] = []
    skipped: list[dict[str, str]] = []
    outside: dict[str, str] = {}
    stack = [""]  # relative POSIX paths of the folders still to list
    while stack:
        relative = stack.pop()
        folder = os.path.join(root, relative)
        try:
            listing = scan_folder(folder, str(root))
        except OSError as e:
            skipped.append({"file": f"{relative}/", "reason": f"unreadable folder: {e.strerror}; its images are "
                                                              f"not used"})
            continue
        join = (lambda name: f"{relative}/{name}") if relative else (lambda name: name)
        stack += [join(d) for d in sorted(listing.folders, reverse=True)
                  if os.path.join(folder, d) not in excluded]
        skipped += [{"file": join(n), "reason": why} for n, why in listing.refused.items()]
        outside.update({join(n): target for n, target in listing.outside.items()})
        for name in listing.files:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                images.append(join(name))
            else:
                skipped.append({"file": join(name), "reason": "not an image: its extension is not one of "
                                                              + ", ".join(IMAGE_EXTENSIONS)})
    return sorted(images), sorted(skipped, key=lambda e: e["file"]), outside


def prepare(path: str | Path, out: Path, s: Settings, *, progress: bool) -> dict[str, Any]:
    """Decode every image under `path` once into a cache at `out` (s.size; crop and scheme do not apply)."""
    root, size = Path(path).expanduser(), s.size
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise UserError(f"{root} {what}; give folder:PATH a folder that holds image files")
    root = root.resolve()
    out = Path(out)
    names, skipped, outside = list_images(root, exclude=(out, out.with_name(out.name + ".partial")))
    if not names:
        raise UserError(f"no images in {root} (looked recursively for {', '.join(IMAGE_EXTENSIONS)} files)")
    if progress:
        print(f"facevae: {len(names):,} image files under {root}: largest center square, resize to {size}x{size}",
              file=sys.stderr)
    key = job_key(kind="folder", root=str(root), size=size, names=names)
    writer, kept, failed = decode_all(out, root, names, crop=None, size=size, progress=progress,
                                      attribute_names=None, key=key, what=str(root), max_pixels=s.max_pixels)
    skipped = sorted(skipped + failed, key=lambda e: e["file"])
    test = (len(kept) * FOLDER_TEST_PERCENT + 50) // 100
    writer.split_codes[:] = seeded_split(len(kept), test, FOLDER_SPLIT_SEED)
    manifest = writer.commit({
        "source": {"kind": "folder", "path": str(root), "layout": "folder"},
        "crop": None,
        "resample": RESAMPLE_NAME,
        "split": {"scheme": "fixed", "seed": FOLDER_SPLIT_SEED, "test_percent": FOLDER_TEST_PERCENT},
        "skipped": skipped,
        "links_outside": outside,  # image files that are links leading out of the folder, and where they lead
    })
    report_skipped(manifest, out)
    return manifest
