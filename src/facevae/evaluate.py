"""The metrics report: ELBO terms, the importance-weighted likelihood, bits/dim, PSNR, SSIM, MSE, active units, FID.

Every likelihood figure states its unit and sign (shared/DESIGN.md, "CONTRACT: numbers").
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from facevae.device import autocast, setup, to_unit_float
from facevae.errors import UserError
from facevae.model import VAE
from facevae.objectives import bits_per_dim, iw_log_likelihood, psnr

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al.: unit u is active when Var_x(E_q[z_u | x]) > 0.01


@torch.inference_mode()
def evaluate(vae: VAE, images: torch.Tensor, *, iw_samples: int = 1, batch_size: int = 256,
             device: torch.device | str = "cpu", precision: str = "float32", progress: bool = False) -> dict[str, Any]:
    """Evaluate `vae` (in eval mode) on uint8 images (N, C, H, W); return the report's numbers.

    Runs in inference mode under the given device and precision (autocast for the network; every likelihood and KL
    sum in float32). No call decodes more than `batch_size` images at once, whatever `iw_samples` is: the bound
    takes `group` images times `chunk` samples per decoder call, group * chunk <= batch_size.
    """
    if iw_samples < 1 or batch_size < 1:
        raise ValueError(f"iw_samples and batch_size must be at least 1, got {iw_samples} and {batch_size}")
    device = torch.device(device)
    vae.eval()
    n = len(images)
    dims = images[0].numel()
    latent_dim = vae.config.latent_dim
    beta = vae.config.kl_weight
    chunk = min(iw_samples, batch_size)  # samples per image per decoder call
    group = max(1, batch_size // iw_samples)  # images per decoder call of the bound
    per_image: dict[str, list[torch.Tensor]] = {k: [] for k in ("elbo", "recon", "kl", "log_px", "mse", "psnr",
                                                                "ssim")}
    posterior_means: list[torch.Tensor] = []  # (B, latent_dim) each: the active-unit statistic needs their variance
    kl_dims = torch.zeros(latent_dim, dtype=torch.float64, device=device)  # summed over images, no host sync
    for start in tqdm(range(0, n, batch_size), desc="evaluate", unit="batch", disable=not progress, leave=False):
        x = to_unit_float(images[start:start + batch_size], device)  # (B, C, H, W) uint8 -> float in [0, 1]
        with autocast(device, precision):
            posterior = vae.encode(x)  # mean, logvar (B, latent_dim), float32
            recon = vae.decode(posterior.sample()).log_prob(x)  # (B,) nats, summed in float32
            kl = posterior.kl()  # (B,) nats
            elbo = recon - kl  # (B,) nats
            x_rec = vae.decode(posterior.mode()).mean.float().clamp(0, 1)  # (B, C, H, W): from the posterior mean
            if iw_samples == 1:
                log_px = elbo  # K = 1 is the ELBO estimate itself
            else:  # (B,) nats; each call decodes len(x[i:i + group]) * chunk <= batch_size images
                log_px = torch.cat([iw_log_likelihood(vae, x[i:i + group], iw_samples, chunk=chunk)
                                    for i in range(0, len(x), group)])
        per_image["elbo"].append(elbo)
        per_image["recon"].append(recon)
        per_image["kl"].append(kl)
        per_image["log_px"].append(log_px.float())
        per_image["mse"].append(((x_rec - x) ** 2).flatten(1).mean(1))
        per_image["psnr"].append(psnr(x_rec, x))
        per_image["ssim"].append(ssim(x_rec, x))
        posterior_means.append(posterior.mean)
        kl_dims += (-0.5 * (1 + posterior.logvar - posterior.mean**2 - posterior.logvar.exp())).double().sum(0)
    # One transfer to the host at the end; means and variances in float64.
    v = {k: torch.cat(t).double().cpu() for k, t in per_image.items()}  # each (N,)
    nll = -v["log_px"]  # (N,) nats per image
    activity = torch.cat(posterior_means).double().var(0, correction=0).cpu()  # (latent_dim,): A_u = Var_x(E_q[z_u|x])
    support = _support(vae)
    return {
        "elbo_nats": v["elbo"].mean().item(),
        "recon_nats": v["recon"].mean().item(),
        "kl_nats": v["kl"].mean().item(),
        "nll_iw_nats": nll.mean().item(),
        "nll_iw_stderr": nll.std().item() / math.sqrt(n) if n > 1 else None,  # over images; None for one image
        "iw_samples": iw_samples,
        "elbo_bpd": bits_per_dim(v["elbo"].mean().item(), dims, support),
        "nll_iw_bpd": bits_per_dim(-nll.mean().item(), dims, support),
        "loss_nats": (beta * v["kl"] - v["recon"]).mean().item(),
        "kl_weight": beta,
        "psnr_db": v["psnr"].mean().item(),
        "ssim": v["ssim"].mean().item(),
        "mse": v["mse"].mean().item(),
        "active_units": int((activity > ACTIVE_UNIT_THRESHOLD).sum()),
        "latent_dim": latent_dim,
        "kl_per_dim_nats": [round(k, 6) for k in (kl_dims.cpu() / n).tolist()],
        "likelihood": vae.config.likelihood,
        "images": n,
        "dims": dims,
    }


def _support(vae: VAE) -> str:
    """The likelihood's support ("continuous", "discrete" or "none"), read off one decoded image."""
    z = torch.zeros(1, vae.config.latent_dim, device=next(vae.parameters()).device)
    return type(vae.decode(z)).support


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(x: torch.Tensor, y: torch.Tensor, *, data_range: float = 1.0, window: int = 11) -> torch.Tensor:
    """Structural similarity per image (B,), Gaussian window 11 / sigma 1.5 over the valid region, channels averaged.

    The convention of Wang et al.'s reference code and scikit-image (gaussian_weights, population covariance);
    torchmetrics' default mean also covers a reflect-padded border. Images smaller than the window use a window as
    large as the image.
    """
    x, y = x.float(), y.float()
    channels = x.shape[1]
    size = min(window, x.shape[-1], x.shape[-2])
    kernel = _gaussian_window(size).to(x.device).expand(channels, 1, size, size)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=channels)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx**2
    vy = blur(y * y) - my**2
    cxy = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def evaluate_run(run_dir: str | Path, *, split: str = "test", iw_samples: int = 1, limit: int | None = None,
                 batch_size: int = 256, device: str | None = None, fid_weights: str | Path | None = None,
                 seed: int = 0) -> dict[str, Any]:
    """Evaluate a run directory's model on a split of its data; write RUN_DIR/eval.json and return the report.

    Device, precision, memory layout and threads are the run's config choices, as in training (torch.compile is
    not used: evaluation batch shapes vary); `device` overrides the device. The random draws are seeded, so the same
    command gives the same numbers. FID is computed only when `fid_weights` names the Inception weights file and the
    `fid` extra is installed; otherwise the report's "fid_note" says how to get it.
    """
    from facevae import __version__
    from facevae import fid
    from facevae.checkpoint import load_run
    from facevae.fileio import atomic_write
    from facevae.data import checked_cache, split_view

    if iw_samples < 1:
        raise UserError(f"--iw-samples must be at least 1, got {iw_samples}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    vae = load_run(run_dir)
    config = vae.config
    dev, precision = setup(config, device=device)  # the run's hardware choices, as in training
    vae = vae.to(dev)
    if config.channels_last:
        vae = vae.to(memory_format=torch.channels_last)
    cache = checked_cache(vae.config)
    images = split_view(cache, split)  # read through the memory-mapped cache, never copied whole
    if limit is not None and not 1 <= limit <= len(images):
        raise UserError(f"--limit {limit} is outside 1..{len(images)} (the '{split}' split has {len(images)} images)")
    images = images.head(limit) if limit else images
    if len(images) == 0:
        raise UserError(f"the '{split}' split has no images")
    # The weights file is checked before the long evaluation: a bad one fails at once.
    extractor, fid_note = fid.load_extractor(fid_weights, dev) if fid_weights else (None, fid.NOTE_NO_WEIGHTS)
    if extractor is not None and len(images) < 2:
        raise UserError("FID needs at least 2 images; raise --limit")
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        report = evaluate(vae, images, iw_samples=iw_samples, batch_size=batch_size, device=dev, precision=precision,
                          progress=True)
        if extractor is not None:
            report.update(fid.fid_report(vae, images, extractor, batch_size=batch_size, device=dev,
                                         precision=precision, seed=seed))
            report["fid_weights_sha256"] = fid.file_sha256(fid_weights)
        else:
            report["fid_note"] = fid_note
    report.update({
        "split": split,
        "facevae_version": __version__,
        "data": {"spec": vae.config.data, "source": cache.manifest.get("source"), "size": cache.manifest.get("size"),
                 "crop": cache.manifest.get("crop"), "split_scheme": cache.manifest.get("split"),
                 "manifest_sha256": hashlib.sha256(json.dumps(cache.manifest, sort_keys=True).encode()).hexdigest()},
        "settings": {"iw_samples": iw_samples, "limit": limit, "batch_size": batch_size, "device": str(dev),
                     "precision": precision, "channels_last": config.channels_last, "seed": seed,
                     "fid_weights": str(Path(fid_weights).resolve()) if fid_weights else None},
    })
    atomic_write(Path(run_dir) / "eval.json", json.dumps(report, indent=2) + "\n")
    return report


def format_report(r: dict[str, Any]) -> str:
    """The report as a small human-readable table."""
    def num(v: Any, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    rows = [
        ("ELBO (lower bound on log p(x), higher is better)", f"{r['elbo_nats']:.2f} nats/image",
         f"{num(r['elbo_bpd'], '.4f')} bits/dim"),
        ("  reconstruction E_q[log p(x|z)]", f"{r['recon_nats']:.2f} nats/image", ""),
        ("  KL(q(z|x) || p(z))", f"{r['kl_nats']:.2f} nats/image", ""),
        (f"-log p(x), importance-weighted K={r['iw_samples']} (lower is better)",
         f"{r['nll_iw_nats']:.2f} +- {num(r['nll_iw_stderr'], '.2f')} nats/image",
         f"{num(r['nll_iw_bpd'], '.4f')} bits/dim"),
        (f"training objective -recon + {r['kl_weight']:g} * KL", f"{r['loss_nats']:.2f} nats/image", ""),
        ("PSNR (posterior-mean reconstruction)", f"{r['psnr_db']:.2f} dB", ""),
        ("SSIM", f"{r['ssim']:.4f}", ""),
        ("MSE (pixels in [0, 1])", f"{r['mse']:.5f}", ""),
        ("active units (Var > 0.01)", f"{r['active_units']} / {r['latent_dim']}", ""),
    ]
    if "fid_recon" in r:
        rows += [(f"FID reconstructions ({r['fid_images']} vs {r['fid_images']} images, lower is better)",
                  f"{r['fid_recon']:.2f}", ""),
                 (f"FID prior samples ({r['fid_images']} vs {r['fid_images']} images, lower is better)",
                  f"{r['fid_samples']:.2f}", "")]
    width = max(len(a) for a, _, _ in rows)
    head = f"{r['likelihood']} likelihood, {r['images']} images of split '{r.get('split', '?')}', D = {r['dims']}"
    lines = [head] + [f"  {a:<{width}}  {b:<28} {c}".rstrip() for a, b, c in rows]
    if r.get("fid_note"):
        lines.append(f"  {r['fid_note']}")
    return "\n".join(lines)
