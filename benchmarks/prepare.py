"""Benchmark `facevae prepare` on CelebA-sized JPEGs beside a plain one-process Pillow loop.

Generates COUNT 178x218 JPEGs (random crops of scikit-image's bundled photographs, so that they decode like
photographs, not like flat colours) in CelebA's original layout inside a temporary directory, then measures, each in a
fresh process so that peak memory is its own:
  - facevae: the celeba source's prepare (list parsing, parallel decode into the memory-mapped cache, commit);
  - plain:   for each file: Image.open, convert("RGB"), crop(148), resize(64, bilinear), append to a list; np.stack.
It prints images per second (and per decoding core, and per CPU-second: the figure that does not depend on what
else the machine is running), peak resident memory of the process and of its children, how
peak memory grows from COUNT/2 to COUNT images, the speed ratio, and the mean absolute difference (grey levels) of
reduced-scale JPEG decoding (Image.draft) against full-resolution decoding.

    python benchmarks/prepare.py [--count 2000] [--size 64] [--crop 148] [--scale 202599]

--scale N also prepares a CelebA-sized copy: N file names, symbolic links to the COUNT distinct JPEGs (decoding is
real, only the disk reads are cached), to time the full 202,599 images and check that memory does not grow.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

WIDTH, HEIGHT = 178, 218


def make_jpegs(folder: Path, count: int, seed: int = 0) -> list[str]:
    """Write `count` CelebA-sized JPEGs and CelebA's two .txt lists (original layout); return the file names."""
    import skimage.data as data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.immunohistochemistry(),
              np.stack([data.camera()] * 3, -1)]
    rng = np.random.default_rng(seed)
    images = folder / "celeba" / "img_align_celeba"
    images.mkdir(parents=True)
    names = [f"{i:06d}.jpg" for i in range(1, count + 1)]
    for i, name in enumerate(names):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        crop_h = int(min(h, w * HEIGHT / WIDTH) * rng.uniform(0.45, 1.0))
        crop_w = int(crop_h * WIDTH / HEIGHT)
        y, x = rng.integers(0, h - crop_h + 1), rng.integers(0, w - crop_w + 1)
        face = Image.fromarray(photo[y:y + crop_h, x:x + crop_w]).resize((WIDTH, HEIGHT), Image.Resampling.LANCZOS)
        face.save(images / name, quality=90)
    write_lists(folder / "celeba", names)
    return names


def write_lists(dataset: Path, names: list[str]) -> None:
    """CelebA's two .txt lists for `names`, in the exact formats (count line, names line, padded rows)."""
    (dataset / "list_eval_partition.txt").write_text("".join(f"{n} {i % 3}\n" for i, n in enumerate(names)))
    header = [str(len(names)), " ".join(f"Attribute_{k}" for k in range(40)) + " "]
    rows = [n + " " + " ".join(" 1" if (i + k) % 3 else "-1" for k in range(40)) for i, n in enumerate(names)]
    (dataset / "list_attr_celeba.txt").write_text("\n".join(header + rows) + "\n")


def linked_copy(folder: Path, count: int, total: int, name: str) -> Path:
    """A dataset folder of `total` images, links to the first `count` (cycled) of `folder`'s, with its lists."""
    sub = folder / name
    images = sub / "celeba" / "img_align_celeba"
    images.mkdir(parents=True)
    names = [f"{i:06d}.jpg" for i in range(1, total + 1)]
    for i, n in enumerate(names):
        (images / n).symlink_to(folder / "celeba" / "img_align_celeba" / f"{i % count + 1:06d}.jpg")
    write_lists(sub / "celeba", names)
    return sub


def plain_loop(folder: Path, names: list[str], size: int, crop: int) -> np.ndarray:
    """The usual way: one process, decode at full resolution, keep every image in a Python list."""
    images = []
    for name in names:
        with Image.open(folder / "celeba" / "img_align_celeba" / name) as im:
            im = im.convert("RGB")
            w, h = im.size
            left, top = (w - crop) // 2, (h - crop) // 2
            square = im.crop((left, top, left + crop, top + crop)).resize((size, size), Image.Resampling.BILINEAR)
            images.append(np.asarray(square).transpose(2, 0, 1))
    return np.stack(images)


