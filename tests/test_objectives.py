"""The objective: elbo = recon - kl, the deck's loss identities, the importance-weighted bound and the units."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from facevae.config import Config
from facevae.model import VAE
from conftest import density_iw
from facevae.metrics import bits_per_dim, importance_samples, iw_bound, psnr
from facevae.model import elbo

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DECK_W = 0.00024


def _batch(config: Config, n: int = 4) -> torch.Tensor:
    return torch.rand(n, config.channels, config.image_size, config.image_size)


def test_vae_terms_elbo_is_recon_minus_kl(tiny):
    torch.manual_seed(0)
    config = tiny()
    vae = VAE(config)
    terms = vae(_batch(config))
    assert terms.elbo.shape == terms.recon.shape == terms.kl.shape == (4,)
    assert torch.allclose(terms.elbo, terms.recon - terms.kl)
    assert (terms.kl >= 0).all()
    assert terms.loss.item() == pytest.approx((-terms.elbo).mean().item(), rel=1e-6)  # kl_weight = 1: the true -ELBO
    weighted = vae(_batch(config), kl_weight=3.0)
    assert weighted.loss.item() == pytest.approx((3.0 * weighted.kl - weighted.recon).mean().item(), rel=1e-6)


@pytest.mark.parametrize("name", ["celeba64-deck-gaussian", "celeba64-deck-bernoulli"])
def test_deck_loss_identity(name):
    """The loss facevae optimises for the deck's configs is a constant factor (and offset) times the deck's loss."""
    torch.manual_seed(0)
    config = Config.from_toml(CONFIGS / f"{name}.toml").validate()
    assert (config.image_size, config.channels, config.latent_dim) == (64, 3, 128)
    d = config.data_dims  # 12,288
    vae = VAE(config)
    x = _batch(config, 8)
    posterior = vae.encode(x)
    likelihood = vae.decode(posterior.sample())
    loss = elbo(posterior, likelihood, x, kl_weight=config.kl_weight).loss.double()
    x_hat, kl_mean = likelihood.mean.double(), posterior.kl().double().mean()
    if config.likelihood == "gaussian":
        assert config.sigma == 1.0
        assert config.kl_weight == pytest.approx(DECK_W * d / 2)  # beta = 1.47456
        deck = F.mse_loss(x_hat, x.double()) + DECK_W * kl_mean
        assert loss.item() == pytest.approx((d / 2 * deck + d / 2 * math.log(2 * math.pi)).item(), rel=1e-5)
    else:
        assert config.kl_weight == pytest.approx(DECK_W * d)  # beta = 2.94912
        deck = F.binary_cross_entropy(x_hat, x.double()) + DECK_W * kl_mean
        assert loss.item() == pytest.approx((d * deck).item(), rel=1e-5)


def test_deck_gaussian_weight_equals_elbo_of_wider_gaussian():
    """Equivalently, the deck's loss is (1/w) times the true -ELBO of a sigma^2 = w D / 2 Gaussian (+ a constant)."""
    torch.manual_seed(0)
    base = Config.from_toml(CONFIGS / "celeba64-deck-gaussian.toml").validate()
    d = base.data_dims
    sigma2 = DECK_W * d / 2
    wide = base.updated({"sigma": math.sqrt(sigma2), "kl_weight": 1.0})
    vae = VAE(wide)
    x = _batch(wide, 4)
    posterior = vae.encode(x)
    likelihood = vae.decode(posterior.sample())
    neg_elbo = elbo(posterior, likelihood, x).loss.double()
    deck = F.mse_loss(likelihood.mean.double(), x.double()) + DECK_W * posterior.kl().double().mean()
    const = d / 2 * math.log(2 * math.pi * sigma2)
    assert neg_elbo.item() == pytest.approx((deck / DECK_W + const).item(), rel=1e-5)


def test_iw_with_one_sample_is_an_unbiased_elbo(tiny):
    """E[log w] with K = 1 equals the ELBO: recon (Monte Carlo over the same draws) minus the closed-form KL."""
    torch.manual_seed(0)
    config = tiny()
    vae = VAE(config).eval()
    x = _batch(config, 2)
    draws = 3000
    with torch.no_grad():
        iw1 = density_iw(vae, x.repeat(draws, 1, 1, 1), 1).view(draws, 2)  # independent K = 1 estimates
        posterior = vae.encode(x)
        z = posterior.sample(draws)  # (S, B, L)
        recon = vae.decode(z.view(-1, config.latent_dim)).log_prob(x.repeat(draws, 1, 1, 1)).view(draws, 2)
    elbo_mc = recon.mean(0) - posterior.kl()
    stderr = iw1.std(0) / math.sqrt(draws)
    assert (iw1.mean(0) - elbo_mc).abs().max() < 4 * stderr.max() + 0.05


def test_iw_bound_is_the_same_whatever_the_chunk(tiny, monkeypatch):
    """Decoding the K samples in chunks changes nothing: the same draws give the same estimate."""
    from facevae.distributions import DiagonalGaussian

    config = tiny()
    vae = VAE(config).eval()
    x = _batch(config, 3)
    eps = torch.randn(12, 3, config.latent_dim)
    used = []

    def fixed_sample(self, samples=None):
        start = sum(used)
        used.append(samples)
        return self.mean + self.std * eps[start:start + samples]

    monkeypatch.setattr(DiagonalGaussian, "sample", fixed_sample)
    with torch.no_grad():
        whole = density_iw(vae, x, 12)
        used.clear()
        chunked = density_iw(vae, x, 12, chunk=5)
    assert used == [5, 5, 2]
    assert torch.allclose(whole, chunked, atol=1e-4)


def test_bits_per_dim_conversions():
    d = 3 * 64 * 64
    # a model putting 1/256 on every level is 8 bits/dim
    assert bits_per_dim(-d * math.log(256), d) == pytest.approx(8.0)
    assert bits_per_dim(-1000.0, 100) == pytest.approx(1000 / (100 * math.log(2)))
    assert bits_per_dim(None, 10) is None


def test_psnr_hand_computed():
    x = torch.zeros(2, 1, 4, 4)
    y = x.clone()
    y[0] += 0.1  # MSE 0.01 -> 20 dB
    y[1, :, :2] += 0.5  # MSE 0.125 -> 9.03 dB
    assert psnr(y, x).tolist() == pytest.approx([20.0, 10 * math.log10(8)], abs=1e-4)
