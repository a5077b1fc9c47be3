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
SQRT_HALF = math.sqrt(0.5)
LEVELS = 256  # 8-bit data: level k is stored as k/255 and owns the bin [k/256, (k+1)/256), which contains k/255


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

    def select(self, index: slice) -> "DiagonalGaussian":
        """The posterior of some of the images, e.g. select(slice(0, 4))."""
        return DiagonalGaussian(self.mean[index], self.logvar[index])

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
    `from_decoder` (how it is built from the decoder's raw output and those parameters). `support` says whether it
    has a probability of 8-bit images:

    - "continuous": a normalised density on [0, 1] (or on the real line) with a CDF; `log_prob_8bit` integrates it
      over each pixel's bin;
    - "discrete": a probability mass over the 256 levels of 8-bit data: `log_prob` is already `log_prob_8bit`;
    - "none": not a normalised density of [0, 1] data (Bernoulli on grey levels): no 8-bit probability.
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

    @classmethod
    def has_8bit(cls) -> bool:
        """Whether the class gives a probability of the 8-bit image (`log_prob_8bit`), so figures in bits/dim."""
        return cls.support != "none" and cls.log_prob_8bit is not Likelihood.log_prob_8bit

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x|z), the density (or mass) that training optimises, nats per image (B,)."""
        raise NotImplementedError

    def log_prob_8bit(self, x: torch.Tensor) -> torch.Tensor:
        """log P(x|z) of the 8-bit image x (pixels k/255), nats per image (B,): each pixel's probability is the
        likelihood's mass on its bin, [k/256, (k+1)/256), the two edge bins open to -inf and +inf, so that the 256
        probabilities sum to 1 and -log P >= 0."""
        raise NotImplementedError(f"{type(self).__name__} has no 8-bit probability")

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
        # A number is filled in on the device: torch.as_tensor would copy it from the host, a sync on a GPU every step.
        self.log_sigma = (log_sigma.to(device=mu.device, dtype=torch.float32) if torch.is_tensor(log_sigma)
                          else torch.full((), float(log_sigma), device=mu.device))  # float32, torch's default

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

    def log_prob_8bit(self, x: torch.Tensor) -> torch.Tensor:
        """log (Phi(b) - Phi(a)) summed over pixels, (a, b) each pixel's bin in standard units; nats per image (B,)."""
        log_sigma = self.optimal_log_sigma(x) if self.optimal else self.log_sigma  # () or (B, 1, 1, 1)
        return _sum_per_item(gaussian_bin_log_mass(x, self.mu, log_sigma))

    @property
    def mean(self) -> torch.Tensor:
        return self.mu

    def sample(self) -> torch.Tensor:
        if self.optimal:
            raise ValueError("an optimal-sigma Gaussian has a sigma only relative to data; use .mean")
        return self.mu + torch.exp(self.log_sigma) * torch.randn_like(self.mu)


