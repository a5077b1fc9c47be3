"""The metrics report: ELBO terms, the importance-weighted likelihood, bits/dim, PSNR, SSIM, MSE, active units.

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

from facevae.device import autocast, resolve_device, resolve_precision, to_unit_float
from facevae.errors import UserError
from facevae.model import VAE
from facevae.objectives import bits_per_dim, iw_log_likelihood, psnr

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al.: unit u is active when Var_x(E_q[z_u | x]) > 0.01


@torch.inference_mode()
def evaluate(vae: VAE, images: torch.Tensor, *, iw_samples: int = 1, batch_size: int = 256,
             device: torch.device | str = "cpu", precision: str = "float32", progress: bool = False,
             kl_weight: float | None = None) -> dict[str, Any]:
    """Evaluate `vae` (in eval mode) on uint8 images (N, C, H, W); return the report's numbers.

    The importance-weighted bound decodes at most `batch_size` images at a time, whatever `iw_samples` is.
    """
    device = torch.device(device)
    vae.eval()
    n = len(images)
    dims = images[0].numel()
    beta = vae.config.kl_weight if kl_weight is None else kl_weight
    sums = {k: 0.0 for k in ("elbo", "recon", "kl", "loss", "mse", "psnr", "ssim")}
    nll_sum = nll_sq = 0.0
    kl_dims = torch.zeros(vae.config.latent_dim, dtype=torch.float64)
    mean_sum = torch.zeros(vae.config.latent_dim, dtype=torch.float64)
    mean_sq = torch.zeros(vae.config.latent_dim, dtype=torch.float64)
    # With K samples, an image batch of b images decodes chunk * b <= batch_size images at once.
    img_batch = batch_size if iw_samples == 1 else max(1, batch_size // min(iw_samples, batch_size))
    for start in tqdm(range(0, n, img_batch), desc="evaluate", unit="batch", disable=not progress, leave=False):
        x = to_unit_float(images[start:start + img_batch], device)
        with autocast(device, precision):
            posterior = vae.encode(x)
            likelihood = vae.decode(posterior.sample())
            recon = likelihood.log_prob(x)
            kl = posterior.kl()
            x_rec = vae.decode(posterior.mode()).mean.float().clamp(0, 1)  # reconstruction from the posterior mean
            if iw_samples > 1:
                log_px = iw_log_likelihood(vae, x, iw_samples, chunk=max(1, batch_size // len(x)))
            else:
                log_px = recon - kl  # K = 1 is the ELBO itself
        elbo = recon - kl
        sums["elbo"] += elbo.sum().item()
        sums["recon"] += recon.sum().item()
        sums["kl"] += kl.sum().item()
        sums["loss"] += (beta * kl - recon).sum().item()
        sums["mse"] += ((x_rec - x) ** 2).flatten(1).mean(1).sum().item()
        sums["psnr"] += psnr(x_rec, x).sum().item()
        sums["ssim"] += ssim(x_rec, x).sum().item()
        nll = -log_px.double()
        nll_sum += nll.sum().item()
        nll_sq += (nll**2).sum().item()
        kl_dims += (-0.5 * (1 + posterior.logvar - posterior.mean**2 - posterior.logvar.exp())).double().sum(0).cpu()
        mean_sum += posterior.mean.double().sum(0).cpu()
        mean_sq += (posterior.mean.double() ** 2).sum(0).cpu()
    means = {k: v / n for k, v in sums.items()}
    nll_mean = nll_sum / n
    nll_var = max(nll_sq / n - nll_mean**2, 0.0) * n / max(n - 1, 1)
    activity = mean_sq / n - (mean_sum / n) ** 2  # A_u = Var_x(E_q[z_u | x])
    support = _support(vae)
    return {
        "elbo_nats": means["elbo"],
        "recon_nats": means["recon"],
        "kl_nats": means["kl"],
        "nll_iw_nats": nll_mean,
        "nll_iw_stderr": math.sqrt(nll_var / n),
        "iw_samples": iw_samples,
        "elbo_bpd": bits_per_dim(means["elbo"], dims, support),
        "nll_iw_bpd": bits_per_dim(-nll_mean, dims, support),
        "loss_nats": means["loss"],
        "kl_weight": beta,
        "psnr_db": means["psnr"],
        "ssim": means["ssim"],
        "mse": means["mse"],
        "active_units": int((activity > ACTIVE_UNIT_THRESHOLD).sum()),
        "latent_dim": vae.config.latent_dim,
        "kl_per_dim_nats": [round(v, 6) for v in (kl_dims / n).tolist()],
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

    Images smaller than the window use a window as large as the image.
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
                 batch_size: int = 256, device: str = "auto") -> dict[str, Any]:
    """Evaluate a run directory's model on a split of its data; write RUN_DIR/eval.json and return the report."""
    from facevae import __version__
    from facevae.checkpoint import atomic_write, load_run
    from facevae.data import open_split
    from facevae.data.cache import MANIFEST

    if iw_samples < 1:
        raise UserError(f"--iw-samples must be at least 1, got {iw_samples}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    dev = resolve_device(device)
    vae = load_run(run_dir, device=dev)
    data = open_split(vae.config, split)
    if limit is not None and not 1 <= limit <= len(data):
        raise UserError(f"--limit {limit} is outside 1..{len(data)} (the '{split}' split has {len(data)} images)")
    images = data.images[:limit] if limit else data.images
    if len(images) == 0:
        raise UserError(f"the '{split}' split has no images")
    precision = resolve_precision(vae.config.precision, dev)
    report = evaluate(vae, images, iw_samples=iw_samples, batch_size=batch_size, device=dev, precision=precision,
                      progress=True)
    report.update({
        "split": split,
        "facevae_version": __version__,
        "data": {"spec": vae.config.data, "source": data.manifest.get("source"), "size": data.manifest.get("size"),
                 "crop": data.manifest.get("crop"), "split_scheme": data.manifest.get("split"),
                 "manifest_sha256": hashlib.sha256(json.dumps(data.manifest, sort_keys=True).encode()).hexdigest()},
        "settings": {"iw_samples": iw_samples, "limit": limit, "batch_size": batch_size, "device": str(dev),
                     "precision": precision},
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
         f"{r['nll_iw_nats']:.2f} +- {r['nll_iw_stderr']:.2f} nats/image", f"{num(r['nll_iw_bpd'], '.4f')} bits/dim"),
        (f"training objective -recon + {r['kl_weight']:g} * KL", f"{r['loss_nats']:.2f} nats/image", ""),
        ("PSNR (posterior-mean reconstruction)", f"{r['psnr_db']:.2f} dB", ""),
        ("SSIM", f"{r['ssim']:.4f}", ""),
        ("MSE (pixels in [0, 1])", f"{r['mse']:.5f}", ""),
        ("active units (Var > 0.01)", f"{r['active_units']} / {r['latent_dim']}", ""),
    ]
    width = max(len(a) for a, _, _ in rows)
    head = f"{r['likelihood']} likelihood, {r['images']} images of split '{r.get('split', '?')}', D = {r['dims']}"
    return "\n".join([head] + [f"  {a:<{width}}  {b:<28} {c}".rstrip() for a, b, c in rows])