def child(method: str, folder: Path, count: int, size: int, crop: int) -> None:
    """Run one method on the first `count` images in this process; print seconds and peak memory as JSON."""
    names = [f"{i:06d}.jpg" for i in range(1, count + 1)]
    if method == "facevae":
        from facevae.data import celeba
        from facevae.data.cache import Settings
        from facevae.data.decode import worker_count

        workers = worker_count()
        if count < len(list((folder / "celeba" / "img_align_celeba").iterdir())):
            folder = linked_copy(folder, count, count, f"first-{count}")
        cpu, start = cpu_seconds(), time.perf_counter()
        manifest = celeba.prepare(folder, folder / f"cache-{count}", Settings(size=size, crop=crop), progress=False)
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
        assert manifest["images"] == count and not manifest["skipped"], manifest["skipped"][:3]
    else:
        workers = 1
        cpu, start = cpu_seconds(), time.perf_counter()
        images = plain_loop(folder, names, size, crop)
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
        assert images.shape == (count, 3, size, size)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "workers": workers, "peak_mib": own,
                      "children_peak_mib": children}))


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children: what the work cost, whatever else runs."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(method: str, folder: Path, count: int, size: int, crop: int) -> dict:
    """Run `child` in a fresh interpreter and return what it printed."""
    done = subprocess.run([sys.executable, __file__, "--child", method, str(folder), "--count", str(count),
                           "--size", str(size), "--crop", str(crop)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def describe(label: str, count: int, whole: dict, half_count: int, half: dict) -> str:
    """One line: speed (wall, per core, per CPU-second) and peak memory, with its growth from half_count images."""
    rate = count / whole["seconds"]
    peak = max(whole["peak_mib"], whole["children_peak_mib"])
    grow = (peak - max(half["peak_mib"], half["children_peak_mib"])) / (count - half_count) * 1000
    return (f"{label:18s}: {rate:6.0f} images/s with {whole['workers']} process(es) = {rate / whole['workers']:5.0f} "
            f"per core ({count / whole['cpu_seconds']:.0f} per CPU-second); peak memory {whole['peak_mib']:.0f} MiB, "
            f"children {whole['children_peak_mib']:.0f} MiB; growth {grow:+.2f} MiB per 1,000 images "
            f"(x 202.6 = {grow * 202.599:+.0f} MiB for all of CelebA)")


def draft_error(folder: Path, names: list[str], size: int, crop: int) -> dict[str, float]:
    """Mean absolute difference (grey levels) of facevae's decode and of a forced draft decode vs full resolution."""
    from facevae.data.decode import draft_factor, load_square

    paths = [str(folder / "celeba" / "img_align_celeba" / n) for n in names[:300]]
    full = np.stack([load_square(p, crop=crop, size=size, draft=False) for p in paths]).astype(np.float64)
    used = np.stack([load_square(p, crop=crop, size=size) for p in paths]).astype(np.float64)
    forced = []  # what decoding at 1/2 scale would give here (crop 148 -> 74 px -> 64), allowed or not
    box = ((WIDTH - crop) / 4, (HEIGHT - crop) / 4, (WIDTH + crop) / 4, (HEIGHT + crop) / 4)
    for p in paths:
        with Image.open(p) as im:
            im.draft("RGB", (WIDTH // 2, HEIGHT // 2))
            square = im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR, box=box)
            forced.append(np.asarray(square).transpose(2, 0, 1))
    small = size // 2  # a smaller output, where facevae does decode at reduced scale
    full_small = np.stack([load_square(p, crop=crop, size=small, draft=False) for p in paths]).astype(np.float64)
    draft_small = np.stack([load_square(p, crop=crop, size=small) for p in paths]).astype(np.float64)
    return {"factor_used": draft_factor(crop, size), "used": float(np.abs(used - full).mean()),
            "forced_half": float(np.abs(np.stack(forced) - full).mean()),
            "small_size": small, "small_factor": draft_factor(crop, small),
            "small": float(np.abs(draft_small - full_small).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--crop", type=int, default=148)
    parser.add_argument("--scale", type=int, default=0, help="also prepare this many images (links), e.g. 202599")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), args.count, args.size, args.crop)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        names = make_jpegs(folder, args.count)
        kib = sum(f.stat().st_size for f in (folder / "celeba" / "img_align_celeba").iterdir()) / args.count / 1024
        print(f"{args.count} JPEGs of {WIDTH}x{HEIGHT} ({kib:.1f} KiB each) made in "
              f"{time.perf_counter() - start:.1f} s; crop {args.crop}, resize to {args.size}; {os.cpu_count()} cores")
        results = {}
        for method, label in (("plain", "plain Pillow loop"), ("facevae", "facevae prepare")):
            half = measure(method, folder, args.count // 2, args.size, args.crop)
            results[method] = whole = measure(method, folder, args.count, args.size, args.crop)
            print(describe(label, args.count, whole, args.count // 2, half))
        plain, ours = results["plain"], results["facevae"]
        print(f"speed ratio facevae / plain: {plain['seconds'] / ours['seconds']:.2f}x in wall time "
              f"({ours['workers']} processes against 1), {plain['cpu_seconds'] / ours['cpu_seconds']:.2f}x per "
              f"CPU-second")
        if args.scale:
            half_folder = linked_copy(folder, args.count, args.scale // 2, "half")
            half = measure("facevae", half_folder, args.scale // 2, args.size, args.crop)
            whole = measure("facevae", linked_copy(folder, args.count, args.scale, "scale"), args.scale, args.size,
                            args.crop)
            print(describe("facevae, full scale", args.scale, whole, args.scale // 2, half) +
                  f"; {whole['seconds']:.1f} s in all; cache {args.scale * 3 * args.size ** 2 / 2 ** 20:.0f} MiB")
        err = draft_error(folder, names, args.size, args.crop)
        print(f"reduced-scale JPEG decoding vs full resolution (mean abs difference, grey levels, 300 images): "
              f"at {args.size} px facevae uses factor {err['factor_used']} -> {err['used']:.3f}; a forced 1/2-scale "
              f"draft would give {err['forced_half']:.3f}; at {err['small_size']} px facevae uses factor "
              f"{err['small_factor']} -> {err['small']:.3f}")


if __name__ == "__main__":
    main()
