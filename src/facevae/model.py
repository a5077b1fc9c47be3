"""The VAE: a convolutional Encoder, a mirrored Decoder, and the objective, in one file that reads top to bottom.

The network follows the popular PyTorch VAE collection's vanilla conv VAE (shared/REFERENCES.md): k3 s2 convs with
BatchNorm and LeakyReLU, widths 32-64-128-256-512 at 64x64, latent 128, and a mirrored transposed-conv decoder.
Unlike it, the decoder ends in raw parameters that the likelihood maps to its own range (sigmoid for a mean in
[0, 1], logits for the Bernoulli): no tanh on [0, 1] data.

The model knows nothing of devices, files or the command line.
"""

from __future__ import annotations

import json
import math
import torch
from torch import nn

from facevae.config import Config
from facevae.distributions import (
    Bernoulli,
    ContinuousBernoulli,
    DiagonalGaussian,
    DiscretizedLogistic,
    Gaussian,
    Likelihood,
)
from facevae import objectives
from facevae.objectives import ELBO


def down_block(cin: int, cout: int) -> nn.Sequential:
    """(B, cin, H, W) -> (B, cout, H/2, W/2). No conv bias: the BatchNorm after it removes any bias (its gradient is
    zero, and Adam would turn the rounding noise in it into full-size steps)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.LeakyReLU(0.2))


def up_block(cin: int, cout: int) -> nn.Sequential:
    """(B, cin, H, W) -> (B, cout, 2H, 2W); no bias before BatchNorm, as in down_block."""
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.LeakyReLU(0.2))


class Encoder(nn.Module):
    """x (B, C, S, S) in [0, 1] -> posterior mean and log-variance, each (B, latent_dim)."""

    def __init__(self, channels: int, widths: list[int], image_size: int, latent_dim: int):
        super().__init__()
        chans = [channels, *widths]
        self.features = nn.Sequential(*(down_block(a, b) for a, b in zip(chans[:-1], chans[1:])))
        side = image_size // 2 ** len(widths)
        self.to_mean = nn.Linear(widths[-1] * side * side, latent_dim)
        self.to_logvar = nn.Linear(widths[-1] * side * side, latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x * 2 - 1).flatten(1)  # centre the [0, 1] input; (B, widths[-1] * side * side)
        return self.to_mean(h), self.to_logvar(h)


class Decoder(nn.Module):
    """z (B, latent_dim) -> raw likelihood parameters (B, channels * params_per_channel, S, S)."""

    def __init__(self, channels: int, widths: list[int], image_size: int, latent_dim: int, params_per_channel: int):
        super().__init__()
        rev = list(reversed(widths))  # e.g. 512, 256, 128, 64, 32
        self.side = image_size // 2 ** len(widths)
        self.first = rev[0]
        self.from_latent = nn.Linear(latent_dim, rev[0] * self.side * self.side)
        # len(widths) - 1 up-blocks bring the side to image_size / 2, a last up-block to image_size.
        self.features = nn.Sequential(*(up_block(a, b) for a, b in zip(rev[:-1], rev[1:])), up_block(rev[-1], rev[-1]))
        self.to_params = nn.Conv2d(rev[-1], channels * params_per_channel, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.from_latent(z).view(-1, self.first, self.side, self.side)
        return self.to_params(self.features(h))


OPTIMAL_SIGMA = {"gaussian_optimal": "batch", "gaussian_optimal_per_image": "image"}


def params_per_channel(likelihood: str) -> int:
    """How many decoder outputs each image channel needs for this likelihood."""
    return 2 if likelihood == "discretized_logistic" else 1


class VAE(nn.Module):
    """Gaussian encoder q(z|x), standard normal prior p(z), decoder likelihood p(x|z)."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        c = config
        self.encoder = Encoder(c.channels, c.widths, c.image_size, c.latent_dim)
        self.decoder = Decoder(c.channels, c.widths, c.image_size, c.latent_dim, params_per_channel(c.likelihood))
        if c.likelihood == "gaussian_learned":
            # One log-sigma shared by every pixel, learned with the network; starts at log(0.1) pixel units.
            self.log_sigma = nn.Parameter(torch.tensor(math.log(0.1)))
        if c.likelihood in OPTIMAL_SIGMA:
            # Training scores each batch with its own optimal sigma; a sigma computed from the x being scored would
            # not make p(x|z) a density of x, so evaluation (eval mode) uses this running estimate of it instead, as
            # BatchNorm does with its statistics: a fixed sigma, a normalised density, per-image numbers.
            self.register_buffer("running_log_sigma", torch.tensor(0.0))
            self.register_buffer("running_count", torch.tensor(0, dtype=torch.long))

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x: float (B, C, S, S) in [0, 1] -> q(z|x)."""
        mean, logvar = self.encoder(x)
        return DiagonalGaussian(mean, logvar)

    def decode(self, z: torch.Tensor) -> Likelihood:
        """z: (B, latent_dim) -> p(x|z)."""
        h = self.decoder(z)
        c = self.config
        name = c.likelihood
        if name == "gaussian":
            return Gaussian(torch.sigmoid(h), math.log(c.sigma))
        if name == "gaussian_learned":
            return Gaussian(torch.sigmoid(h), self.log_sigma.clamp(min=math.log(c.min_sigma)))
        if name in OPTIMAL_SIGMA:
            if not self.training:
                return Gaussian(torch.sigmoid(h), self.running_log_sigma.clamp(min=math.log(c.min_sigma)))
            return Gaussian(torch.sigmoid(h), optimal=OPTIMAL_SIGMA[name], min_sigma=c.min_sigma)
        if name == "bernoulli":
            return Bernoulli(h)
        if name == "continuous_bernoulli":
            return ContinuousBernoulli(h)
        if name == "discretized_logistic":
            mu, log_scale = h.chunk(2, dim=1)
            return DiscretizedLogistic(torch.sigmoid(mu), log_scale, min_scale=c.min_sigma)
        raise ValueError(f"unknown likelihood {name!r}")

    def forward(self, x: torch.Tensor, *, kl_weight: float | None = None, eps: torch.Tensor | None = None) -> ELBO:
        """The ELBO terms of a batch x (B, C, S, S) in [0, 1], with one reparameterised sample per image.

        eps: the standard normal noise of that sample, (B, latent_dim); drawn here when not given.
        """
        posterior = self.encode(x)
        likelihood = self.decode(posterior.sample() if eps is None else posterior.mean + posterior.std * eps)
        if self.training and self.config.likelihood in OPTIMAL_SIGMA:
            self._track_sigma(likelihood.mean, x)
        return objectives.elbo(posterior, likelihood, x, kl_weight=self.config.kl_weight if kl_weight is None else kl_weight)

    @torch.no_grad()
    def _track_sigma(self, mean: torch.Tensor, x: torch.Tensor) -> None:
        """Running average of the batch's optimal log sigma (the mean of the first 100 batches, then momentum 0.01)."""
        batch = 0.5 * torch.log(((x.float() - mean.float()) ** 2).mean().clamp(min=1e-12))
        weight = torch.clamp(1.0 / (self.running_count.float() + 1), min=0.01)
        self.running_log_sigma.lerp_(batch, weight)
        self.running_count += 1

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """n new images from the prior: the means of p(x|z), z ~ N(0, I); (n, C, S, S) in [0, 1]."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.config.latent_dim, generator=generator, device="cpu").to(device)
        return self.decode(z).mean.float().clamp(0, 1)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of p(x|z) at the posterior mean z: the deterministic reconstruction of x."""
        return self.decode(self.encode(x).mode()).mean.float().clamp(0, 1)

    def metadata(self) -> dict[str, str]:
        """What a weights file needs to rebuild this model: the config as JSON."""
        return {"format": "facevae-model", "config": json.dumps(self.config.to_dict())}


def network_summary(config: Config) -> str:
    """A table of the network's layers with output shapes and parameter counts (torchinfo), as the deck's graph."""
    from torchinfo import summary

    class EncodeDecode(nn.Module):  # x -> posterior mean -> decoder parameters: every layer once, tensors only
        def __init__(self, vae: VAE):
            super().__init__()
            self.encoder, self.decoder = vae.encoder, vae.decoder

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            mean, _ = self.encoder(x)
            return self.decoder(mean)

    net = EncodeDecode(VAE(config))
    shape = (1, config.channels, config.image_size, config.image_size)
    stats = summary(net, input_size=shape, depth=4, col_names=("output_size", "num_params", "mult_adds"),
                    verbose=0, device="cpu")
    return f"facevae VAE: {config.image_size}x{config.image_size}x{config.channels}, latent {config.latent_dim}, " \
           f"likelihood {config.likelihood}\n{stats}"
