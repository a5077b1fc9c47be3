"""facevae's importance-weighted evaluation against the one-image-at-a-time loop of the popular toolkits.

Both compute -log P(x) of 8-bit images with K importance samples, on the deck's network (its Gaussian decoder, 64x64x3,
widths 32-512, latent 128) with random weights in eval mode and N random images:

- facevae: `evaluate(vae, images, iw_samples=K)`, the whole report (ELBO with its Monte Carlo error, the bound,
  PSNR, SSIM, active units) as `facevae evaluate` runs it: the run's precision (bf16 autocast where the CPU has it),
  channels_last, BatchNorm folded into the convolutions (`model.folded`), one encoder pass per image, the K samples
  decoded `eval_batch_size(device)` images at a time;
- the popular loop (pythae's `get_nll`): for each image, K / 100 mini-batches of the image repeated 100 times, each
  encoded again, sampled, decoded and scored in float32 (NCHW), one logsumexp per image. It scores with the same
  `log_prob_8bit`, so the two differ only in how they go through the network.

Timed in turns (facevae, loop, facevae, ...), best of `--repeats`, so that other load on the machine falls on both.
Also printed: facevae's decoder alone at batch 32 and 256 (the reason for the batch chosen on a CPU), and the
ceiling that sets on the speed-up: the loop's CPU time over the CPU time facevae's decoder alone needs for the N K
samples (timed on 8192 samples in the same turns as the two evaluations).
Both sides must decode every sample, so no evaluation can beat that ratio without a faster decoder.

    python benchmarks/evaluate.py [--images 64] [--iw-samples 1000] [--repeats 2] [--threads N]

Prints a table on stderr and one JSON object on the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

from facevae.config import Config
from facevae.device import autocast, eval_batch_size, resolve_precision
from facevae.distributions import standard_normal_log_prob
from facevae.evaluate import evaluate
from facevae.model import VAE, folded

LOOP_BATCH = 100  # pythae's get_nll default


@torch.no_grad()
def popular_loop(vae: VAE, images: torch.Tensor, samples: int) -> torch.Tensor:
    """-log P(x) per image (N,), one image at a time: K / 100 mini-batches of 100 copies, encoded every time."""
    nll = []
    for i in range(len(images)):
        x = images[i:i + 1].float() / 255  # (1, C, H, W)
        log_w = []
        for _ in range(max(1, samples // LOOP_BATCH)):
            x_rep = torch.cat(LOOP_BATCH * [x])  # (100, C, H, W)
            mean, logvar = vae.encoder(x_rep)
            std = torch.exp(0.5 * logvar)
            z = mean + std * torch.randn_like(std)
            log_q = -0.5 * (((z - mean) / std) ** 2 + logvar + math.log(2 * math.pi)).sum(-1)
            log_px_z = vae.decode(z).log_prob_8bit(x_rep)
            log_w.append(log_px_z + standard_normal_log_prob(z) - log_q)
        log_w = torch.cat(log_w)
        nll.append(-(torch.logsumexp(log_w, 0) - math.log(len(log_w))).item())
    return torch.tensor(nll)


DECODER_SAMPLES = 8192  # decoded alone, in turns with the two evaluations, for the ceiling


@torch.no_grad()
def decode_only(vae: VAE, samples: int, batch: int, precision: str) -> float:
    """Decode `samples` standard normal latents `batch` at a time as evaluation does, nothing else; returns 0."""
    with torch.inference_mode(), autocast(torch.device("cpu"), precision):
        for chunk in torch.randn(samples, vae.config.latent_dim).split(batch):
            vae.decoder(chunk)
    return 0.0


def decoder_rate(vae: VAE, batch: int, precision: str, total: int = 1024, repeats: int = 5) -> float:
    """Images per second of the decoder alone at this batch size (best of `repeats`)."""
    z = torch.randn(total, vae.config.latent_dim)
    best = math.inf
    with torch.inference_mode(), autocast(torch.device("cpu"), precision):
        vae.decoder(z[:batch])
        for _ in range(repeats):
            t0 = time.perf_counter()
            for chunk in z.split(batch):
                vae.decoder(chunk)
            best = min(best, time.perf_counter() - t0)
    return total / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--iw-samples", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each, taken in turns (best kept)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--precision", default=Config().precision, help="facevae's: auto, float32 or bf16")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config, device = Config(image_size=64, channels=3, likelihood="gaussian"), torch.device("cpu")
    precision = resolve_precision(args.precision, device)  # the run's choice, as evaluate_run makes it
    vae = VAE(config).eval()  # the popular loop's: float32, NCHW
    fast = VAE(config).eval()
    fast.load_state_dict(vae.state_dict())
    if config.channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    n, k = args.images, args.iw_samples
    images = torch.randint(0, 256, (n, config.channels, config.image_size, config.image_size), dtype=torch.uint8)
    runs = {"facevae": lambda: evaluate(fast, images, iw_samples=k, device=device, precision=precision)["nll_iw_nats"],
            "loop": lambda: popular_loop(vae, images, k).mean().item(),
            "decoder": lambda: decode_only(folded(fast), DECODER_SAMPLES, eval_batch_size(device), precision)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}  # CPU seconds of all threads: robust to other load
    results: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, run in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            results[name] = run()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    t_fast, t_loop = min(times["facevae"]), min(times["loop"])
    c_fast, c_loop = min(cpu["facevae"]), min(cpu["loop"])
    rates = {b: decoder_rate(folded(fast), b, precision) for b in (32, 256)}
    c_decoder = min(cpu["decoder"]) * n * k / DECODER_SAMPLES  # facevae's decoder alone on the N K samples
    ceiling = c_loop / c_decoder  # the loop's CPU time / that of the decoder alone
    result = {
        "benchmark": "evaluate", "device": "cpu", "precision": precision, "channels_last": config.channels_last,
        "threads": torch.get_num_threads(), "images": n, "iw_samples": k, "batch_size": eval_batch_size(device),
        "facevae_s": round(t_fast, 2), "loop_s": round(t_loop, 2), "speedup": round(t_loop / t_fast, 2),
        "facevae_cpu_s": round(c_fast, 2), "loop_cpu_s": round(c_loop, 2), "cpu_speedup": round(c_loop / c_fast, 2),
        "facevae_times_s": [round(t, 2) for t in times["facevae"]], "loop_times_s": [round(t, 2) for t in times["loop"]],
        "nll_iw_nats_facevae": round(results["facevae"], 2), "nll_iw_nats_loop": round(results["loop"], 2),
        "decoder_img_per_s": {str(b): round(r) for b, r in rates.items()}, "decoder_only_cpu_s": round(c_decoder, 2),
        "decoder_only_ceiling": round(ceiling, 2),
        "target": 10.0,
    }
    w = sys.stderr.write
    w(f"deck network {config.image_size}x{config.image_size}x{config.channels}, latent {config.latent_dim}, "
      f"{n} images x K={k}, {torch.get_num_threads()} CPU threads, best of {args.repeats} taken in turns\n")
    w(f"  facevae evaluate ({precision}, channels_last, batch {eval_batch_size(device)}): {t_fast:8.2f} s wall "
      f"{c_fast:8.2f} s CPU   -log P(x) {results['facevae']:.2f} nats/image\n")
    w(f"  one image at a time (float32, batches of {LOOP_BATCH}):     {t_loop:8.2f} s wall "
      f"{c_loop:8.2f} s CPU   -log P(x) {results['loop']:.2f} nats/image\n")
    w(f"  speed-up: {t_loop / t_fast:.2f}x wall, {c_loop / c_fast:.2f}x CPU time (target >= 10)\n")
    w(f"  facevae's decoder alone on the {n * k} samples (timed on {DECODER_SAMPLES} in the same turns): "
      f"{c_decoder:.2f} s CPU; the loop's CPU time over it: {ceiling:.2f}x, the ceiling of any speed-up\n")
    w(f"  decoder alone: {rates[32]:.0f} img/s at batch 32, {rates[256]:.0f} img/s at batch 256\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
