"""A new likelihood is one class and one table line: a toy one trains two steps through the command line, is saved
with its own parameter, loads, and evaluates."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from facevae.cli import main
from facevae.distributions import LIKELIHOODS, Likelihood
from facevae.run import load_run


class LearnedScale(nn.Module):
    """The toy's own parameter: one learned log-scale."""

    def __init__(self) -> None:
        super().__init__()
        self.log_b = nn.Parameter(torch.tensor(math.log(0.1)))


class Laplace(Likelihood):
    """A toy likelihood: independent Laplace densities, location sigmoid(raw), one learned scale."""

    name = "toy_laplace"
    support = "continuous"

    def __init__(self, mu: torch.Tensor, log_b: torch.Tensor):
        self.mu, self.log_b = mu, log_b

    params = LearnedScale
    @classmethod
    def from_decoder(cls, raw, params, settings, *, training):
        return cls(torch.sigmoid(raw), params.log_b)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """sum -|x - mu| / b - log(2 b), nats per image (B,)."""
        b = self.log_b.exp()
        return (-(x.float() - self.mu.float()).abs() / b - torch.log(2 * b)).flatten(1).sum(1)

    @property
    def mean(self) -> torch.Tensor:
        return self.mu


def test_the_toy_log_prob_is_the_laplace_density():
    mu, x = torch.rand(3, 1, 4, 4), torch.rand(3, 1, 4, 4)
    expected = torch.distributions.Laplace(mu, 0.1).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(Laplace(mu, torch.tensor(math.log(0.1))).log_prob(x), expected, atol=1e-4)


def test_a_registered_likelihood_trains_through_the_command_line_and_evaluates(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(LIKELIHOODS, Laplace.name, Laplace)  # the one table line
    run = tmp_path / "toy"
    settings = ["likelihood=\"toy_laplace\"", "data=\"lfw\"", "image_size=32", "channels=1", "widths=[8, 16]",
                "latent_dim=4", "batch_size=16", "epochs=1", "max_steps=2", "log_every=1", "image_count=8"]
    assert main(["train", "--out", str(run), "--quiet", *[a for s in settings for a in ("--set", s)]]) == 0
    vae = load_run(run)
    assert isinstance(vae.decode(torch.zeros(2, 4)), Laplace)
    assert vae.likelihood_params.log_b.item() != pytest.approx(math.log(0.1), abs=1e-6)  # trained, saved, loaded
    capsys.readouterr()
    assert main(["evaluate", str(run), "--iw-samples", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["likelihood"] == "toy_laplace" and math.isfinite(report["density_nll_iw_nats"])
    assert report["elbo_bpd"] is None and report["nll_iw_nats"] is None  # the toy has no log_prob_8bit


def test_an_unregistered_likelihood_is_a_one_line_error(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), "--set", "likelihood=\"toy_laplace\""]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "likelihood" in err and "gaussian" in err
