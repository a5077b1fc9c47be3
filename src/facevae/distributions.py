"""The posterior q(z|x) and the decoder likelihoods p(x|z). Every log-probability is in nats per image, (B,).

Shapes: images x are float (B, C, H, W) in [0, 1]; latents z are (B, latent_dim).
Sums are taken in float32 at least, whatever precision the network ran in.
"""

from __future__ import annotations

import math
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

LOG_2PI = math.log(2 * math.pi)


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _sum_per_item(t: torch.Tensor) -> torch.Tensor:
    """Sum every dimension but the first: (B, ...) -> (B,), in float32 at least."""
    return _at_least_float32(t).flatten(1).sum(1)


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))), the encoder's posterior."""

    # logvar is clamped to [-30, 20]: exp(20) = 4.9e8 and exp(-30) = 9.4e-14 keep exp() finite in float32 early in
    # training; a trained encoder never comes near either bound.
    LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean = mean.float()  # (B, latent_dim)
        self.logvar = logvar.float().clamp(self.LOGVAR_MIN, self.LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, samples: int | None = None) -> torch.Tensor:
        """A reparameterised sample z = mean + std * eps: (B, latent_dim), or (samples, B, latent_dim)."""
        shape = self.mean.shape if samples is None else (samples, *self.mean.shape)
        return self.mean + self.std * torch.randn(shape, device=self.mean.device, dtype=self.mean.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log q(z|x) in nats; z is (..., B, latent_dim) -> (..., B)."""
        return -0.5 * (((z - self.mean) / self.std) ** 2 + self.logvar + LOG_2PI).sum(-1)

    def kl_per_dim(self) -> torch.Tensor:
        """KL(q || N(0, I)) per latent dimension in closed form, nats, (B, latent_dim):
        -1/2 (1 + logvar - mean^2 - exp(logvar))."""
        return -0.5 * (1 + self.logvar - self.mean**2 - self.logvar.exp())

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) in closed form, nats per image, (B,)."""
        return self.kl_per_dim().sum(-1)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) in nats, summed over the last dimension."""
    return -0.5 * (z.float() ** 2 + LOG_2PI).sum(-1)


class LikelihoodSettings(Protocol):
    """The config keys a likelihood may read (facevae.config.Config has them)."""

    sigma: float
    min_sigma: float


class Likelihood:
    """p(x|z) for a batch of images, and everything about one choice of `likelihood` in the config.

    A likelihood class declares its `name` (the config value; the LIKELIHOODS table at the end of this file maps
    names to classes), `outputs_per_channel` (decoder outputs per image channel), `support`, `params` (the class of
    the small nn.Module holding its own parameters, if any; the VAE keeps one as `vae.likelihood_params`) and
    `from_decoder` (how it is built from the decoder's raw output and those parameters). `support` decides how
    bits/dim are reported:

    - "continuous": a normalised density on [0, 1] (or on the real line): -log P(8-bit x) ~ -log p(x) + D ln 256
      (uniform dequantisation; exact as a bound for the dequantised expectation);
    - "discrete": a probability mass over the 256 levels of 8-bit data: -log P(x) directly;
    - "none": not a normalised density of [0, 1] data (Bernoulli on grey levels): no bits/dim.
    """

    name: ClassVar[str] = ""  # "" for a family class that is not itself a config choice
    outputs_per_channel: ClassVar[int] = 1
    support: ClassVar[str] = "continuous"

    params: ClassVar[type[nn.Module] | None] = None  # the class of its own parameters (saved with the model)

    @classmethod
    def from_decoder(cls, raw: torch.Tensor, params: nn.Module | None, settings: LikelihoodSettings, *,
                     training: bool) -> "Likelihood":
        """The likelihood of a batch from the decoder's raw output (B, C * outputs_per_channel, H, W)."""
        raise NotImplementedError

    def observe(self, x: torch.Tensor) -> None:
        """Called by the VAE with the data of each training batch (updates running statistics); nothing by default."""

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def mean(self) -> torch.Tensor:
        raise NotImplementedError

    def sample(self) -> torch.Tensor:
        raise NotImplementedError


class Gaussian(Likelihood):
    """Independent Gaussians with a shared sigma: fixed, learned, or set to its optimum from the data.

    log p = -1/2 sum((x - mu)^2 / sigma^2 + log(2 pi sigma^2)).
    `log_sigma` is a scalar or broadcastable tensor; `optimal` = "batch" or "image" replaces it, at log_prob time, by
    the analytic optimum sigma*^2 = mean((x - mu)^2) over the batch or over each image (sigma-VAE, Rybkin et al.).
    Learned and optimal sigmas are clamped below at log(min_sigma) so a perfect fit cannot send the density to inf.
    """

    def __init__(self, mu: torch.Tensor, log_sigma: torch.Tensor | float = 0.0, *, optimal: str | None = None,
                 min_sigma: float = 1e-3):
        self.mu = mu
        self.optimal = optimal
        self.min_log_sigma = math.log(min_sigma)
        self.log_sigma = torch.as_tensor(log_sigma, dtype=torch.float32, device=mu.device)

    def optimal_log_sigma(self, x: torch.Tensor) -> torch.Tensor:
        """log sigma* = log sqrt(mean squared error), over the batch or per image; clamped at log(min_sigma)."""
        sq = (x.float() - self.mu.float()) ** 2
        mse = sq.mean() if self.optimal == "batch" else sq.flatten(1).mean(1).view(-1, 1, 1, 1)
        # clamp before the log: log(0) at an exact fit would give 0 * inf = NaN gradients through a clamp after it
        return 0.5 * torch.log(mse.clamp(min=math.exp(2 * self.min_log_sigma)))

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        log_sigma = (self.optimal_log_sigma(x) if self.optimal else self.log_sigma).float().reshape(-1)  # (1,) or (B,)
        sse = (x.float() - self.mu.float()).square_().flatten(1).sum(1)  # (B,)
        return -0.5 * sse * torch.exp(-2 * log_sigma) - x[0].numel() * (log_sigma + 0.5 * LOG_2PI)

    @property
    def mean(self) -> torch.Tensor:
        return self.mu

    def sample(self) -> torch.Tensor:
        if self.optimal:
            raise ValueError("an optimal-sigma Gaussian has a sigma only relative to data; use .mean")
        return self.mu + torch.exp(self.log_sigma) * torch.randn_like(self.mu)


class Bernoulli(Likelihood):
    """Independent Bernoullis with logits: log p = -BCE(logits, x). For x in (0, 1) a training objective, not a density."""

    name = "bernoulli"  # logits; binary cross-entropy (the deck's second decoder)
    support = "none"

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    @classmethod
    def from_decoder(cls, raw: torch.Tensor, params: nn.Module | None, settings: LikelihoodSettings, *,
                     training: bool) -> "Likelihood":
        return cls(raw)  # the raw outputs are the logits

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return -_sum_per_item(F.binary_cross_entropy_with_logits(self.logits.float(), x.float(), reduction="none"))

    @property
    def mean(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    def sample(self) -> torch.Tensor:
        return torch.bernoulli(self.mean)


class ContinuousBernoulli(Likelihood):
    """The continuous Bernoulli on [0, 1] (Loaiza-Ganem & Cunningham 2019), parameterised by logits eta.

    p(x|l) = C(l) l^x (1-l)^(1-x), l = sigmoid(eta), C(l) = 2 atanh(1 - 2l) / (1 - 2l) = eta / tanh(eta / 2).
    Near eta = 0 (l = 1/2) the closed form is 0/0, so a Taylor series is used there and the singular branch is fed a
    safe value so its gradient stays finite.
    """

    name = "continuous_bernoulli"  # the normalised Bernoulli on [0, 1]
    TAYLOR_BELOW = 1e-2  # |eta| below which the Taylor series replaces the closed form (error O(eta^6) ~ 1e-13)

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    @classmethod
    def from_decoder(cls, raw: torch.Tensor, params: nn.Module | None, settings: LikelihoodSettings, *,
                     training: bool) -> "Likelihood":
        return cls(raw)  # the raw outputs are the logits eta

    def log_normalizer(self) -> torch.Tensor:
        """log C per pixel, same shape as the logits."""
        eta = self.logits.float()
        near = eta.abs() < self.TAYLOR_BELOW
        safe = torch.where(near, torch.full_like(eta, self.TAYLOR_BELOW), eta)
        exact = torch.log(safe.abs()) - torch.log(torch.tanh(safe.abs() / 2))
        t = torch.tanh(eta / 2) / 2  # = l - 1/2
        taylor = math.log(2) + (4 / 3) * t**2 + (104 / 45) * t**4
        return torch.where(near, taylor, exact)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(self.logits.float(), x.float(), reduction="none")
        return _sum_per_item(self.log_normalizer() - bce)

    @property
    def mean(self) -> torch.Tensor:
        """E[x] = 1 / (1 - exp(-eta)) - 1 / eta; 1/2 + eta/12 near eta = 0. (Not sigmoid(eta).)"""
        eta = self.logits.float()
        near = eta.abs() < self.TAYLOR_BELOW
        safe = torch.where(near, torch.full_like(eta, self.TAYLOR_BELOW), eta)
        exact = 0.5 + 0.5 / torch.tanh(safe / 2) - 1 / safe  # = 1 / (1 - exp(-eta)) - 1 / eta, finite gradients
        return torch.where(near, 0.5 + eta / 12, exact)

    def sample(self) -> torch.Tensor:
        """Inverse-CDF sample, in a form stable for every eta: log1p(u expm1(eta)) / eta for eta < 0, and
        1 + log1p((1 - u) expm1(-eta)) / eta for eta > 0 (the same value; expm1 of a negative number never overflows)."""
        eta = self.logits.float()
        u = torch.rand_like(eta)
        near = eta.abs() < 1e-6  # there the density is uniform to within 1e-6
        safe = torch.where(near, torch.ones_like(eta), eta)
        neg = torch.log1p(u * torch.expm1(-safe.abs())) / -safe.abs()
        pos = 1 + torch.log1p((1 - u) * torch.expm1(-safe.abs())) / safe.abs()
        x = torch.where(safe < 0, neg, pos)
        return torch.where(near, u, x).clamp(0, 1)


class DiscretizedLogistic(Likelihood):
    """A logistic per pixel, integrated over the 256 bins of 8-bit data (PixelCNN++'s likelihood, on [0, 1] data).

    x must lie on the grid k/255. The bins at 0 and 1 take the mass of the tails, so the 256 probabilities sum to 1
    and log_prob is the log-probability of the 8-bit image itself: bits/dim need no dequantisation term.
    """

    name = "discretized_logistic"  # 256-bin likelihood of 8-bit data: directly a bits/dim figure
    outputs_per_channel = 2  # a location and a log-scale per pixel
    support = "discrete"
    HALF_BIN = 0.5 / 255

    def __init__(self, mu: torch.Tensor, log_scale: torch.Tensor, *, min_scale: float = 1e-3):
        self.mu = mu.float()
        self.log_scale = log_scale.float().clamp(min=math.log(min_scale))  # a bin is 1/255 = 3.9e-3 wide

    @classmethod
    def from_decoder(cls, raw: torch.Tensor, params: nn.Module | None, settings: LikelihoodSettings, *,
                     training: bool) -> "Likelihood":
        mu, log_scale = raw.chunk(2, dim=1)  # (B, C, H, W) each
        return cls(torch.sigmoid(mu), log_scale, min_scale=settings.min_sigma)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        inv_s = torch.exp(-self.log_scale)
        plus = (x - self.mu + self.HALF_BIN) * inv_s
        minus = (x - self.mu - self.HALF_BIN) * inv_s
        log_cdf_plus = -F.softplus(-plus)  # log sigmoid(plus): the mass below the top edge (bin 0)
        log_one_minus_cdf_minus = -F.softplus(minus)  # log (1 - sigmoid(minus)): the mass above the bottom edge (bin 255)
        # sigmoid(a) - sigmoid(b) = sigmoid(a) sigmoid(-b) (1 - exp(-(a - b))): exact, and accurate at every scale
        log_mid = log_cdf_plus + log_one_minus_cdf_minus + torch.log(-torch.expm1(-2 * self.HALF_BIN * inv_s))
        lp = torch.where(x < self.HALF_BIN, log_cdf_plus, torch.where(x > 1 - self.HALF_BIN, log_one_minus_cdf_minus, log_mid))
        return _sum_per_item(lp)

    @property
    def mean(self) -> torch.Tensor:
        return self.mu.clamp(0, 1)

    def sample(self) -> torch.Tensor:
        u = torch.rand_like(self.mu).clamp(1e-6, 1 - 1e-6)
        x = self.mu + torch.exp(self.log_scale) * (torch.log(u) - torch.log1p(-u))
        return torch.round(x.clamp(0, 1) * 255) / 255


class GaussianFixed(Gaussian):
    """The Gaussian with the config's fixed `sigma` (the deck's MSE decoder); mean sigmoid(raw)."""

    name = "gaussian"

    @classmethod
    def from_decoder(cls, raw: torch.Tensor, params: nn.Module | None, settings: LikelihoodSettings, *,
                     training: bool) -> "Likelihood":
        return cls(torch.sigmoid(raw), math.log(settings.sigma))


class LearnedSigma(nn.Module):
    """One log-sigma shared by every pixel, learned with the network; starts at log(0.1) pixel units."""

    def __init__(self) -> None:
        super().__init__()
        self.log_sigma = nn.Parameter(torch.tensor(math.log(0.1)))


class GaussianLearned(Gaussian):
    """The Gaussian with one learned sigma, clamped below at min_sigma."""

    name = "gaussian_learned"

    params = LearnedSigma
    @classmethod
    def from_decoder(cls, raw: torch.Tensor, params: nn.Module | None, settings: LikelihoodSettings, *,
                     training: bool) -> "Likelihood":
        assert isinstance(params, LearnedSigma)
        return cls(torch.sigmoid(raw), params.log_sigma.clamp(min=math.log(settings.min_sigma)))


class RunningSigma(nn.Module):
    """A running estimate of the batches' optimal log sigma (the mean of the first 100 batches, then momentum 0.01).

    Training scores each batch with its own optimal sigma; a sigma computed from the x being scored would not make
    p(x|z) a density of x, so evaluation (eval mode) uses this estimate instead, as BatchNorm does with its
    statistics: a fixed sigma, a normalised density, per-image numbers.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("running_log_sigma", torch.tensor(0.0))
        self.register_buffer("running_count", torch.tensor(0, dtype=torch.long))

    @torch.no_grad()
    def update(self, mean: torch.Tensor, x: torch.Tensor) -> None:
        """Fold in one batch: its optimal log sigma, 1/2 log mean((x - mean)^2) over the whole batch."""
        batch = 0.5 * torch.log(((x.float() - mean.float()) ** 2).mean().clamp(min=1e-12))
        weight = torch.clamp(1.0 / (self.running_count.float() + 1), min=0.01)
        self.running_log_sigma.lerp_(batch, weight)
        self.running_count += 1


class GaussianOptimal(Gaussian):
    """sigma-VAE: sigma set to its analytic optimum over the batch while training, a running estimate of it in eval."""

    name = "gaussian_optimal"
    OPTIMAL = "batch"  # over what the optimum is taken: "batch" or "image"
    running: RunningSigma | None = None

    params = RunningSigma
    @classmethod
    def from_decoder(cls, raw: torch.Tensor, params: nn.Module | None, settings: LikelihoodSettings, *,
                     training: bool) -> "Likelihood":
        assert isinstance(params, RunningSigma)
        mu = torch.sigmoid(raw)
        if not training:
            return cls(mu, params.running_log_sigma.clamp(min=math.log(settings.min_sigma)))
        likelihood = cls(mu, optimal=cls.OPTIMAL, min_sigma=settings.min_sigma)
        likelihood.running = params
        return likelihood

    def observe(self, x: torch.Tensor) -> None:
        if self.running is not None:
            self.running.update(self.mean, x)


class GaussianOptimalPerImage(GaussianOptimal):
    """sigma-VAE with the optimum taken per image while training."""

    name = "gaussian_optimal_per_image"
    OPTIMAL = "image"


# The table of likelihoods: config name -> class. A new likelihood is one class above and one line here (or, from
# outside the package, `LIKELIHOODS[MyLikelihood.name] = MyLikelihood`). It feeds config validation, the model,
# evaluation, the command line's help and the Makefile's compare-demo.
LIKELIHOODS: dict[str, type[Likelihood]] = {cls.name: cls for cls in (
    GaussianFixed,  # fixed sigma (the deck's MSE decoder)
    GaussianLearned,  # one learned log-sigma shared by all pixels
    GaussianOptimal,  # analytic optimal sigma per batch (sigma-VAE)
    GaussianOptimalPerImage,  # analytic optimal sigma per image
    Bernoulli,  # logits; binary cross-entropy (the deck's second decoder)
    ContinuousBernoulli,  # the normalised Bernoulli on [0, 1]
    DiscretizedLogistic,  # 256-bin likelihood of 8-bit data: directly a bits/dim figure
)}
