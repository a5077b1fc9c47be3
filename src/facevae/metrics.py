"""Figures computed from a model and images: importance samples and the bound, bits/dim, PSNR, SSIM. Units stated.

The bound needs only a model with encode(x) -> posterior and decode(z) -> likelihood (the VAE is one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from facevae.distributions import DiagonalGaussian, Likelihood, standard_normal_log_prob


class LatentModel(Protocol):
    """What the importance-weighted bound needs of a model."""

    def encode(self, x: torch.Tensor) -> DiagonalGaussian: ...

    def decode(self, z: torch.Tensor) -> Likelihood: ...


@dataclass
class ImportanceSamples:
    """K draws z_k ~ q(z|x) for each of B images; every term (K, B) in nats."""

    log_ratio: torch.Tensor  # log p(z_k) - log q(z_k|x)
    log_density: torch.Tensor  # log p(x|z_k): the density (or mass) that training optimises
    log_prob_8bit: torch.Tensor | None  # log P(x|z_k) of the 8-bit image; None where the likelihood has none


def importance_samples(model: LatentModel, x: torch.Tensor, samples: int, *, chunk: int | None = None,
                       posterior: DiagonalGaussian | None = None) -> ImportanceSamples:
    """Draw `samples` latents per image from q(z|x) (`posterior`, or encoded here) and score x under each.

    The samples are decoded `chunk` at a time (default: all at once) as one batch of chunk * B images.
    """
    posterior = model.encode(x) if posterior is None else posterior
    chunk = samples if chunk is None else max(1, min(chunk, samples))
    ratio, density, eight_bit = [], [], []
    for start in range(0, samples, chunk):
        k = min(chunk, samples - start)
        z = posterior.sample(k)  # (k, B, latent_dim)
        x_rep = x.unsqueeze(0).expand(k, *x.shape).reshape(k * x.shape[0], *x.shape[1:])  # (k * B, C, H, W)
        likelihood = model.decode(z.reshape(-1, z.shape[-1]))
        density.append(likelihood.log_prob(x_rep).view(k, -1))  # (k, B)
        if likelihood.has_8bit():
            eight_bit.append(likelihood.log_prob_8bit(x_rep).view(k, -1))
        ratio.append(standard_normal_log_prob(z) - posterior.log_prob(z))
    return ImportanceSamples(torch.cat(ratio), torch.cat(density), torch.cat(eight_bit) if eight_bit else None)


def iw_bound(log_px_z: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """The importance-weighted bound (Burda et al.): log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x), (K, B) -> (B,).

    K = 1 is an ELBO estimate (with a sampled KL); the bound rises with K toward log p(x). logsumexp, never exp.
    """
    return torch.logsumexp(log_px_z + log_ratio, dim=0) - math.log(log_px_z.shape[0])


def bits_per_dim(log_likelihood_nats: float | None, dims: int) -> float | None:
    """-log P(x) / (D ln 2) for the log-probability of 8-bit data (no dequantisation term); None for None."""
    return None if log_likelihood_nats is None else -log_likelihood_nats / (dims * math.log(2))


def mse(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image for [0, 1] pixels; (B,)."""
    return ((x_hat.float() - x.float()) ** 2).flatten(1).mean(1)


def psnr(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio per image in dB for [0, 1] pixels: 10 log10(1 / MSE); (B,)."""
    return 10 * torch.log10(1.0 / mse(x_hat, x).clamp(min=1e-10))  # 1e-10 caps a perfect reconstruction at 100 dB


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
