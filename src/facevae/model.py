"""The VAE: a convolutional Encoder, a mirrored Decoder, and the objective, in one file that reads top to bottom.

The network follows the popular PyTorch VAE collection's vanilla conv VAE: k3 s2 convs with
BatchNorm and LeakyReLU, widths 32-64-128-256-512 at 64x64, latent 128, and a mirrored transposed-conv decoder.
Unlike it, the decoder ends in raw parameters that the likelihood maps to its own range (sigmoid for a mean in
[0, 1], logits for the Bernoulli): no tanh on [0, 1] data. The objective lives here too: `vae(x)` returns the ELBO
terms, for training and evaluation alike.

The model knows nothing of devices, files or the command line.
"""

from __future__ import annotations

import json
from copy import deepcopy
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from facevae.config import Config
from facevae.distributions import LIKELIHOODS, DiagonalGaussian, Likelihood
from facevae.errors import UserError


@dataclass
class ELBO:
    """The objective's terms, each (B,) in nats per image, and the scalar training loss (batch mean)."""

    elbo: torch.Tensor  # recon - kl: a lower bound on log p(x)
    recon: torch.Tensor  # E_q[log p(x|z)], one sample
    kl: torch.Tensor  # KL(q(z|x) || N(0, I)), closed form
    loss_per_image: torch.Tensor  # -recon + kl_weight * kl (the true -ELBO when kl_weight = 1)
    loss: torch.Tensor  # the batch mean of loss_per_image: what training minimises
    posterior: DiagonalGaussian  # q(z|x): mean and logvar (B, latent_dim)
    likelihood: Likelihood  # p(x|z) at the sampled z (its log_prob_8bit scores the same sample as 8-bit data)

    @property
    def x_mean(self) -> torch.Tensor:
        """The mean of p(x|z) for the sampled z, (B, C, S, S): the reconstruction (computed when asked for)."""
        return self.likelihood.mean


def elbo(posterior: DiagonalGaussian, likelihood: Likelihood, x: torch.Tensor, *, kl_weight: float = 1.0) -> ELBO:
    """ELBO = E_q[log p(x|z)] - KL(q || p), one sample of z, nats per image; loss = mean(-recon + kl_weight * kl)."""
    recon = likelihood.log_prob(x)  # (B,)
    kl = posterior.kl()  # (B,)
    per_image = kl_weight * kl - recon
    return ELBO(elbo=recon - kl, recon=recon, kl=kl, loss_per_image=per_image, loss=per_image.mean(),
                posterior=posterior, likelihood=likelihood)

MAX_PARAMETERS = 250_000_000  # 1 GB of float32 weights: far above any network this toolkit's recipes build


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