def _log1mexp(d: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(d)) for d <= 0, accurate at both ends (Maechler's switch at -ln 2)."""
    return torch.where(d > -math.log(2), torch.log(-torch.expm1(d)), torch.log1p(-torch.exp(d)))


SERIES_BELOW = 0.1  # bins narrower than this in w * (1 + |c|) use the series; its first omitted term is ~1e-12


def gaussian_bin_log_mass(x: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """log P(pixel's bin) under N(mu, sigma^2) per pixel, same shape as x: log(Phi(b) - Phi(a)), with bin k =
    [k/256, (k+1)/256) for x = k/255, and the bins of 0 and 255 open to -inf and +inf.

    In float32 at least (float64 stays float64). A narrow bin (width w and centre c in standard units, w (1 + |c|) <
    0.1: nearly every pixel of a smooth decoder) uses the exact series of the integral around its centre,
    log(phi(c) w) + log(1 + (c^2 - 1) w^2 / 24 + (c^4 - 6 c^2 + 3) w^4 / 1920): a few multiplications, no
    cancellation. The others are taken in the lower tail (by symmetry, 1 - Phi(a) = Phi(-a)): a difference of erfc
    there, and log Phi(v) + log(1 - exp(log Phi(u) - log Phi(v))) beyond 10 sigmas, where erfc would underflow.
    Where wide bins are few, they alone take the costly path (a boolean index; evaluation reads their count from the
    device anyway); where they are many, both paths run everywhere and are blended arithmetically (torch.where is
    ~20x slower than a multiply on the CPU).
    """
    dtype = torch.promote_types(mu.dtype, torch.float32)
    mu = mu.to(dtype)
    k = torch.round(x.to(dtype) * (LEVELS - 1)).clamp_(0, LEVELS - 1)  # (B, C, H, W) levels 0..255
    inv_s = torch.exp(-torch.as_tensor(log_sigma, dtype=dtype, device=mu.device))  # () or broadcastable
    w = inv_s / LEVELS  # the bin width in standard deviations
    c = (k + 0.5).div_(LEVELS).sub_(mu).mul_(inv_s)  # the nominal bin centre, in standard deviations from the mean
    first, last = (k == 0).to(dtype), (k == LEVELS - 1).to(dtype)  # the open edge bins
    wide = (c.abs().add_(1).mul_(w) >= SERIES_BELOW).to(dtype).add_(first).add_(last).clamp_(max=1)  # 1: wide
    n_wide = int(wide.sum())
    if n_wide == 0:
        return _gaussian_series(c, w)
    if n_wide == k.numel():
        return _gaussian_wide(k, mu, inv_s)
    lp = _gaussian_series(c, w)
    if n_wide > WIDE_PICKED_BELOW * k.numel():  # many wide bins: both paths everywhere, blended, beat an index
        return torch.lerp(lp, _gaussian_wide(k, mu, inv_s), wide)  # exactly one or the other (weights 0 and 1)
    picked = wide.bool()  # the few wide bins of a mostly smooth decoder: the costly path for those alone
    k, mu, inv_s = torch.broadcast_tensors(k, mu, inv_s)  # views, each of lp's shape
    lp[picked] = _gaussian_wide(k[picked], mu[picked], inv_s[picked])
    return lp


def _gaussian_wide(k: torch.Tensor, mu: torch.Tensor, inv_s: torch.Tensor) -> torch.Tensor:
    """log P(bin k) under N(mu, 1 / inv_s^2), any bin width (levels k, the edge bins open), via _gaussian_tail_mass."""
    lo = (k / LEVELS).sub_((k == 0).to(k.dtype) * FAR)  # bin edges in pixel units, the open ends 1e30 away
    hi = ((k + 1) / LEVELS).add_((k == LEVELS - 1).to(k.dtype) * FAR)
    return _gaussian_tail_mass((lo - mu) * inv_s, (hi - mu) * inv_s)


WIDE_PICKED_BELOW = 0.2  # below this share of wide bins, they are picked out by index (measured: 1.5x at 1%)
FAR = 1e30  # an open bin end, in pixel units: Phi of it is 0 or 1 exactly, and it stays finite times 1/sigma
TAIL_BELOW = -10.0  # bins wholly this many sigmas below the mean (by symmetry: either side) go through log-CDFs


def _gaussian_series(c: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """log(Phi(c + w/2) - Phi(c - w/2)) for narrow bins, by the series around the centre c (both in sigmas)."""
    q = c.square()
    w2 = w * w
    t = (w2 * w2 / 1920 * q + (w2 / 24 - w2 * w2 / 320)).mul_(q).add_(w2 * w2 / 640 - w2 / 24)  # the series - 1
    return t.mul(1 - 0.5 * t).sub_(0.5 * q).add_(torch.log(w) - 0.5 * LOG_2PI)  # log1p(t) = t - t^2/2 + O(4e-11)


def _gaussian_tail_mass(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(Phi(b) - Phi(a)) for a < b in standard units, through the lower tail: u = min(a, -b) < v = min(b, -a).

    There Phi(v) - Phi(u) = (erfc(-v/sqrt 2) - erfc(-u/sqrt 2)) / 2 loses at most a factor 1 / (1 - Phi(u) / Phi(v))
    <= 20 to rounding for a wide bin; beyond 10 sigmas (erfc underflows) log-CDFs take over. Never -inf: a bin whose
    mass underflows both ways gets -1e30.
    """
    u, v = torch.minimum(a, -b), torch.minimum(b, -a)  # Phi(b) - Phi(a) = Phi(-a) - Phi(-b)
    lp = torch.log(torch.special.erfc(v * -SQRT_HALF).sub_(torch.special.erfc(u * -SQRT_HALF)).mul_(0.5))
    far = v < TAIL_BELOW  # erfc would underflow (float32) or lose its last digits
    if far.any():
        log_v = torch.special.log_ndtr(v[far])
        lp[far] = log_v + _log1mexp(torch.special.log_ndtr(u[far]) - log_v)
    return lp.clamp_(min=-FAR)


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


def _log_abs_expm1(y: torch.Tensor) -> torch.Tensor:
    """log|exp(y) - 1|, without overflow for large y and accurate for small |y| (y != 0)."""
    return y.clamp(min=0) + torch.log(-torch.expm1(-y.abs()))


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
        eta = _at_least_float32(self.logits)
        near = eta.abs() < self.TAYLOR_BELOW
        safe = torch.where(near, torch.full_like(eta, self.TAYLOR_BELOW), eta)
        exact = torch.log(safe.abs()) - torch.log(torch.tanh(safe.abs() / 2))
        t = torch.tanh(eta / 2) / 2  # = l - 1/2
        taylor = math.log(2) + (4 / 3) * t**2 + (104 / 45) * t**4
        return torch.where(near, taylor, exact)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(_at_least_float32(self.logits), _at_least_float32(x), reduction="none")
        return _sum_per_item(self.log_normalizer() - bce)

    def log_prob_8bit(self, x: torch.Tensor) -> torch.Tensor:
        """The mass on each pixel's bin [a, a + w), a = k/256, w = 1/256, from the CDF F(x) = expm1(eta x) / expm1(eta):
        log P = eta a + log|expm1(eta w)| - log|expm1(eta)|; log w + eta (a + w/2 - 1/2) near eta = 0 (error eta^2)."""
        eta = _at_least_float32(self.logits)
        lo = torch.round(x.to(eta.dtype) * (LEVELS - 1)).clamp_(0, LEVELS - 1) / LEVELS  # (B, C, H, W) bin starts
        near = eta.abs() < 1e-6
        safe = torch.where(near, torch.ones_like(eta), eta)
        exact = safe * lo + _log_abs_expm1(safe / LEVELS) - _log_abs_expm1(safe)
        taylor = eta * (lo + 0.5 / LEVELS - 0.5) - math.log(LEVELS)
        return _sum_per_item(torch.where(near, taylor, exact))

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


def _selects_in_place(t: torch.Tensor) -> bool:
    """Whether a boolean index may pick the pixels that need more work: in eager mode on the CPU. A boolean index on
    an accelerator reads the device (a sync per training step), and a traced graph (torch.compile, ONNX export)
    cannot branch on the data."""
    return t.device.type == "cpu" and not (torch.compiler.is_compiling() or torch.compiler.is_exporting())


def _window_level_sum(t: torch.Tensor, s1: torch.Tensor, half: int = 20) -> torch.Tensor:
    """sum_{j=1..255} sigmoid((t + 1/2 - j) / s1) for s1 < 1, on flat tensors: the levels j within `half` of t
    directly, those below that window counted as 1, those above as 0 (each off by at most e^-19.5)."""
    m = torch.round(t).clamp(-half - 1, LEVELS + half)
    total = (m - half - 1).clamp(0, LEVELS - 1)  # j = 1 .. m - half - 1
    for offset in range(-half, half + 1):
        j = m + offset
        term = torch.sigmoid((t + 0.5 - j) / s1)
        total += torch.where((j >= 1) & (j <= LEVELS - 1), term, torch.zeros_like(term))
    return total


class DiscretizedLogistic(Likelihood):
    """A logistic per pixel, integrated over the 256 bins of 8-bit data (PixelCNN++'s likelihood, on [0, 1] data).

    x must lie on the grid k/255. The bins are centred on the levels (k/255 +- 1/510, PixelCNN++'s convention), the
    bins at 0 and 1 take the mass of the tails, so the 256 probabilities sum to 1 and log_prob is the log-probability
    of the 8-bit image itself: it is also `log_prob_8bit`, and bits/dim need no dequantisation term.
    """

    name = "discretized_logistic"  # 256-bin likelihood of 8-bit data: directly a bits/dim figure
    outputs_per_channel = 2  # a location and a log-scale per pixel
    support = "discrete"
    HALF_BIN = 0.5 / 255

    def __init__(self, mu: torch.Tensor, log_scale: torch.Tensor, *, min_scale: float = 1e-3):
        self.mu = _at_least_float32(mu)
        self.log_scale = _at_least_float32(log_scale).clamp(min=math.log(min_scale))  # a bin is 1/255 = 3.9e-3 wide

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

    def log_prob_8bit(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_prob(x)

    @property
    def mean(self) -> torch.Tensor:
        """The mean of the 256-level distribution, sum_k (k/255) P(k), (B, C, H, W): not the location mu.

        In units of levels, 255 E = sum_{j=1..255} P(K >= j) = sum_j sigmoid((t + 1/2 - j) / s'), t = 255 mu,
        s' = 255 s. For s' >= 1 (a scale of one level or more) the Euler-Maclaurin formula (midpoint form, two
        corrections) gives the mean to within 4e-8 (1e-5 of a level): the integral
        s' (softplus(t / s') - softplus((t - 255) / s')), then (g(hi) - g(lo)) / (24 s') - 7 (h(hi) - h(lo)) /
        (5760 s'^3), g = p(1 - p), h = g (1 - 6 g), p = sigmoid at the ends. Below, the few levels within 20 s' of
        t are summed directly (the rest are 0 or 1 to 1e-9).
        """
        t, s1 = self.mu * (LEVELS - 1), torch.exp(self.log_scale) * (LEVELS - 1)  # in levels
        p_lo, p_hi = torch.sigmoid(t / s1), torch.sigmoid((t - (LEVELS - 1)) / s1)
        g_lo, g_hi = p_lo * (1 - p_lo), p_hi * (1 - p_hi)
        levels = s1 * (F.softplus(t / s1) - F.softplus((t - (LEVELS - 1)) / s1)) + (g_hi - g_lo) / (24 * s1) \
            - 7 * (g_hi * (1 - 6 * g_hi) - g_lo * (1 - 6 * g_lo)) / (5760 * s1**3)
        sharp = s1 < 1
        if _selects_in_place(t):  # the window sum only where it is needed; on the CPU that reads no device
            levels[sharp] = _window_level_sum(t[sharp], s1[sharp])
        else:  # an accelerator (a boolean index would wait for it) or a traced graph: every pixel takes both formulas
            levels = torch.where(sharp, _window_level_sum(t, s1.clamp(max=1)), levels)
        return levels / (LEVELS - 1)

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
    statistics: a fixed sigma, a normalised density, per-image numbers. It tracks the batch optimum
    sqrt(mean squared error) for both optimal variants: the one fixed sigma that maximises the batch's density. For
    gaussian_optimal_per_image that is not what training used (each image its own sigma, whose geometric mean is
    lower); no fixed sigma can be that, and this one scores the data best.
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
