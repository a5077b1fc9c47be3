"""Training throughput: facevae's loop beside the popular repository's way, and beside the barest loop.

facevae:   the uint8 cache in memory (on the GPU when there is one), batches by index, uint8 -> float on the device,
           channels_last, the config's precision (`auto`: bf16 where the device has it), no host sync per step; every
           step guarded (finite check, skipped update, buffer restore) and its figures summed on the device.
reference: a PyTorch DataLoader with 4 workers that opens, decodes, center-crops (148) and resizes (64) a 178x218
           CelebA-sized JPEG per item every epoch, float32, default (contiguous) memory format.
bare:      the same network, batch, precision, memory format and (fused) Adam as facevae, on batches already float on
           the device: forward, backward, step; no checks, no tallies, no logging. facevae / bare is the cost of
           facevae's loop itself. The two alternate, ROUNDS times each, and the best of each counts (the machine may
           be shared: the best run is the least disturbed one).

All train the deck's 64x64 network (facevae.model.VAE, the deck's 64x64x3 Gaussian) with Adam on generated images; the
reference's JPEG decoding is its steady state, facevae's one-time `prepare` is not counted. The last line printed is
one JSON object: facevae_img_s, reference_img_s, ratio, bare_img_s, facevae_over_bare, device, batch_size.

    python benchmarks/train_throughput.py [--steps 30] [--batch-size 64] [--device auto] [--rounds 3]
    python benchmarks/train_throughput.py --bare-only     # only facevae against the bare loop
    python benchmarks/train_throughput.py --full-cache    # also: peak memory on a 202,599-image cache
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from facevae.config import Config
from facevae.data.cache import SPLIT_NAMES, CacheWriter
from facevae.device import autocast, resolve_device, resolve_precision
from facevae.model import VAE
from facevae.train import train


def smooth_images(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """n face-sized RGB images (n, H, W, 3) uint8: smooth colour fields plus noise, so JPEG sizes are realistic."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.empty((n, height, width, 3), np.uint8)
    for i in range(n):
        a, b, c = rng.uniform(0.01, 0.05, 3)
        base = 128 + 80 * np.sin(a * xx + b * yy + c * i)[..., None] * rng.uniform(0.5, 1, 3)
        out[i] = np.clip(base + rng.normal(0, 12, (height, width, 3)), 0, 255)
    return out


def write_cache(path: Path, images: np.ndarray) -> Path:
    """A facevae cache of (N, H, W, 3) images, all in the train split."""
    n, h, _, _ = images.shape
    writer = CacheWriter(path, count=n, channels=3, size=h)
    writer.images[:] = images.transpose(0, 3, 1, 2)
    writer.split_codes[:] = SPLIT_NAMES.index("train")
    writer.commit({"source": {"kind": "generated", "path": "", "layout": "benchmark"}, "crop": None,
                   "split": {"scheme": "all-train", "seed": 0}, "skipped": []})
    return path


class JpegFaces(Dataset):
    """What the popular repository does per item: open a JPEG, decode, crop 148, resize 64, to float."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = Image.open(self.paths[i]).convert("RGB")
        left, top = (img.width - 148) // 2, (img.height - 148) // 2
        img = img.crop((left, top, left + 148, top + 148)).resize((64, 64), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div(255)


def reference_loop(paths: list[Path], batch_size: int, steps: int, device: torch.device, warmup: int = 3) -> float:
    """Images per second of a plain float32 NCHW loop fed by a 4-worker JPEG DataLoader."""
    torch.manual_seed(0)
    config = Config(image_size=64, channels=3, likelihood="gaussian", channels_last=False).validate()
    vae = VAE(config).to(device).train()
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    loader = DataLoader(JpegFaces(paths), batch_size=batch_size, shuffle=True, num_workers=4, drop_last=True,
                        pin_memory=device.type == "cuda", persistent_workers=True)
    done, t0 = 0, None
    while done < steps + warmup:
        for x in loader:
            if done == warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            x = x.to(device, non_blocking=True)
            loss = vae(x).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps + warmup:
                break
    loss.item()  # wait for the last step
    return steps * batch_size / (time.perf_counter() - t0)


def facevae_loop(cache: Path, run_dir: Path, batch_size: int, device: str, precision: str) -> tuple[float, str]:
    """facevae's own training loop: two epochs over the cache, the second one (warm) timed by the loop itself."""
    config = Config(data=str(cache), image_size=64, channels=3, likelihood="gaussian", batch_size=batch_size,
                    epochs=2, device=device, precision=precision, log_every=10_000, image_every=2,
                    image_count=8).validate()
    train(config, run_dir, progress=False)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epoch2 = [r for r in records if r["kind"] == "epoch"][-1]
    return epoch2["img_per_s"], resolve_precision(precision, resolve_device(device))