class VAE(nn.Module):
    """Gaussian encoder q(z|x), standard normal prior p(z), decoder likelihood p(x|z) (config.likelihood)."""

    def __init__(self, config: Config):
        super().__init__()
        if not config.shape_known:
            raise ValueError("VAE needs numbers for channels and image_size, not 'auto': pass the config through "
                             "facevae.data.with_data_shape first")
        self.config = c = config
        self.likelihood_type = LIKELIHOODS[c.likelihood]
        self.encoder = Encoder(c.channels, c.widths, c.image_size, c.latent_dim)
        self.decoder = Decoder(c.channels, c.widths, c.image_size, c.latent_dim,
                               self.likelihood_type.outputs_per_channel)
        # The likelihood's own parameters (a learned sigma, a running sigma), or None; registered after the decoder
        # so the optimiser's parameter order is encoder, decoder, likelihood.
        params = self.likelihood_type.params
        self.likelihood_params = params() if params is not None else None

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x: float (B, C, S, S) in [0, 1] -> q(z|x)."""
        mean, logvar = self.encoder(x)
        return DiagonalGaussian(mean, logvar)

    def decode(self, z: torch.Tensor) -> Likelihood:
        """z: (B, latent_dim) -> p(x|z)."""
        return self.likelihood_type.from_decoder(self.decoder(z), self.likelihood_params, self.config,
                                                 training=self.training)

    def forward(self, x: torch.Tensor, *, kl_weight: float | None = None, eps: torch.Tensor | None = None) -> ELBO:
        """The ELBO terms of a batch x (B, C, S, S) in [0, 1], with one reparameterised sample per image.

        eps: the standard normal noise of that sample, (B, latent_dim); drawn here when not given.
        """
        posterior = self.encode(x)
        likelihood = self.decode(posterior.sample() if eps is None else posterior.mean + posterior.std * eps)
        if self.training:
            likelihood.observe(x)
        return elbo(posterior, likelihood, x, kl_weight=self.config.kl_weight if kl_weight is None else kl_weight)

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
        """n new images from the prior: the means of p(x|z), z ~ N(0, T^2 I) (T = temperature, 1 for the prior
        itself); (n, C, S, S) in [0, 1]."""
        z = self.prior(n, generator=generator, temperature=temperature).to(next(self.parameters()).device)
        return self.decode(z).mean.float().clamp(0, 1)

    def prior(self, n: int, *, generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
        """The codes `sample` decodes: z ~ N(0, T^2 I), (n, latent_dim), drawn on the CPU (the same for a seed on
        any device)."""
        return temperature * torch.randn(n, self.config.latent_dim, generator=generator, device="cpu")

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of p(x|z) at the posterior mean z: the deterministic reconstruction of x."""
        return self.decode(self.encode(x).mode()).mean.float().clamp(0, 1)

    def metadata(self) -> dict[str, str]:
        """What a weights file needs to rebuild this model: the config as JSON."""
        return {"format": "facevae-model", "config": json.dumps(self.config.to_dict())}


def folded(vae: VAE) -> VAE:
    """A copy of `vae` for inference only, in eval mode: each BatchNorm folded into the convolution before it.

    In eval mode a BatchNorm is an affine map per channel, (y - mean) * gamma / sqrt(var + eps) + beta, so conv then
    BatchNorm is one convolution with scaled weights and a bias: the same function (to float rounding) with one pass
    over the activations fewer per block, and the LeakyReLU after it runs in place. Never train or save the copy.
    """
    copy = deepcopy(vae).eval()
    for block in copy.modules():  # the down_block and up_block Sequentials: conv, BatchNorm2d, LeakyReLU
        if isinstance(block, nn.Sequential) and len(block) == 3 and isinstance(block[1], nn.BatchNorm2d) \
                and isinstance(block[0], (nn.Conv2d, nn.ConvTranspose2d)) and isinstance(block[2], nn.LeakyReLU):
            transpose = isinstance(block[0], nn.ConvTranspose2d)
            block[0], block[1] = fuse_conv_bn_eval(block[0], block[1], transpose=transpose), nn.Identity()
            block[2].inplace = True
    return copy


def expected_state(config: Config) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The name -> (shape, dtype) of every tensor of the network a config builds, computed on the meta device
    (nothing allocated), after its parameter count is checked against MAX_PARAMETERS."""
    with torch.device("meta"):
        state = VAE(config).state_dict()
    count = sum(t.numel() for t in state.values())
    if count > MAX_PARAMETERS:
        raise UserError(f"the network of this config has {count:,} parameters, more than facevae builds "
                        f"({MAX_PARAMETERS:,}); use smaller widths, latent_dim or image_size")
    return {name: (tuple(t.shape), t.dtype) for name, t in state.items()}


def network_summary(config: Config) -> str:
    """A table of the network's layers with output shapes and parameter counts (torchinfo), as the deck's graph."""
    expected_state(config)  # a network too large to build is refused before torchinfo builds it
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
    # torchinfo labels its mult-add total with a byte unit ("Units.MEGABYTES"): write that line ourselves.
    lines = [f"Total mult-adds: {_si(stats.total_mult_adds)} ({stats.total_mult_adds:,})"
             if line.startswith("Total mult-adds") else line for line in str(stats).splitlines()]
    return f"facevae VAE: {config.image_size}x{config.image_size}x{config.channels}, latent {config.latent_dim}, " \
           f"likelihood {config.likelihood}\n" + "\n".join(lines)


def _si(count: int) -> str:
    """A count with an SI prefix: 27597312 -> '27.60 M'."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= factor:
            return f"{count / factor:.2f} {prefix}"
    return str(count)
