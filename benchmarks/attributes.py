"""Attribute vectors at CelebA scale, beside the bare encoder pass at evaluation speed, in one process.

Writes a cache the size of CelebA's official split (162,770 train, 19,867 valid, 19,962 test images, 64x64, 40
attributes of -1/1; random pixels and labels: encoding costs the same whatever the pixels) and a run of the deck's
network (Config defaults; its weights untrained: encoding costs the same whatever the weights). Then times:

  bare:     vae.encode over the training and test splits in batches of --batch-size, on the run's device and
            precision (bf16 autocast where the device has it), channels_last, posterior means kept; nothing else
  facevae:  facevae.attributes.compute_attribute_vectors, what `facevae attributes RUN` runs: the same two passes,
            the per-dimension KL, 40 plain and 40 balanced vectors, their thresholds and test ROC AUCs, both files

The ratio facevae / bare is the cost of everything but the encoder (the goal: about 1). The last line printed is one
JSON object.

    python benchmarks/attributes.py [--batch-size 256] [--scale 1.0]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from facevae.attributes import compute_attribute_vectors
from facevae.checkpoint import MODEL_FILE, save_model
from facevae.config import Config
from facevae.data import checked_cache, split_view
from facevae.data.cache import SPLIT_NAMES, CacheWriter
from facevae.device import autocast, setup
from facevae.model import VAE
from facevae.pixels import to_float
from facevae.run import load_run

CELEBA_SPLITS = {"train": 162_770, "valid": 19_867, "test": 19_962}  # the official partition
ATTRIBUTES = 40


def write_cache(path: Path, scale: float) -> Path:
    """A CelebA-sized cache of random 64x64 images with random attributes, written in chunks (memory stays flat)."""
    counts = {k: max(1, round(v * scale)) for k, v in CELEBA_SPLITS.items()}
    n = sum(counts.values())
    writer = CacheWriter(path, count=n, channels=3, size=64, attribute_names=[f"A{i}" for i in range(ATTRIBUTES - 1)]
                         + ["Male"])
    rng = np.random.default_rng(0)
    for start in range(0, n, 8192):
        stop = min(n, start + 8192)
        writer.images[start:stop] = rng.integers(0, 256, (stop - start, 3, 64, 64), dtype=np.uint8)
    writer.attributes[:] = rng.choice(np.array([-1, 1], dtype=np.int8), size=(n, ATTRIBUTES))
    codes = np.repeat([SPLIT_NAMES.index(k) for k in CELEBA_SPLITS], list(counts.values()))
    writer.split_codes[:] = codes
    writer.commit({"source": {"kind": "generated", "path": "", "layout": "benchmark"}, "crop": None,
                   "split": {"scheme": "official-sized"}, "skipped": []})
    return path


@torch.inference_mode()
def bare_pass(vae: VAE, config: Config, batch_size: int, *, limit: int | None = None) -> tuple[float, int]:
    """Seconds for the plain encoder over the train and test splits (their first `limit` images); and the count."""
    dev, precision = setup(config)
    vae = vae.to(dev).to(memory_format=torch.channels_last)
    cache = checked_cache(config, progress=False)
    t0 = time.perf_counter()
    count = 0
    for split in ("train", "test"):
        view = split_view(cache, split)
        view = view.head(limit) if limit else view
        means = []
        for start in range(0, len(view), batch_size):
            x = to_float(view[start:start + batch_size], dev)  # (B, 3, 64, 64) uint8 -> float in [0, 1]
            with autocast(dev, precision):
                means.append(vae.encode(x).mean)
        torch.cat(means).cpu()
        count += len(view)
    return time.perf_counter() - t0, count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=256, help="images per encoder call (the evaluation batch)")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of CelebA's size (1: 162,770 train images)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        cache = write_cache(tmp / "cache", args.scale)
        print(f"wrote the cache in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        config = Config(data=str(cache), image_size=64, channels=3, eval_batch_size=args.batch_size).validate()
        run = tmp / "run"
        run.mkdir()
        torch.manual_seed(0)
        save_model(VAE(config).eval(), run / MODEL_FILE)
        vae = load_run(run)
        bare_pass(vae, config, args.batch_size, limit=2 * args.batch_size)  # warm-up: kernels chosen, pages read
        bare_s, images = bare_pass(vae, config, args.batch_size)
        print(f"bare encoder: {images:,} images in {bare_s:.1f} s, {images / bare_s:,.0f} img/s", flush=True)
        t0 = time.perf_counter()
        compute_attribute_vectors(run, batch_size=args.batch_size)
        ours_s = time.perf_counter() - t0
        print(f"facevae attributes: {ours_s:.1f} s, {images / ours_s:,.0f} img/s; ratio {ours_s / bare_s:.3f} "
              f"({torch.get_num_threads()} threads, {setup(config)[0]}, {setup(config)[1]})", flush=True)
        print(json.dumps({"train_images": int(round(CELEBA_SPLITS['train'] * args.scale)), "images_encoded": images,
                          "bare_s": round(bare_s, 2), "attributes_s": round(ours_s, 2),
                          "ratio": round(ours_s / bare_s, 3), "batch_size": args.batch_size,
                          "device": str(setup(config)[0]), "precision": setup(config)[1],
                          "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
