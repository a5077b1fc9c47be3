"""The likelihood family in the real training loop: learned sigma, KL warm-up, every likelihood trains and evaluates."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_config
from facevae.run import load_run
from facevae.distributions import LIKELIHOODS
from facevae.data import open_dataset
from facevae.evaluate import evaluate
from facevae.train import train


def _records(run, kind):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_learned_sigma_moves_toward_the_optimal_sigma(tmp_path):
    """log sigma starts at log(0.1); a short run moves it toward log(RMSE) of the reconstructions it is fitting."""
    config = tiny_config(likelihood="gaussian_learned", batch_size=8, epochs=3, learning_rate=3e-3)
    start = math.log(0.1)
    train(config, tmp_path / "run", progress=False)
    vae = load_run(tmp_path / "run")
    x = open_dataset("lfw", split="train", size=32).images.float() / 255
    with torch.no_grad():
        rmse = ((vae(x).x_mean - x) ** 2).mean().sqrt().item()
    learned = vae.likelihood_params.log_sigma.item()
    assert rmse > 0.1  # an under-fitted model: the optimum sigma lies above the starting 0.1
    assert learned > start  # moved up, toward log(rmse)
    assert abs(learned - math.log(rmse)) < abs(start - math.log(rmse)) - 0.05  # Adam moves <= lr per step: 30 steps


@pytest.mark.parametrize("sigma_factor,direction", [(0.5, -1), (1.0, 0), (2.0, 1)])
def test_gradient_of_the_log_sigma_points_to_the_rmse(sigma_factor, direction):
    """d(-log p)/d(log sigma) = D - SSE / sigma^2: negative below the RMSE, zero at it, positive above it."""
    from facevae.distributions import Gaussian

    torch.manual_seed(0)
    mu, x = torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8)
    rmse = ((x - mu) ** 2).mean().sqrt()
    log_sigma = torch.log(rmse * sigma_factor).clone().requires_grad_()
    (-Gaussian(mu, log_sigma).log_prob(x).sum()).backward()
    d = x.numel()
    expected = d - ((x - mu) ** 2).sum() / (rmse * sigma_factor) ** 2
    assert log_sigma.grad.item() == pytest.approx(expected.item(), abs=1e-2)
    assert (log_sigma.grad.item() > 1e-2) - (log_sigma.grad.item() < -1e-2) == direction


def test_kl_warmup_is_linear(tmp_path):
    config = tiny_config(batch_size=8, epochs=2, kl_warmup_steps=10, kl_weight=2.0, log_every=1)
    train(config, tmp_path / "run", progress=False)
    weights = [r["kl_weight"] for r in _records(tmp_path / "run", "step")]
    assert weights[:11] == pytest.approx([2.0 * s / 10 for s in range(11)])  # logged after step s: weight used in it
    assert weights[11:] == pytest.approx([2.0] * (len(weights) - 11))


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_every_likelihood_trains_and_evaluates(tmp_path, likelihood):
    config = tiny_config(likelihood=likelihood, batch_size=16, epochs=1)
    record = train(config, tmp_path / "run", progress=False)
    assert record["skipped_steps"] == 0 and math.isfinite(record["test_density_elbo_nats"])
    vae = load_run(tmp_path / "run")
    report = evaluate(vae, open_dataset("lfw", split="test", size=32).images, iw_samples=3)
    assert math.isfinite(report["density_nll_iw_nats"])
    if likelihood == "bernoulli":  # no probability of 8-bit images
        assert report["elbo_bpd"] is None and report["nll_iw_bpd"] is None and record["test_elbo_nats"] is None
    else:
        assert math.isfinite(report["nll_iw_nats"]) and report["nll_iw_nats"] > 0
        assert 0 < report["elbo_bpd"] < 40  # a figure in bits per dimension of 8-bit data
    assert vae.config.likelihood == likelihood  # recorded in the run


def test_discretized_logistic_bpd_has_no_dequantisation_term(tmp_path):
    """Its ELBO is already a log-probability of 8-bit data: bpd = -elbo / (D ln 2)."""
    train(tiny_config(likelihood="discretized_logistic", batch_size=40), tmp_path / "run", progress=False)
    vae = load_run(tmp_path / "run")
    report = evaluate(vae, open_dataset("lfw", split="test", size=32).images)
    assert report["elbo_bpd"] == pytest.approx(-report["elbo_nats"] / (report["dims"] * math.log(2)))


@pytest.mark.parametrize("likelihood", ["gaussian_optimal", "gaussian_optimal_per_image"])
def test_optimal_sigma_scores_with_a_fixed_running_sigma_in_eval_mode(likelihood):
    """Training uses the batch's optimum; evaluation a fixed running estimate, so an image's score is its own."""
    from facevae.model import VAE

    torch.manual_seed(0)
    vae = VAE(tiny_config(likelihood=likelihood))
    x = torch.rand(6, 1, 32, 32)
    rmse_logs = []
    for _ in range(5):
        terms = vae(x)
        rmse_logs.append(0.5 * torch.log(((terms.x_mean - x) ** 2).mean()).item())
    assert vae.likelihood_params.running_count.item() == 5
    running = vae.likelihood_params.running_log_sigma.item()
    assert running == pytest.approx(sum(rmse_logs) / 5, abs=1e-5)  # mean of the first batches
    vae.eval()
    z = torch.randn(6, 4)
    alone = torch.cat([vae.decode(z[i:i + 1]).log_prob(x[i:i + 1]) for i in range(6)])
    together = vae.decode(z).log_prob(x)
    assert torch.allclose(alone, together, rtol=1e-5)  # no dependence on the other images of the batch
    sigma = vae.likelihood_params.running_log_sigma.exp().item()
    expected = torch.distributions.Normal(vae.decode(z).mean, sigma).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(together, expected, rtol=1e-4)
