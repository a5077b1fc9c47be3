"""The `celeba:PATH` source: find either layout, read its partition and attribute lists, and prepare it into a cache.

Layouts (both auto-detected from the dataset folder, its parent, or the image folder itself):
    original / torchvision   celeba/img_align_celeba/*.jpg, celeba/list_eval_partition.txt, celeba/list_attr_celeba.txt
    Kaggle mirror            img_align_celeba/img_align_celeba/*.jpg, list_eval_partition.csv, list_attr_celeba.csv
Splits: "official" (list_eval_partition: 0 train, 1 valid, 2 test) or "deck" (the study deck's 70/30 train/test,
141,819 / 60,780 of the 202,599 images, drawn by a seeded permutation).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facevae.data.cache import SPLIT_NAMES, Settings, path_tag, seeded_split
from facevae.data.decode import RESAMPLE_NAME, decode_all, job_key, report_skipped, scan_folder
from facevae.errors import UserError

IMAGE_DIR = "img_align_celeba"
LISTS = {  # layout -> (partition list, attribute list)
    "original": ("list_eval_partition.txt", "list_attr_celeba.txt"),
    "kaggle": ("list_eval_partition.csv", "list_attr_celeba.csv"),
}
WIDTH, HEIGHT = 178, 218  # CelebA's aligned images
CELEBA_IMAGES = 202_599
NATIVE_SHAPE = (3, 64)  # (channels, side) when a config says "auto": RGB at `facevae prepare`'s default size
DECK_TEST = 60_780  # the deck's test images out of CELEBA_IMAGES (its train set is the other 141,819)
SPLITS = ("official", "deck")
PARTITION_SPLITS = ("train", "valid", "test")  # what list_eval_partition's codes 0, 1, 2 mean


@dataclass(frozen=True)
class Layout:
    """Where a CelebA copy keeps its pieces."""

    name: str  # "original" or "kaggle"
    root: Path  # the dataset folder: it holds the lists
    images: Path  # the folder of the aligned JPEGs
    partition: Path  # list_eval_partition.txt or .csv
    attributes: Path  # list_attr_celeba.txt or .csv


def detect_layout(root: Path) -> Layout:
    """Find CelebA from the folder the user named; raise a one-line UserError naming what is missing and where."""
    root = Path(root).expanduser()
    if not root.exists():
        raise UserError(f"{root} does not exist; give celeba:PATH the folder that holds img_align_celeba")
    if not root.is_dir():
        raise UserError(f"{root} is a file; give celeba:PATH the folder that holds img_align_celeba")
    root = root.resolve()
    best: tuple[int, Path, list[str]] | None = None  # (pieces found, folder, what it lacks)
    near = _candidates(root)
    for folder in near + _subfolders(root):
        images = _image_dir(folder)
        for name, (partition, attributes) in LISTS.items():
            found = [(folder / partition).is_file(), (folder / attributes).is_file()]
            if images is not None and all(found):
                return Layout(name, folder, images, folder / partition, folder / attributes)
        # remember the most complete candidate for the error message, naming the list format it started on
        name = "kaggle" if any((folder / f).is_file() for f in LISTS["kaggle"]) else "original"
        partition, attributes = LISTS[name]
        missing = [] if images is not None else [f"{IMAGE_DIR}/ with .jpg files"]
        missing += [f for f in (partition, attributes) if not (folder / f).is_file()]
        if name == "original" and len(missing) == 3:
            missing[1:] = ["list_eval_partition.txt (or .csv)", "list_attr_celeba.txt (or .csv)"]
        score = 3 - len(missing)
        if best is None or score > best[0]:
            best = (score, folder, missing)
    assert best is not None
    _, folder, missing = best
    others = [str(f) for f in near if f != folder and f.is_dir()]
    if _subfolders(root):
        others.append(f"the folders inside {root}")
    also = f" (also looked in {', '.join(others)})" if others else ""
    raise UserError(f"no CelebA at {root}: {folder} lacks {', '.join(missing)}{also}; expected the original "
                    f"layout (celeba/{IMAGE_DIR}/*.jpg beside list_eval_partition.txt and list_attr_celeba.txt) "
                    f"or Kaggle's ({IMAGE_DIR}/{IMAGE_DIR}/*.jpg beside list_eval_partition.csv and "
                    f"list_attr_celeba.csv)")


def _candidates(root: Path) -> list[Path]:
    """Folders that may hold the lists: the one named, its celeba/ child, and the parents of an image folder."""
    folders = [root, root / "celeba"]
    if root.name == IMAGE_DIR:  # the image folder itself (or the outer one of the Kaggle layout)
        folders += [root.parent, root.parent.parent]
    unique: list[Path] = []
    for f in folders:
        if f not in unique:
            unique.append(f)
    return unique


def _subfolders(root: Path, limit: int = 100) -> list[Path]:
    """The sub-folders of the folder the user named (a dataset folder inside it, e.g. Kaggle's archive/)."""
    if root.name == IMAGE_DIR:
        return []  # the image folder itself: 200k files, no dataset inside
    with os.scandir(root) as entries:
        folders = sorted(Path(e.path) for e in entries if e.is_dir() and not e.name.startswith("."))
    return [f for f in folders[:limit] if f.name not in ("celeba", IMAGE_DIR)]


def _image_dir(folder: Path) -> Path | None:
    """The image folder of a dataset folder: img_align_celeba/img_align_celeba (Kaggle) or img_align_celeba."""
    for images in (folder / IMAGE_DIR / IMAGE_DIR, folder / IMAGE_DIR):
        if images.is_dir() and _has_jpeg(images):
            return images
    return None


def _has_jpeg(folder: Path) -> bool:
    """Whether a folder holds at least one .jpg file (stops at the first one)."""
    with os.scandir(folder) as entries:
        return any(e.name.lower().endswith((".jpg", ".jpeg")) for e in entries)


def _lines(path: Path) -> Iterator[str]:
    """A list file's non-empty lines, read lazily: any line ending (CRLF too), a byte-order mark or odd bytes."""
    with open(path, encoding="utf-8-sig", errors="replace", newline=None) as f:
        for line in f:
            if line.strip():
                yield line


def _split_row(line: str, csv: bool) -> list[str]:
    """One row's fields: comma-separated (CSV) or separated by one or more spaces (the .txt lists)."""
    return [f.strip() for f in line.split(",")] if csv else line.split()


def read_partition(path: Path) -> tuple[list[str], np.ndarray, dict[str, str]]:
    """list_eval_partition.txt/.csv -> (file names, int8 codes 0/1/2, {file: reason} of unusable lines)."""
    csv = path.suffix.lower() == ".csv"
    names: list[str] = []
    codes: list[int] = []
    bad: dict[str, str] = {}
    for number, line in enumerate(_lines(path), start=1):
        fields = _split_row(line, csv)
        if number == 1 and csv and fields[0].lower() == "image_id":
            continue  # the header row "image_id,partition"
        if len(fields) == 2 and fields[1] in ("0", "1", "2"):
            names.append(fields[0])
            codes.append(int(fields[1]))
        else:
            bad[fields[0] if fields else f"{path.name} line {number}"] = (
                f"bad list line: {path.name} has {line.strip()[:80]!r}, expected '<file> <0|1|2>'")
    if not names:
        raise UserError(f"{path} lists no images (expected lines '<file> <0|1|2>'); is it the partition list?")
    return names, np.array(codes, dtype=np.int8), bad


def read_attributes(path: Path) -> tuple[list[str], list[str], np.ndarray, dict[str, str]]:
    """list_attr_celeba.txt/.csv -> (attribute names, file names, int8 (R, A) of -1/1, {file: reason} of bad rows)."""
    csv = path.suffix.lower() == ".csv"
    lines = _lines(path)
    attribute_names, first_row = _attribute_header(path, lines, csv)
    count = len(attribute_names)
    files: list[str] = []

    def rows() -> Iterator[str]:
        """The table rows, streamed to numpy while their file names are collected (no list of lines is held); a row
        wider than the header, or a first row of another width, is refused (numpy would drop a column silently)."""
        for number, line in enumerate(lines, start=first_row):
            fields = _split_row(line, csv)
            _check_row_width(path, number, len(fields) - 1, count, first=not files)
            files.append(fields[0])
            yield line

    try:  # fast path: numpy parses the table in C; a malformed row sends it to the slow path
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "input contained no data": an empty table is reported below
            values = np.loadtxt(rows(), dtype=np.int8, delimiter="," if csv else None, usecols=range(1, count + 1),
                                ndmin=2, comments=None)  # int8 (R, A); a value beyond int8 goes the slow way too
        good = np.ones(len(files), dtype=bool)
    except ValueError:
        files, values, good = _attribute_rows(path, csv, count)
    if not files:
        raise UserError(f"{path} holds no attribute rows; it should hold '<file> <{count} values of 1 or -1>'")
    _check_unique(path, files, first_row)
    ok = good & ((values >= -1) & (values <= 1)).all(axis=1)  # bool (R,); int8 throughout, no int64 copies
    bad = {files[i]: f"bad list line: its row in {path.name} does not hold {count} values of 1 or -1"
           for i in np.flatnonzero(~ok)}
    # some copies use 0 for "absent"; stored as -1/1 either way
    table = np.where(values[ok] > 0, np.int8(1), np.int8(-1))  # int8 (R', A)
    return attribute_names, [f for f, keep in zip(files, ok) if keep], table, bad


def _check_row_width(path: Path, number: int, width: int, count: int, *, first: bool) -> None:
    """A row of `width` values under a header of `count` names: wider is refused (a column would be lost), and so is
    a first row of another width (header and table disagree); a later, shorter row is a damaged row, skipped."""
    if width > count or (first and width != count):
        raise UserError(f"{path.name} line {number}: {width} values under a header that names {count} attributes; "
                        f"the header and the rows must agree")


def _check_unique(path: Path, files: list[str], first_row: int) -> None:
    """Refuse an attribute list that gives one file two rows (which would be used is a guess)."""
    seen: dict[str, int] = {}
    for number, name in enumerate(files, start=first_row):
        if name in seen:
            raise UserError(f"{path.name} line {number}: {name[:80]} has a row already (line {seen[name]}); each "
                            f"image must have one row")
        seen[name] = number


def _attribute_header(path: Path, lines: Iterator[str], csv: bool) -> tuple[list[str], int]:
    """Read the attribute names from the start of `lines`: the .txt list's count line and names line, or the CSV
    header "image_id,..."; `lines` is left at the first row, whose line number is returned with the names (the
    count counts non-empty lines)."""
    first = next(lines, None)
    row = 2
    if first is not None and not csv and first.strip().isdigit():
        first = next(lines, None)  # the count line of the .txt list (the rows are what counts)
        row = 3
    if first is None:
        raise UserError(f"{path} is empty; it should hold the 40 CelebA attributes")
    header = _split_row(first, csv)
    names = header[1:] if csv or header[0].lower() == "image_id" else header
    if not names:
        raise UserError(f"{path} names no attributes on its header line; it should name the 40 CelebA attributes")
    return names, row


def _attribute_rows(path: Path, csv: bool, count: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Row-by-row parse of an attribute list: file names, values int8 (R, count), bool (R,) well-formed rows."""
    lines = _lines(path)
    _, first_row = _attribute_header(path, lines, csv)
    files: list[str] = []
    rows: list[list[int]] = []
    good: list[bool] = []
    for number, line in enumerate(lines, start=first_row):
        fields = _split_row(line, csv)
        _check_row_width(path, number, len(fields) - 1, count, first=not files)
        files.append(fields[0])
        try:
            values = [int(v) for v in fields[1:]]
        except ValueError:
            values = []
        ok = len(values) == count and all(v in (-1, 0, 1) for v in values)
        rows.append(values if ok else [0] * count)
        good.append(ok)
    return files, np.array(rows, dtype=np.int8).reshape(len(files), count), np.array(good, dtype=bool)


def _list_files(folder: Path) -> tuple[set[str], dict[str, str]]:
    """The regular files of the image folder (links to regular files included; pipes and devices never), and
    {name: target} of the links among them that lead out of the dataset's folder."""
    listing = scan_folder(str(folder), str(folder.parent.resolve()))
    return set(listing.files), listing.outside


def _links_outside(images: Path, names: list[str]) -> dict[str, str]:
    """{name: target} of the used image files that are links leading out of the dataset's folder."""
    used = set(names)
    return {n: target for n, target in _list_files(images)[1].items() if n in used}


def deck_test_count(count: int) -> int:
    """The deck's test share of `count` images: 60,780 / 202,599 of them, rounded half up (60,780 for all)."""
    return (2 * count * DECK_TEST + CELEBA_IMAGES) // (2 * CELEBA_IMAGES)


def select(layout: Layout) -> tuple[list[str], np.ndarray, list[str], np.ndarray, list[dict[str, str]]]:
    """The usable files in list order: (names, partition codes, attribute names, attributes (N, A), skipped)."""
    names, codes, bad_lines = read_partition(layout.partition)
    attribute_names, attr_files, table, bad_rows = read_attributes(layout.attributes)
    skipped = [{"file": f, "reason": reason} for f, reason in bad_lines.items()]
    row_of = {f: i for i, f in enumerate(attr_files)}
    present, _ = _list_files(layout.images)
    keep: list[int] = []
    seen: set[str] = set(bad_lines)  # files already accounted for
    missing = no_attributes = 0
    for i, name in enumerate(names):
        if name in seen:
            skipped.append({"file": name, "reason": f"listed twice: {layout.partition.name} lists it again"})
            continue
        seen.add(name)
        if name not in present:
            missing += 1
            skipped.append({"file": name, "reason": f"missing: listed in {layout.partition.name}, not in the "
                                                    f"image folder"})
        elif name not in row_of:
            no_attributes += 1
            skipped.append({"file": name, "reason": bad_rows.get(name, f"no attributes: no row in "
                                                                       f"{layout.attributes.name}")})
        else:
            keep.append(i)
    extra = sorted(f for f in present - seen if not f.startswith("."))
    skipped += [{"file": f, "reason": f"not listed: not in {layout.partition.name}"} for f in extra]
    if not keep:
        raise UserError(
            f"the CelebA lists contradict the images: of the {len(seen):,} files listed in {layout.partition.name}, "
            f"{missing:,} are not in {layout.images} (which holds {len(present):,} files, {len(extra):,} of them "
            f"unlisted) and {no_attributes:,} have no row in {layout.attributes.name}; "
            f"check that the lists and the images come from the same copy of CelebA")
    kept_names = [names[i] for i in keep]
    attributes = table[[row_of[n] for n in kept_names]]
    return kept_names, codes[keep], attribute_names, attributes, skipped


def cache_name(path: str, s: Settings) -> str:
    """The cache's directory name under the cache root: one per copy of CelebA and settings."""
    seed = f"-seed{s.seed}" if s.scheme == "deck" else ""  # the deck split is drawn from a seed
    return f"{path_tag('celeba', path)}-{s.size}-crop{s.crop}-{s.scheme}{seed}"


def identity(s: Settings) -> dict[str, Any]:
    """The manifest entries an existing cache must have to be this one: the split decides which images are test
    images, so a cache of another split is not this one."""
    return {"size": s.size, "crop": s.crop, "split": _scheme_entry(s)}


def _scheme_entry(s: Settings) -> dict[str, Any]:
    return {"scheme": s.scheme, "seed": s.seed} if s.scheme == "deck" else {"scheme": s.scheme}


def prepare(path: str | Path, out: Path, s: Settings, *, progress: bool) -> dict[str, Any]:
    """Decode CelebA once into a cache at `out`: crop, resize, split and attributes; return the manifest."""
    root, size, crop, split, seed = Path(path), s.size, s.crop, s.scheme, s.seed
    if split not in SPLITS:
        raise UserError(f"unknown CelebA split '{split}'; use official (train/valid/test) or deck (70/30)")
    if crop > WIDTH:
        raise UserError(f"--crop {crop} is wider than CelebA's aligned images ({WIDTH}x{HEIGHT}); use at most {WIDTH} "
                        f"(148, 140 and 128 are the usual choices)")
    layout = detect_layout(root)
    names, codes, attribute_names, attributes, skipped = select(layout)
    if progress:
        print(f"facevae: CelebA ({layout.name} layout) at {layout.root}: {len(names):,} images, center crop {crop}, "
              f"resize to {size}x{size}", file=sys.stderr)
    key = job_key(kind="celeba", images=str(layout.images), crop=crop, size=size, names=names)
    writer, kept, failed = decode_all(out, layout.images, names, crop=crop, size=size, progress=progress,
                                      attribute_names=attribute_names, key=key, what=str(layout.images),
                                      max_pixels=s.max_pixels)
    skipped += failed
    # splits and attributes of the images that were kept (failed decodes were dropped from the cache)
    if split == "official":
        to_split = np.array([SPLIT_NAMES.index(n) for n in PARTITION_SPLITS], dtype=np.int8)  # code -> split index
        writer.split_codes[:] = to_split[codes[kept]]
    else:
        writer.split_codes[:] = seeded_split(len(kept), deck_test_count(len(kept)), seed)
    assert writer.attributes is not None
    writer.attributes[:] = attributes[kept]
    manifest = writer.commit({
        "source": {"kind": "celeba", "path": str(layout.root), "layout": layout.name, "images": str(layout.images),
                   "lists": [layout.partition.name, layout.attributes.name]},
        "crop": crop,
        "resample": RESAMPLE_NAME,
        "split": _scheme_entry(s),
        "skipped": skipped,
        "links_outside": _links_outside(layout.images, names),
    })
    report_skipped(manifest, out)
    return manifest