def bare_loop(images: np.ndarray, batch_size: int, device: torch.device, precision: str, warmup: int = 3) -> float:
    """Images per second of the barest loop of facevae's network, batch, precision, memory format and fused Adam:
    the batches (N, 3, 64, 64) are already float on the device; forward, backward, step, nothing else."""
    torch.manual_seed(0)
    config = Config(image_size=64, channels=3, likelihood="gaussian", batch_size=batch_size).validate()
    vae = VAE(config).to(device).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.Adam(vae.parameters(), lr=config.learning_rate, fused=True)
    x_all = torch.from_numpy(images).to(device).float().div(255).contiguous(memory_format=torch.channels_last)
    steps = len(images) // batch_size
    eps = torch.randn(steps, batch_size, config.latent_dim, device=device)
    batches = [x_all[i * batch_size:(i + 1) * batch_size] for i in range(steps)]
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with autocast(device, precision):
            loss = vae(batches[i % steps], eps=eps[i % steps]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    loss.item()  # wait for the last step
    return steps * batch_size / (time.perf_counter() - t0)


def against_bare(cache: Path, images: np.ndarray, tmp: Path, args: argparse.Namespace) -> dict:
    """facevae's loop and the bare loop, alternating, `args.rounds` times each; the best of each and their ratio."""
    device = resolve_device(args.device)
    ours, bare = [], []
    for r in range(args.rounds):
        img_s, precision = facevae_loop(cache, tmp / f"run-bare-{r}", args.batch_size, args.device, args.precision)
        ours.append(img_s)
        bare.append(bare_loop(images, args.batch_size, device, precision))
        print(f"round {r + 1}: facevae {ours[-1]:7.1f} img/s, bare loop {bare[-1]:7.1f} img/s", flush=True)
    print(f"facevae / bare loop: {max(ours) / max(bare):.3f} (best of {args.rounds} each: {max(ours):.1f} against "
          f"{max(bare):.1f} img/s, {precision}, batch {args.batch_size})", flush=True)
    return {"facevae_best_img_s": round(max(ours), 1), "bare_img_s": round(max(bare), 1),
            "facevae_over_bare": round(max(ours) / max(bare), 4), "rounds": args.rounds}


def full_cache_memory(tmp: Path, steps: int, batch_size: int) -> dict:
    """Peak resident memory of training on a CelebA-sized cache (202,599 random 64x64 images), in a subprocess."""
    n = 202_599
    path = tmp / "celeba-sized"
    writer = CacheWriter(path, count=n, channels=3, size=64)
    rng = np.random.default_rng(0)
    for start in range(0, n, 10_000):  # streamed, so this process stays small too
        stop = min(n, start + 10_000)
        writer.images[start:stop] = rng.integers(0, 256, (stop - start, 3, 64, 64), dtype=np.uint8)
    writer.split_codes[:] = SPLIT_NAMES.index("train")
    writer.split_codes[-19_962:] = SPLIT_NAMES.index("test")
    writer.commit({"source": {"kind": "generated"}, "crop": None, "split": {"scheme": "official-sized"},
                   "skipped": []})
    cache_bytes = n * 3 * 64 * 64
    # The child reports its own high-water mark (VmHWM, reset at exec): ru_maxrss of a child would also count the
    # pages it shared with this process between fork and exec (this process has just written the whole cache).
    argv = ["train", "--out", str(tmp / "run-full"), "--quiet", "--data", str(path), "--set", f"max_steps={steps}",
            "--set", f"batch_size={batch_size}"]
    code = ("import sys; from facevae.cli import main; rc = main(sys.argv[1:]); "
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
            "print('VmHWM_KiB', hwm); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, *argv], check=True, capture_output=True, text=True).stdout
    peak = int(out.split("VmHWM_KiB")[1].split()[0]) * 1024
    return {"cache_bytes": cache_bytes, "peak_rss_bytes": peak, "peak_over_cache": peak / cache_bytes,
            "steps": steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps of each loop")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", help="facevae's precision (the reference is always float32)")
    p.add_argument("--full-cache", action="store_true", help="also measure peak memory on a 202,599-image cache")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of facevae and the bare loop")
    p.add_argument("--bare-only", action="store_true", help="only facevae against the bare loop (no JPEG reference)")
    args = p.parse_args()
    device = resolve_device(args.device)
    n = args.steps * args.batch_size
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        raw = smooth_images(n, 218, 178)
        jpeg_dir = tmp / "jpegs"
        jpeg_dir.mkdir()
        paths = []
        for i, img in enumerate(raw):
            paths.append(jpeg_dir / f"{i + 1:06d}.jpg")
            Image.fromarray(img).save(paths[-1], quality=95)
        faces64 = np.stack([np.asarray(Image.fromarray(img[35:183, 15:163]).resize((64, 64), Image.Resampling.BILINEAR))
                            for img in raw])
        cache = write_cache(tmp / "cache", faces64)
        bare = against_bare(cache, faces64.transpose(0, 3, 1, 2), tmp, args)
        if args.bare_only:
            print(json.dumps({**bare, "device": str(device), "batch_size": args.batch_size}))
            return
        ours, precision = facevae_loop(cache, tmp / "run", args.batch_size, args.device, args.precision)
        print(f"facevae:   {ours:8.1f} img/s  (uint8 cache in memory, channels_last, {precision})", flush=True)
        ref = reference_loop(paths, args.batch_size, args.steps, device)
        print(f"reference: {ref:8.1f} img/s  (DataLoader, 4 workers, JPEG decode per item, float32, NCHW)", flush=True)
        print(f"ratio:     {ours / ref:8.2f}x  on {device} ({torch.get_num_threads()} threads), batch {args.batch_size}")
        result = {"facevae_img_s": round(ours, 1), "reference_img_s": round(ref, 1), "ratio": round(ours / ref, 3),
                  "device": str(device), "batch_size": args.batch_size, "precision": precision, **bare}
        if args.full_cache:
            mem = full_cache_memory(tmp, steps=200, batch_size=args.batch_size)
            print(f"full CelebA-sized cache: {mem['cache_bytes'] / 2**30:.2f} GiB; peak RSS of {mem['steps']} training "
                  f"steps {mem['peak_rss_bytes'] / 2**30:.2f} GiB ({mem['peak_over_cache']:.2f}x the cache; the cache "
                  f"is memory-mapped, so its pages count only as batches touch them)")
            result.update(mem)
        print(json.dumps(result))


if __name__ == "__main__":
    main()
