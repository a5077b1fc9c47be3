"""The posterior q(z|x) and the decoder likelihoods p(x|z). Every log-probability is in nats per image, (B,).

Shapes: images x are float (B, C, H, W) in [0, 1]; latents z are (B, latent_dim).
Sums are taken in float32 at least, whatever precision the network ran in.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

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

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) in closed form, nats per image: -1/2 sum(1 + logvar - mean^2 - exp(logvar))."""
        return -0.5 * (1 + self.logvar - self.mean**2 - self.logvar.exp()).sum(-1)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) in nats, summed over the last dimension."""
    return -0.5 * (z.float() ** 2 + LOG_2PI).sum(-1)


class Likelihood:
    """p(x|z) for a batch of images. Subclasses set `support`, which decides how bits/dim are reported:

    - "continuous": a normalised density on [0, 1] (or on the real line): -log P(8-bit x) ~ -log p(x) + D ln 256
      (uniform dequantisation; exact as a bound for the dequantised expectation);
    - "discrete": a probability mass over the 256 levels of 8-bit data: -log P(x) directly;
    - "none": not a normalised density of [0, 1] data (Bernoulli on grey levels): no bits/dim.
    """

    support = "continuous"

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

    support = "none"

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

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

    TAYLOR_BELOW = 1e-2  # |eta| below which the Taylor series replaces the closed form (error O(eta^6) ~ 1e-13)

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

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

    support = "discrete"
    HALF_BIN = 0.5 / 255

    def __init__(self, mu: torch.Tensor, log_scale: torch.Tensor, *, min_scale: float = 1e-3):
        self.mu = mu.float()
        self.log_scale = log_scale.float().clamp(min=math.log(min_scale))  # a bin is 1/255 = 3.9e-3 wide

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
