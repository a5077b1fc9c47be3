"""Exact 8-bit likelihoods: each likelihood's mass on the bins of 8-bit pixels, against high-precision and closed-form
references, the mean of the discretised logistic, and the flaw they remove (bits/dim below 0 for sharp decoders)."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from scipy import integrate, stats
from torch import nn

from facevae import distributions
from facevae.config import Config
from facevae.data import open_dataset
from facevae.distributions import (
    Bernoulli,
    ContinuousBernoulli,
    DiscretizedLogistic,
    Gaussian,
    gaussian_bin_log_mass,
)
from facevae.evaluate import evaluate
from facevae.model import VAE

LEVELS = torch.arange(256, dtype=torch.float64) / 255  # every 8-bit pixel value
MEANS = [-0.5, -0.01, 0.0, 0.3, 0.5, 0.77, 1.0, 1.2, 3.0]
SIGMAS = [1e-5, 1e-4, 1e-3, 3e-3, 0.01, 0.05, 0.15, 1.0, 10.0, 1e3]


def _bin(k: int) -> tuple[float, float]:
    """Bin k of 8-bit data: [k/256, (k+1)/256), the edge bins open."""
    return (-math.inf if k == 0 else k / 256), (math.inf if k == 255 else (k + 1) / 256)


def _mp_log_mass(k: int, mu: float, sigma: float) -> float:
    """log(Phi(b) - Phi(a)) in 60-digit arithmetic, taken in the lower tail (no cancellation), as a reference."""
    with mpmath.workdps(60):
        lo, hi = _bin(k)
        a = (mpmath.mpf(lo) - mpmath.mpf(mu)) / mpmath.mpf(sigma)
        b = (mpmath.mpf(hi) - mpmath.mpf(mu)) / mpmath.mpf(sigma)
        if a + b > 0:
            a, b = -b, -a
        return float(mpmath.log(mpmath.ncdf(b) - mpmath.ncdf(a)))


def _gaussian_levels(mu: float, sigma: float, dtype: torch.dtype) -> torch.Tensor:
    """log P(k) for the 256 levels under N(mu, sigma^2), (256,) float64."""
    m = torch.full((256,), mu, dtype=dtype)
    return gaussian_bin_log_mass(LEVELS.to(dtype), m, torch.tensor(math.log(sigma), dtype=dtype)).double()


# ---------------------------------------------------------------- the Gaussian
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, 1e-6)])
def test_gaussian_masses_sum_to_one(dtype, tol):
    """Means inside and outside [0, 1], sigmas from 1e-5 to 1e3: the 256 probabilities sum to 1."""
    for mu in MEANS:
        for sigma in SIGMAS:
            lp = _gaussian_levels(mu, sigma, dtype)
            assert (lp <= 1e-6).all()
            assert abs(torch.logsumexp(lp, 0).item()) < tol, (mu, sigma)


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-10), (torch.float32, 5e-6)])
def test_gaussian_against_high_precision(dtype, rel):
    """Every 15th level, every mean and sigma: log P(k) against 60-digit arithmetic (float32 parameters as rounded)."""
    for mu in MEANS:
        for sigma in SIGMAS:
            lp = _gaussian_levels(mu, sigma, dtype)
            mu_r = torch.tensor(mu, dtype=dtype).item()  # the reference takes the parameters the code saw
            sigma_r = torch.tensor(math.log(sigma), dtype=dtype).exp().item()
            for k in range(0, 256, 15):
                expected = _mp_log_mass(k, mu_r, sigma_r)
                assert lp[k].item() == pytest.approx(expected, rel=rel, abs=rel), (mu, sigma, k)


def test_gaussian_against_scipy_where_direct_differences_are_accurate():
    """A direct float64 computation, norm.cdf(b) - norm.cdf(a) (or sf in the upper half), where it is well
    conditioned; per pixel on a batch with a shared and with a per-image sigma."""
    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, 1, 6, 6)).double() / 255
    mu = (x + 0.02 * torch.randn_like(x)).clamp(0, 1)
    for log_sigma in (torch.tensor(math.log(0.01), dtype=torch.float64),
                      torch.tensor([math.log(0.004), math.log(0.05)], dtype=torch.float64).view(2, 1, 1, 1)):
        lp = gaussian_bin_log_mass(x, mu, log_sigma)
        sigma = log_sigma.exp().expand_as(x)
        for i in np.ndindex(*x.shape):
            lo, hi = _bin(round(x[i].item() * 255))
            m, s = mu[i].item(), sigma[i].item()
            mass = (stats.norm.cdf(hi, m, s) - stats.norm.cdf(lo, m, s) if (lo + hi) / 2 <= m
                    else stats.norm.sf(lo, m, s) - stats.norm.sf(hi, m, s))
            assert lp[i].item() == pytest.approx(math.log(mass), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("sigmas", [(0.5, 0.8), (0.03, 0.05)])  # few wide bins (picked out), many (blended)
def test_gaussian_few_and_many_wide_bins_with_a_sigma_per_image(sigmas):
    """The wide bins are picked out by index when they are few and blended when many: every pixel against the
    60-digit reference either way, with a sigma per image broadcast over its pixels."""
    torch.manual_seed(1)
    x = torch.randint(0, 256, (2, 1, 5, 5)).double() / 255
    x[0, 0, 0, 0], x[1, 0, 0, 0] = 0, 1  # an open edge bin in each image: always wide
    mu = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    log_sigma = torch.tensor([math.log(s) for s in sigmas], dtype=torch.float64).view(2, 1, 1, 1)
    lp = gaussian_bin_log_mass(x, mu, log_sigma)
    for i in np.ndindex(*x.shape):
        expected = _mp_log_mass(round(x[i].item() * 255), mu[i].item(), sigmas[i[0]])
        assert lp[i].item() == pytest.approx(expected, rel=1e-10, abs=1e-10), i


def test_gaussian_series_and_tails_meet():
    """Around the switch from the series (narrow bins) to log-CDFs, the two agree: no jump in log P."""
    sigma = 0.05  # w = 1 / (256 sigma) = 0.078: the switch falls at |c| = 0.28 on both sides of the mean
    mus = torch.linspace(0.25, 0.55, 3001, dtype=torch.float64)
    lp = gaussian_bin_log_mass(torch.full_like(mus, 100 / 255), mus, torch.tensor(math.log(sigma), dtype=torch.float64))
    third = torch.diff(lp, n=3)  # nearly a parabola: tiny third differences; a jump J between methods would show as J
    assert third.abs().max() < 1e-10
    for s in (0.05, 0.1, 0.3):  # and at the switch itself, against the reference
        c = 0.1 * 256 * s - 1  # w (1 + |c|) = 0.1, w = 1 / (256 s)
        for mu in ((100.5 / 256) + sign * (c + side) * s for sign in (-1, 1) for side in (-1e-9, 1e-9)):
            got = gaussian_bin_log_mass(torch.tensor([100 / 255], dtype=torch.float64), torch.tensor([mu], dtype=torch.float64),
                                        torch.tensor(math.log(s), dtype=torch.float64))
            assert got.item() == pytest.approx(_mp_log_mass(100, mu, s), rel=1e-11)


def test_gaussian_log_prob_8bit_sums_pixels_and_uses_each_sigma():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (3, 1, 4, 4)).float() / 255
    mu = torch.rand(3, 1, 4, 4)
    lik = Gaussian(mu, math.log(0.05))
    expected = gaussian_bin_log_mass(x, mu, torch.tensor(math.log(0.05))).flatten(1).sum(1)
    assert torch.allclose(lik.log_prob_8bit(x), expected)
    per_image = Gaussian(mu, optimal="image")  # the sigma log_prob would use, per image
    expected = gaussian_bin_log_mass(x, mu, per_image.optimal_log_sigma(x)).flatten(1).sum(1)
    assert torch.allclose(per_image.log_prob_8bit(x), expected)
    assert (lik.log_prob_8bit(x) < 0).all()


# ---------------------------------------------------------------- the continuous Bernoulli
def _cb_bin(k: int, eta: float) -> mpmath.mpf:
    """F((k+1)/256) - F(k/256) from the closed-form CDF F(x) = (exp(eta x) - 1) / (exp(eta) - 1) (x for eta = 0)."""
    a, b = mpmath.mpf(k) / 256, mpmath.mpf(k + 1) / 256
    return b - a if eta == 0 else (mpmath.exp(eta * b) - mpmath.exp(eta * a)) / mpmath.expm1(mpmath.mpf(eta))


@pytest.mark.parametrize("eta", [-300.0, -20.0, -1.0, -1e-4, -1e-7, 0.0, 3e-7, 1e-3, 2.0, 50.0, 500.0])
def test_continuous_bernoulli_against_its_cdf(eta):
    """log(F((k+1)/256) - F(k/256)) in 120-digit arithmetic; the 256 masses sum to 1, in float64 and float32."""
    with mpmath.workdps(120):
        expected = torch.tensor([float(mpmath.log(_cb_bin(k, eta))) for k in range(256)], dtype=torch.float64)
    for dtype, rel in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
        lik = ContinuousBernoulli(torch.full((256, 1), eta, dtype=dtype))
        lp = lik.log_prob_8bit(LEVELS.view(256, 1).to(dtype)).double()
        assert torch.allclose(lp, expected, rtol=rel, atol=rel), dtype
        assert abs(torch.logsumexp(lp, 0).item()) < 10 * rel


@pytest.mark.parametrize("eta", [-4.0, 0.3, 7.0])
def test_continuous_bernoulli_bins_integrate_its_density(eta):
    """The mass of a bin equals the integral of exp(log_prob) over it (numerical quadrature)."""
    lik = ContinuousBernoulli(torch.tensor([[eta]], dtype=torch.float64))

    def density(x: float) -> float:
        return math.exp(lik.log_prob(torch.tensor([[x]], dtype=torch.float64)).item())

    for k in (0, 37, 128, 255):
        mass, _ = integrate.quad(density, k / 256, (k + 1) / 256, epsabs=0, epsrel=1e-12)
        got = lik.log_prob_8bit(torch.tensor([[k / 255]], dtype=torch.float64)).item()
        assert got == pytest.approx(math.log(mass), rel=1e-9)


# ---------------------------------------------------------------- the discretised logistic, the Bernoulli
def _logistic_mean(mu: float, s: float) -> float:
    """sum_k (k/255) P(k), P from the logistic CDF at the 255 inner edges (k - 1/2)/255, float64."""
    edges = (np.arange(1, 256) - 0.5) / 255
    cdf = np.concatenate([[0.0], stats.logistic.cdf(edges, mu, s), [1.0]])
    return float((np.arange(256) / 255 * np.diff(cdf)).sum())


def test_discretized_logistic_mean_is_the_mean_of_its_levels():
    lik = DiscretizedLogistic(torch.tensor([0.02]), torch.tensor([math.log(0.05)]))
    assert lik.mean.item() == pytest.approx(0.04565, abs=1e-5)  # the location 0.02 is not the mean
    assert _logistic_mean(0.02, 0.05) == pytest.approx(0.04565, abs=1e-5)
    for s in (1e-3, 2e-3, 1 / 255 - 1e-6, 1 / 255 + 1e-6, 0.01, 0.05, 0.3, 3.0):  # both sides of the s' = 1 switch
        mus = torch.linspace(-0.05, 1.05, 221, dtype=torch.float64)
        got = DiscretizedLogistic(mus, torch.full_like(mus, math.log(s)), min_scale=1e-4).mean
        expected = torch.tensor([_logistic_mean(m, s) for m in mus.tolist()], dtype=torch.float64)
        assert (got - expected).abs().max() < 5e-8, s  # 1e-5 of a grey level
        got32 = DiscretizedLogistic(mus.float(), torch.full((221,), math.log(s)), min_scale=1e-4).mean.double()
        assert (got32 - expected).abs().max() < 1e-6, s


def test_discretized_logistic_8bit_is_its_log_prob():
    torch.manual_seed(0)
    lik = DiscretizedLogistic(torch.rand(2, 1, 4, 4), torch.randn(2, 1, 4, 4) - 3)
    x = torch.randint(0, 256, (2, 1, 4, 4)).float() / 255
    assert torch.equal(lik.log_prob_8bit(x), lik.log_prob(x))


def test_a_bernoulli_on_grey_levels_has_no_8bit_probability():
    assert not Bernoulli.has_8bit() and Gaussian.has_8bit() and DiscretizedLogistic.has_8bit()
    with pytest.raises(NotImplementedError):
        Bernoulli(torch.zeros(1, 1, 2, 2)).log_prob_8bit(torch.zeros(1, 1, 2, 2))


# ---------------------------------------------------------------- the flaw is gone
def test_density_bits_per_dim_are_wrong_for_sharp_decoders():
    """The issue's table, on the demo's 20 test faces: a decoder with mean x + sigma * eps (clamped to [0, 1]) and
    that sigma. The density at the grid point plus D ln 256 agrees with the exact 8-bit figure for smooth decoders
    and falls far below it for sharp ones."""
    x = open_dataset("lfw", split="test", size=32, progress=False).images.double() / 255  # (20, 1, 32, 32)
    d = x[0].numel()
    rows = {}
    for sigma in (0.15, 0.01, 0.003, 0.001):
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        lik = Gaussian((x + sigma * noise).clamp(0, 1), math.log(sigma))
        density = ((-lik.log_prob(x) / d + math.log(256)) / math.log(2)).mean().item()
        exact = (-lik.log_prob_8bit(x) / (d * math.log(2))).mean().item()
        rows[sigma] = (density, exact)
    print("\ndecoder sigma | density + D ln 256 (bits/dim) | exact 8-bit (bits/dim)")
    for sigma, (density, exact) in rows.items():
        print(f"{sigma:13g} | {density:29.4f} | {exact:.4f}")
    assert abs(rows[0.15][0] - rows[0.15][1]) < 0.02 and abs(rows[0.01][0] - rows[0.01][1]) < 0.01
    assert rows[0.003][1] - rows[0.003][0] > 0.03 and rows[0.001][1] - rows[0.001][0] > 0.3
    assert all(exact > 0 for _, exact in rows.values())


class _Memorised(nn.Module):
    """Encoder or decoder of a VAE that has memorised 8 images: codes far apart, a posterior 5e-5 wide, and a decoder
    whose mean (after the VAE's sigmoid) is each image plus an error of about 1e-4."""

    def __init__(self, images: torch.Tensor, codes: torch.Tensor, *, encoder: bool):
        super().__init__()
        self.images, self.codes, self.encoder = images, codes, encoder
        error = 1e-4 * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
        self.logits = torch.logit((images + error).clamp(1e-6, 1 - 1e-6))  # (8, C, H, W)

    def forward(self, t: torch.Tensor):
        if self.encoder:  # x -> (mean, logvar) of q(z|x)
            index = torch.cdist(t.flatten(1), self.images.flatten(1)).argmin(1)
            return self.codes[index], torch.full_like(self.codes[index], -20.0)
        return self.logits[torch.cdist(t, self.codes).argmin(1)]  # z -> raw decoder output


def test_a_memorising_learned_sigma_decoder_at_min_sigma_reports_bits_per_dim_above_zero():
    """A learned sigma clamped at min_sigma = 1e-4 and means within ~1e-4 of 8 images: the density at the grid point
    (+ D ln 256) reports bits/dim far below 0, an impossibility for 8-bit data; the report's exact figures are above 0
    and match an independent computation: sum of log(Phi(b) - Phi(a)) minus the closed-form KL."""
    config = Config(image_size=8, channels=1, widths=[8], latent_dim=4, likelihood="gaussian_learned",
                    min_sigma=1e-4).validate()
    vae = VAE(config).eval()
    images = torch.randint(0, 256, (8, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    x = images.double() / 255
    codes = 3 * torch.eye(8, 4).roll(1, 0) + torch.randn(8, 4, generator=torch.Generator().manual_seed(2))
    vae.encoder = _Memorised(x.float(), codes, encoder=True)
    vae.decoder = _Memorised(x.float(), codes, encoder=False)
    with torch.no_grad():
        vae.likelihood_params.log_sigma.fill_(math.log(1e-5))  # learned below the floor: the decoder uses min_sigma
    report = evaluate(vae, images, iw_samples=50, batch_size=64)
    d = x[0].numel()
    density_bpd = (-report["density_elbo_nats"] / d + math.log(256)) / math.log(2)
    assert density_bpd < -0.5  # what facevae reported before
    assert report["elbo_bpd"] >= 0 and report["nll_iw_bpd"] >= 0
    mu = torch.sigmoid(vae.decoder.logits).double()  # the decoder's means (float32, as it computes them)
    q = vae.encode(x.float())
    expected = np.mean([
        sum(math.log(stats.norm.cdf(hi, m, 1e-4) - stats.norm.cdf(lo, m, 1e-4) if (lo + hi) / 2 <= m
                     else stats.norm.sf(lo, m, 1e-4) - stats.norm.sf(hi, m, 1e-4))
            for (lo, hi), m in ((_bin(round(v * 255)), m) for v, m in zip(x[i].flatten().tolist(),
                                                                          mu[i].flatten().tolist())))
        - q.kl()[i].item() for i in range(8)])
    assert report["elbo_nats"] == pytest.approx(expected, rel=1e-5)
    assert report["elbo_mc_stderr"] == pytest.approx(0, abs=1e-6)  # every sample of z decodes the same image


# ---------------------------------------------------------------- the bound and the ELBO's Monte Carlo error
def test_iw_bound_on_8bit_images_converges_to_the_exact_probability():
    """A linear Gaussian decoder (latent 1, two pixels, sigma 0.01: a few bins wide) on 8-bit images: log P(x) =
    log of the integral over z of N(z) times each pixel's bin mass, by quadrature. The importance-weighted bound on the
    8-bit likelihood stays below it and reaches it as K grows."""
    from test_evaluate import LinearGaussian

    from facevae.metrics import importance_samples, iw_bound

    model = LinearGaussian(shape=(1, 1, 2), scales=(0.1,), s=0.01, shift=1.0, var_scale=2.0, seed=3)  # a poor q
    model.b = torch.tensor([0.4, 0.6], dtype=torch.float64)  # images well inside [0, 1]
    x = (model.sample(8, torch.Generator().manual_seed(1)) * 255).round() / 255  # (8, 1, 1, 2) 8-bit
    assert 0 < x.min() and x.max() < 1
    w, b = model.W[:, 0].tolist(), model.b.tolist()
    mean, var = model.exact_posterior(x)  # the continuous model's posterior: where the integrand lives

    def exact(i: int) -> float:
        bins = [_bin(round(v * 255)) for v in x[i].flatten().tolist()]

        def integrand(z: float) -> float:
            p = stats.norm.pdf(z)
            for (lo, hi), wj, bj in zip(bins, w, b):
                p *= stats.norm.cdf(hi, wj * z + bj, 0.01) - stats.norm.cdf(lo, wj * z + bj, 0.01)
            return p

        m, sd = mean[i, 0].item(), var[i, 0].sqrt().item()
        value, _ = integrate.quad(integrand, m - 15 * sd, m + 15 * sd, epsabs=0, epsrel=1e-10, limit=200)
        return math.log(value)

    log_p = torch.tensor([exact(i) for i in range(8)], dtype=torch.float64)
    torch.manual_seed(0)
    gaps = {}
    for k in (1, 10, 1000):
        est = torch.stack([iw_bound(s.log_prob_8bit, s.log_ratio).double()
                           for s in (importance_samples(model, x.float(), k) for _ in range(20))])  # (20, 8)
        gap = log_p - est  # >= 0 in expectation
        gaps[k] = (gap.mean().item(), gap.std().item() / math.sqrt(gap.numel()))
    for k, (gap, se) in gaps.items():
        assert gap > -3 * se - 1e-4, k  # a lower bound
    assert gaps[1][0] > gaps[10][0] > gaps[1000][0] - 3 * gaps[1000][1]
    assert abs(gaps[1000][0]) < 0.01


def test_elbo_monte_carlo_error_matches_the_spread_of_repeated_evaluations(tiny):
    """elbo_mc_stderr is the standard deviation of elbo_nats over repeated evaluations (new z each time)."""
    torch.manual_seed(0)
    vae = VAE(tiny(likelihood="gaussian_learned")).eval()
    images = torch.randint(0, 256, (6, 1, 32, 32), dtype=torch.uint8)
    reports = []
    for seed in range(40):
        torch.manual_seed(seed)
        reports.append(evaluate(vae, images, iw_samples=8, batch_size=64))
    spread = np.std([r["elbo_nats"] for r in reports], ddof=1)
    reported = np.mean([r["elbo_mc_stderr"] for r in reports])
    assert reported == pytest.approx(spread, rel=0.35)  # 40 repeats: the spread itself is known to about 11%
    assert all(r["elbo_stderr"] > 0 for r in reports)
    torch.manual_seed(0)
    assert evaluate(vae, images, iw_samples=1)["elbo_mc_stderr"] is None  # one sample: no estimate of its error


def test_discretized_logistic_mean_is_the_same_in_a_traced_graph(monkeypatch):
    """ONNX export and torch.compile cannot branch on data: the branch-free mean equals the eager one at every scale."""
    mu = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    log_scale = torch.linspace(math.log(1e-4), math.log(0.2), 192, dtype=torch.float64).view(3, 1, 8, 8)
    eager = DiscretizedLogistic(mu, log_scale, min_scale=1e-5).mean
    with monkeypatch.context() as m:
        m.setattr(torch.compiler, "is_exporting", lambda: True)
        traced = DiscretizedLogistic(mu, log_scale, min_scale=1e-5).mean
    assert (log_scale.exp() * 255 < 1).any() and (log_scale.exp() * 255 >= 1).any()  # both formulas are used
    torch.testing.assert_close(traced, eager, rtol=0, atol=1e-12)
    # on an accelerator the same branch-free form is taken (a boolean index there would wait for the device)
    assert distributions._selects_in_place(mu) and not distributions._selects_in_place(mu.to("meta"))
