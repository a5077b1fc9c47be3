"""Importance-weighted evaluation against the decoder passes it needs: time of `evaluate(K)` / time of K decoder passes.

The deck's default network (Config(): 64x64x3, widths 32-512, latent 128) with random weights in eval mode, N random
images, K importance samples, decoded `batch` at a time in both cases. The target is a ratio of at most 1.5: the
bound costs what its K decoder passes cost, plus the ELBO pass, the metrics and the encoder.

    python benchmarks/evaluate.py [--images 64] [--iw-samples 64] [--batch-size 256] [--repeats 3] [--precision P]

Prints a table on stderr and one JSON object on the last line of stdout.

On the CPU, glibc's malloc hands large activation buffers back to the kernel after each batch, and the page faults
of mapping them again can cost as much as the convolutions (see the kernel share printed): wall times then vary with
the allocator's state. MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 (or jemalloc/tcmalloc)
keeps them mapped; batches whose activations stay under 32 MB (about 32 images in bf16) avoid the faults too.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time

import torch

from facevae.config import Config
from facevae.device import autocast, resolve_precision
from facevae.evaluate import evaluate
from facevae.model import VAE
from facevae.metrics import iw_log_likelihood


def best_times(fns: dict, repeats: int) -> dict[str, tuple[float, float, float]]:
    """The fastest wall-clock and CPU (all threads) seconds of `repeats` calls of each function, taken in turns so
    that other load on the machine falls on all of them alike, and the share of the CPU time spent in the kernel
    (page faults of freshly mapped buffers, mostly)."""
    times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            fn()
            t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            user, system = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
            times[name].append((t1 - t0, user + system, system / max(user + system, 1e-9)))
    return {name: (min(w for w, _, _ in t), min(c for _, c, _ in t), sum(s for _, _, s in t) / len(t))
            for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--iw-samples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="timed calls of each, taken in turns (best kept)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--precision", default=Config().precision, help="auto, float32 or bf16 (default: the config's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = Config()
    device = torch.device("cpu")
    precision = resolve_precision(args.precision, device)  # the run's choice, as evaluate_run makes it
    vae = VAE(config).eval()
    if config.channels_last:
        vae = vae.to(memory_format=torch.channels_last)
    n, k, batch = args.images, args.iw_samples, args.batch_size
    images = torch.randint(0, 256, (n, config.channels, config.image_size, config.image_size), dtype=torch.uint8)
    z = torch.randn(n * k, config.latent_dim)  # the latents of K decoder passes over the N images

    @torch.inference_mode()
    def decoder_passes() -> None:  # K plain decoder forward passes over the N images, `batch` latents at a time
        with autocast(device, precision):
            for chunk in z.split(batch):
                vae.decoder(chunk)

    @torch.inference_mode()
    def bound_only() -> None:  # metrics.iw_log_likelihood as evaluate calls it: group * chunk <= batch
        x = images.float() / 255
        group, chunk = max(1, batch // k), min(k, batch)
        with autocast(device, precision):
            for i in range(0, n, group):
                iw_log_likelihood(vae, x[i:i + group], k, chunk=chunk)

    def full_evaluation() -> None:  # the whole report: ELBO pass, bound, PSNR, SSIM, active units
        evaluate(vae, images, iw_samples=k, batch_size=batch, device=device, precision=precision)

    with torch.inference_mode(), autocast(device, precision):  # warm-up: one batch through decoder and encoder
        vae.decode(z[:batch])
        vae.encode(images[:batch].float() / 255)
    best = best_times({"decoder": decoder_passes, "bound": bound_only, "evaluate": full_evaluation}, args.repeats)
    (t_dec, c_dec, s_dec), (t_iw, c_iw, _), (t_eval, c_eval, s_eval) = best["decoder"], best["bound"], best["evaluate"]
    result = {
        "benchmark": "evaluate", "device": "cpu", "precision": precision, "channels_last": config.channels_last,
        "threads": torch.get_num_threads(), "images": n, "iw_samples": k,
        "batch_size": batch, "decoded_images": n * k, "decoder_passes_s": round(t_dec, 3),
        "iw_bound_s": round(t_iw, 3), "evaluate_s": round(t_eval, 3),
        "ratio_iw_bound": round(t_iw / t_dec, 3), "ratio_evaluate": round(t_eval / t_dec, 3),
        "cpu_ratio_iw_bound": round(c_iw / c_dec, 3), "cpu_ratio_evaluate": round(c_eval / c_dec, 3),
        "kernel_share_decoder": round(s_dec, 3), "kernel_share_evaluate": round(s_eval, 3),
        "target": 1.5, "ok": t_eval / t_dec <= 1.5,
    }
    w = sys.stderr.write
    w(f"deck network {config.image_size}x{config.image_size}x{config.channels}, latent {config.latent_dim}, "
      f"{precision}{', channels_last' if config.channels_last else ''}, "
      f"{n} images x K={k}, batch {batch}, {torch.get_num_threads()} CPU threads, "
      f"best of {args.repeats} taken in turns\n")
    w(f"  {'':38s} {'wall s':>8s} {'ratio':>6s}   {'CPU s':>8s} {'ratio':>6s}\n")
    w(f"  {f'K decoder passes ({n * k} images)':38s} {t_dec:8.3f} {1:6.3f}   {c_dec:8.3f} {1:6.3f}\n")
    w(f"  {'iw_log_likelihood (the bound alone)':38s} {t_iw:8.3f} {t_iw / t_dec:6.3f}   {c_iw:8.3f} "
      f"{c_iw / c_dec:6.3f}\n")
    w(f"  {'evaluate (the whole report)':38s} {t_eval:8.3f} {t_eval / t_dec:6.3f}   {c_eval:8.3f} "
      f"{c_eval / c_dec:6.3f}   (target: wall ratio <= 1.5)\n")
    w(f"  kernel (system) share of the CPU time: decoder {s_dec:.0%}, evaluate {s_eval:.0%}\n")
    print(json.dumps(result))
    assert math.isfinite(t_eval)


if __name__ == "__main__":
    main()
