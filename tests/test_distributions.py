"""Each density against torch.distributions, closed forms, Monte Carlo or numerical integration."""

from __future__ import annotations

import math

import pytest
import torch
from torch import distributions as td

from facevae.distributions import (
    Bernoulli,
    ContinuousBernoulli,
    DiagonalGaussian,
    DiscretizedLogistic,
    Gaussian,
    standard_normal_log_prob,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_kl_closed_form_matches_monte_carlo():
    mean, logvar = torch.randn(3, 5), torch.randn(3, 5) * 0.5
    q = DiagonalGaussian(mean, logvar)
    z = q.sample(200_000)  # (S, B, L)
    mc = (q.log_prob(z) - standard_normal_log_prob(z)).mean(0)
    assert torch.allclose(q.kl(), mc, atol=0.03)
    exact = td.kl_divergence(td.Normal(mean, (0.5 * logvar).exp()), td.Normal(0.0, 1.0)).sum(-1)
    assert torch.allclose(q.kl(), exact, atol=1e-5)


def test_posterior_log_prob_sample_and_mode():
    mean, logvar = torch.randn(4, 3), torch.randn(4, 3)
    q = DiagonalGaussian(mean, logvar)
    z = q.sample()
    ref = td.Independent(td.Normal(mean, (0.5 * logvar).exp()), 1)
    assert torch.allclose(q.log_prob(z), ref.log_prob(z), atol=1e-5)
    assert torch.equal(q.mode(), mean)
    many = q.sample(100_000)
    assert torch.allclose(many.mean(0), mean, atol=0.03)
    assert torch.allclose(many.std(0), (0.5 * logvar).exp(), rtol=0.02)


def test_sample_is_reparameterised():
    mean = torch.zeros(2, 3, requires_grad=True)
    logvar = torch.zeros(2, 3, requires_grad=True)
    DiagonalGaussian(mean, logvar).sample().sum().backward()
    assert mean.grad is not None and torch.all(mean.grad == 1)
    assert logvar.grad is not None and logvar.grad.abs().sum() > 0


def test_gaussian_fixed_sigma_matches_torch():
    mu, x = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    lp = Gaussian(mu, math.log(0.3)).log_prob(x)
    ref = td.Normal(mu, 0.3).log_prob(x).flatten(1).sum(1)
    assert lp.shape == (2,)
    assert torch.allclose(lp, ref, atol=1e-4)


@pytest.mark.parametrize("mode", ["batch", "image"])
def test_optimal_sigma_is_the_rmse_and_the_maximum(mode):
    mu, x = torch.rand(3, 1, 5, 5), torch.rand(3, 1, 5, 5)
    lik = Gaussian(mu, optimal=mode)
    sq = (x - mu) ** 2
    rmse = sq.mean().sqrt() if mode == "batch" else sq.flatten(1).mean(1).sqrt()
    assert torch.allclose(lik.optimal_log_sigma(x).exp().flatten() if mode == "image" else lik.optimal_log_sigma(x).exp(),
                          rmse, rtol=1e-5)
    sigma = rmse.view(-1, 1, 1, 1) if mode == "image" else rmse
    best = td.Normal(mu, sigma).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(lik.log_prob(x), best, atol=1e-3)
    for factor in (0.9, 1.1):  # any other shared sigma gives a lower likelihood
        assert (td.Normal(mu, sigma * factor).log_prob(x).flatten(1).sum(1).sum() < best.sum())


def test_optimal_sigma_floor():
    mu = torch.rand(2, 1, 3, 3)
    lik = Gaussian(mu, optimal="batch", min_sigma=1e-2)
    assert lik.optimal_log_sigma(mu.clone()).item() == pytest.approx(math.log(1e-2))


def test_bernoulli_matches_torch():
    logits = torch.randn(2, 3, 4, 4) * 3
    x = torch.randint(0, 2, (2, 3, 4, 4)).float()
    lik = Bernoulli(logits)
    ref = td.Bernoulli(logits=logits).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(lik.log_prob(x), ref, atol=1e-4)
    assert torch.allclose(lik.mean, torch.sigmoid(logits))
    assert Bernoulli.support == "none"


def test_continuous_bernoulli_matches_torch_away_from_half():
    logits = torch.randn(2, 1, 6, 6) * 4
    x = torch.rand(2, 1, 6, 6)
    lik = ContinuousBernoulli(logits)
    ref = td.ContinuousBernoulli(logits=logits.double())
    assert torch.allclose(lik.log_prob(x).double(), ref.log_prob(x.double()).flatten(1).sum(1), atol=1e-3)
    assert torch.allclose(lik.mean.double(), ref.mean.view_as(lik.mean), atol=1e-4)


@pytest.mark.parametrize("lam", [1e-3, 0.1, 0.3, 0.5 - 1e-4, 0.5, 0.5 + 1e-4, 0.7, 0.999])
def test_continuous_bernoulli_integrates_to_one(lam):
    eta = torch.logit(torch.tensor(lam, dtype=torch.float64)).float()
    n = 200_001
    x = torch.linspace(0, 1, n).view(n, 1, 1, 1)
    density = ContinuousBernoulli(eta.expand(n, 1, 1, 1)).log_prob(x).double().exp()
    integral = torch.trapezoid(density, dx=1 / (n - 1))
    assert integral.item() == pytest.approx(1.0, abs=2e-4)


def test_continuous_bernoulli_gradient_finite_near_half():
    eta = torch.tensor([-1e-4, -1e-7, 0.0, 1e-7, 1e-4, 5e-3, 0.02]).view(7, 1, 1, 1).requires_grad_()
    x = torch.full((7, 1, 1, 1), 0.3)
    ContinuousBernoulli(eta).log_prob(x).sum().backward()
    assert torch.isfinite(eta.grad).all()
    # the Taylor branch and the closed form agree across the switch
    inside = ContinuousBernoulli(torch.tensor([0.0099999])).log_normalizer()
    outside = ContinuousBernoulli(torch.tensor([0.0100001])).log_normalizer()
    assert inside.item() == pytest.approx(outside.item(), abs=1e-6)


def test_continuous_bernoulli_mean_and_samples():
    eta = torch.tensor([-3.0, -0.5, 0.0, 1e-3, 2.0]).view(5, 1, 1, 1)
    lik = ContinuousBernoulli(eta.expand(5, 1, 200, 200))
    samples = lik.sample()
    assert ((samples >= 0) & (samples <= 1)).all()
    assert torch.allclose(samples.mean((1, 2, 3)), lik.mean.mean((1, 2, 3)), atol=5e-3)
    assert lik.mean[2].mean().item() == pytest.approx(0.5)


@pytest.mark.parametrize("mu,log_scale", [(0.5, -3.0), (0.02, -4.0), (0.97, -2.0), (0.3, 0.5), (0.5, -6.5), (1.4, -5.0)])
def test_discretized_logistic_sums_to_one_over_256_bins(mu, log_scale):
    levels = torch.arange(256, dtype=torch.float32).view(256, 1, 1, 1) / 255
    lik = DiscretizedLogistic(torch.full((256, 1, 1, 1), mu), torch.full((256, 1, 1, 1), log_scale))
    p = lik.log_prob(levels).double().exp()
    assert p.sum().item() == pytest.approx(1.0, abs=1e-4)
    assert DiscretizedLogistic.support == "discrete"


def test_discretized_logistic_bin_probability_matches_cdf():
    mu, s = torch.tensor(0.4), torch.tensor(0.05)
    dist = td.TransformedDistribution(td.Uniform(0.0, 1.0), [td.SigmoidTransform().inv, td.AffineTransform(mu, s)])
    x = torch.tensor(100 / 255)
    expected = (dist.cdf(x + 0.5 / 255) - dist.cdf(x - 0.5 / 255)).log()
    lik = DiscretizedLogistic(mu.view(1, 1, 1, 1), s.log().view(1, 1, 1, 1))
    assert lik.log_prob(x.view(1, 1, 1, 1)).item() == pytest.approx(expected.item(), abs=1e-4)


def test_optimal_sigma_gradient_is_finite_at_an_exact_fit():
    x = torch.rand(3, 1, 4, 4)
    for mode in ("batch", "image"):
        mu = x.clone().requires_grad_()
        Gaussian(mu, optimal=mode).log_prob(x).sum().backward()
        assert torch.isfinite(mu.grad).all()


def test_discretized_logistic_is_accurate_at_large_scales():
    """At scale 1e5 a bin holds (1/255) / (4 * 1e5) of the mass near the mode; its log-gradient in log s is -1."""
    log_s = torch.tensor(math.log(1e5)).view(1, 1, 1, 1).requires_grad_()
    lik = DiscretizedLogistic(torch.full((1, 1, 1, 1), 0.5), log_s)
    lp = lik.log_prob(torch.full((1, 1, 1, 1), 100 / 255))
    lp.sum().backward()
    assert lp.item() == pytest.approx(math.log(1 / 255 / 4e5), abs=1e-3)
    assert log_s.grad.item() == pytest.approx(-1.0, abs=1e-3)


@pytest.mark.parametrize("eta", [-80.0, 80.0])
def test_continuous_bernoulli_extreme_samples_and_mean_gradient(eta):
    logits = torch.full((1, 1, 300, 300), eta, requires_grad=True)
    lik = ContinuousBernoulli(logits)
    lik.mean.sum().backward()
    assert torch.isfinite(logits.grad).all()
    # closed form (torch.distributions clamps the probability at its float epsilon, which shifts its mean here)
    true_mean = 1 / (1 - math.exp(-eta)) - 1 / eta
    assert lik.sample().double().mean().item() == pytest.approx(true_mean, abs=2e-3)
