"""The objectives: the ELBO and the importance-weighted bound on log p(x), and their units."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from facevae.distributions import DiagonalGaussian, Likelihood, standard_normal_log_prob

if TYPE_CHECKING:
    from facevae.model import VAE


@dataclass
class ELBO:
    """The objective's terms, each (B,) in nats per image, and the scalar training loss (batch mean)."""

    elbo: torch.Tensor  # recon - kl: a lower bound on log p(x)
    recon: torch.Tensor  # E_q[log p(x|z)], one sample
    kl: torch.Tensor  # KL(q(z|x) || N(0, I)), closed form
    loss: torch.Tensor  # mean over the batch of -recon + kl_weight * kl (the true -ELBO when kl_weight = 1)
    x_mean: torch.Tensor  # the mean of p(x|z) for the sampled z, (B, C, S, S): the reconstruction


def elbo(posterior: DiagonalGaussian, likelihood: Likelihood, x: torch.Tensor, *, kl_weight: float = 1.0) -> ELBO:
    """ELBO = E_q[log p(x|z)] - KL(q || p), one sample of z, nats per image; loss = mean(-recon + kl_weight * kl)."""
    recon = likelihood.log_prob(x)  # (B,)
    kl = posterior.kl()  # (B,)
    loss = (kl_weight * kl - recon).mean()
    return ELBO(elbo=recon - kl, recon=recon, kl=kl, loss=loss, x_mean=likelihood.mean)


def iw_log_likelihood(vae: "VAE", x: torch.Tensor, samples: int, *, chunk: int | None = None) -> torch.Tensor:
    """The importance-weighted bound (Burda et al.): log (1/K) sum_k p(x, z_k) / q(z_k|x), z_k ~ q(z|x); (B,) nats.

    K = 1 is the ELBO (with a sampled reconstruction term); it rises with K toward log p(x). The K samples are decoded
    `chunk` at a time (default: all at once) as one batch of chunk * B images, and combined with logsumexp.
    """
    posterior = vae.encode(x)
    chunk = samples if chunk is None else max(1, min(chunk, samples))
    log_w = []
    for start in range(0, samples, chunk):
        k = min(chunk, samples - start)
        z = posterior.sample(k)  # (k, B, latent_dim)
        x_rep = x.unsqueeze(0).expand(k, *x.shape).reshape(k * x.shape[0], *x.shape[1:])
        log_px_z = vae.decode(z.reshape(-1, z.shape[-1])).log_prob(x_rep).view(k, -1)  # (k, B)
        log_w.append(log_px_z + standard_normal_log_prob(z) - posterior.log_prob(z))
    return torch.logsumexp(torch.cat(log_w), dim=0) - math.log(samples)


def bits_per_dim(log_likelihood_nats: float, dims: int, support: str) -> float | None:
    """-log P(x) / (D ln 2) for 8-bit data; continuous densities on [0, 1] add the dequantisation term D ln 256.

    None where the likelihood is not a normalised density of the data (Bernoulli on grey levels).
    """
    if support == "none":
        return None
    nll = -log_likelihood_nats + (dims * math.log(256) if support == "continuous" else 0.0)
    return nll / (dims * math.log(2))


def psnr(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio per image in dB for [0, 1] pixels: 10 log10(1 / MSE); (B,)."""
    mse = ((x_hat.float() - x.float()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp(min=1e-10))  # 1e-10 caps a perfect reconstruction at 100 dB
