"""Latent arithmetic against closed forms and brute force: ROC AUC, thresholds, slerp, attribute vectors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from facevae.errors import UserError
from facevae.latent import (AttributeVectors, attribute_vectors, best_threshold, latent_grid, latent_path, lerp,
                            principal_directions, project, readout, roc_auc, slerp)


def brute_force_auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """P(positive's score > negative's) + P(equal) / 2 over every (positive, negative) pair."""
    pos, neg = scores[positive].tolist(), scores[~positive].tolist()
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(6))
def test_roc_auc_is_the_pairwise_probability_with_ties_counted_half(seed):
    g = torch.Generator().manual_seed(seed)
    n = [7, 40, 150][seed % 3]
    scores = torch.randint(0, 5 if seed < 3 else 1000, (n,), generator=g).double()  # few levels: many ties
    positive = torch.rand(n, generator=g) < 0.3
    positive[0], positive[1] = True, False
    assert roc_auc(scores, positive) == pytest.approx(brute_force_auc(scores, positive), abs=1e-12)


def test_roc_auc_closed_cases():
    s = torch.arange(10.0)
    pos = s >= 6
    assert roc_auc(s, pos) == 1.0 and roc_auc(-s, pos) == 0.0
    assert roc_auc(torch.zeros(10), pos) == 0.5  # all tied
    assert math.isnan(roc_auc(s, torch.ones(10, dtype=torch.bool)))
    # two Gaussians a distance d apart, unit variance: AUC = Phi(d / sqrt(2)); Monte Carlo with 20,000 each
    g = torch.Generator().manual_seed(0)
    d = 1.0
    scores = torch.cat([torch.randn(20000, generator=g) + d, torch.randn(20000, generator=g)])
    labels = torch.arange(40000) < 20000
    expected = 0.5 * (1 + math.erf(d / 2))  # Phi(d / sqrt 2) = (1 + erf(d / 2)) / 2
    assert roc_auc(scores, labels) == pytest.approx(expected, abs=0.006)  # 3 standard errors


@pytest.mark.parametrize("seed", range(4))
def test_best_threshold_maximises_balanced_accuracy(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 12, (60,), generator=g).double()
    positive = (scores + 4 * torch.randn(60, generator=g)) > 6

    def balanced(threshold: float) -> float:
        predicted = scores > threshold
        tpr = (predicted & positive).sum() / positive.sum()
        return 0.5 * (tpr + (~predicted & ~positive).sum() / (~positive).sum()).item()

    candidates = [scores.min().item() - 1] + [v + 0.5 for v in range(12)]  # every distinct cut of integer scores
    t = best_threshold(scores, positive)
    assert balanced(t) == pytest.approx(max(balanced(c) for c in candidates), abs=1e-12)
    assert not (scores == t).any()  # midway between scores


def test_readout_of_a_separating_vector():
    g = torch.Generator().manual_seed(0)
    labels = torch.rand(400, generator=g) < 0.3
    codes = torch.randn(400, 5, generator=g)
    codes[:, 2] += 6 * labels  # attribute along axis 2 only
    scores = project(codes, torch.tensor([[0, 0, 2.0, 0, 0], [1.0, 0, 0, 0, 0]]))  # (400, 2)
    assert torch.allclose(scores[:, 0], codes[:, 2].double()) and torch.allclose(scores[:, 1], codes[:, 0].double())
    r = readout((scores[:200, 0], labels[:200]), (scores[200:, 0], labels[200:]))
    assert r["auc"] > 0.99 and r["balanced_accuracy"] > 0.95 and r["accuracy"] > 0.95
    noise = readout((scores[:200, 1], labels[:200]), (scores[200:, 1], labels[200:]))
    assert abs(noise["auc"] - 0.5) < 0.15


def test_slerp_ends_norms_and_constant_angular_speed():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, generator=g, dtype=torch.float64), 2.5 * torch.randn(16, generator=g, dtype=torch.float64)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    path = slerp(a, b, t)
    assert torch.allclose(path[0], a) and torch.allclose(path[-1], b)
    norms = path.norm(dim=1)
    assert torch.allclose(norms, (1 - t) * a.norm() + t * b.norm())  # linear in t: between the ends' norms
    unit = path / norms[:, None]
    angles = torch.arccos((unit[1:] * unit[:-1]).sum(1).clamp(-1, 1))
    assert torch.allclose(angles, angles[0].expand_as(angles), atol=1e-9)  # constant speed along the great circle
    # every point lies in the plane of a and b
    basis, _ = torch.linalg.qr(torch.stack([a, b], 1))
    assert torch.allclose(basis @ (basis.T @ path.T), path.T, atol=1e-9)


def test_slerp_norm_stays_between_the_ends_where_the_plain_formula_dips():
    a = torch.tensor([1.0, 0.0], dtype=torch.float64)
    b = 1.05 * torch.tensor([math.cos(math.radians(170)), math.sin(math.radians(170))], dtype=torch.float64)
    t = torch.linspace(0, 1, 21, dtype=torch.float64)
    norms = slerp(a, b, t).norm(dim=1)
    assert (norms >= 1 - 1e-12).all() and (norms <= 1.05 + 1e-12).all()
    omega = torch.tensor(math.radians(170), dtype=torch.float64)  # White 2016's formula on the raw codes:
    plain = (torch.sin((1 - t) * omega)[:, None] * a + torch.sin(t * omega)[:, None] * b) / torch.sin(omega)
    assert plain.norm(dim=1).min() < 0.99  # ... dips below both ends: why slerp interpolates the norm apart


def test_lerp_and_degenerate_slerp():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])  # parallel: slerp is the straight line
    t = torch.tensor([0.0, 0.25, 1.0])
    assert torch.allclose(lerp(a, b, t)[1], torch.tensor([1.5, 3.0]))
    assert torch.allclose(slerp(a, b, t), lerp(a, b, t), atol=1e-6)
    assert torch.allclose(slerp(torch.zeros(2), b, t), lerp(torch.zeros(2), b, t))


@pytest.mark.parametrize("mode", ["slerp", "lerp"])
def test_latent_path_has_exact_ends(mode):
    a, b = torch.randn(8), torch.randn(8)
    path = latent_path(a, b, 5, mode)
    assert path.shape == (5, 8) and torch.equal(path[0], a) and torch.equal(path[-1], b)
    with pytest.raises(ValueError):
        latent_path(a, b, 5, "cubic")


def test_latent_grid_moves_along_each_direction():
    center = torch.tensor([1.0, 2.0, 3.0])
    z = latent_grid(center, torch.eye(3)[[2, 0]], torch.tensor([-1.0, 0.0, 2.0]))
    assert z.shape == (2, 3, 3)
    assert torch.equal(z[0, :, 2], torch.tensor([2.0, 3.0, 5.0])) and torch.equal(z[0, :, :2], center[:2].expand(3, 2))
    assert torch.equal(z[1, :, 0], torch.tensor([0.0, 1.0, 3.0]))


def test_balanced_vector_removes_a_confounder_exactly():
    """Codes = smiling * u + male * w, with men smiling more: the plain Smiling vector also moves along w (by
    P(male | smiling) - P(male | not smiling)), the balanced one is exactly u."""
    g = torch.Generator().manual_seed(0)
    male = torch.rand(1000, generator=g) < 0.5
    smiling = torch.rand(1000, generator=g) < torch.where(male, 0.8, 0.3)
    u, w = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    codes = smiling.double()[:, None] * u + male.double()[:, None] * w
    labels = torch.stack([smiling, male], 1)
    v = attribute_vectors(codes, labels, ["Smiling", "Male"], confounder=male)
    gap = male[smiling].double().mean() - male[~smiling].double().mean()
    assert torch.allclose(v.plain[0].double(), u + gap * w, atol=1e-6)
    assert torch.allclose(v.vector("Smiling").double(), u, atol=1e-6)
    assert torch.equal(v.vector("Male"), v.plain[1])  # the confounder itself keeps its plain vector
    assert v.is_balanced.tolist() == [True, False]
    assert v.positives.tolist() == [int(smiling.sum()), int(male.sum())]
    assert (v.positives + v.negatives).tolist() == [1000, 1000]
    plain = attribute_vectors(codes, labels, ["Smiling", "Male"])  # no confounder: balanced = plain
    assert torch.equal(plain.balanced, plain.plain)


def test_combine_amounts_and_unknown_names():
    v = AttributeVectors(["A", "B"], torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[1.0, 1.0], [0.0, 2.0]]),
                         torch.tensor([1, 1]), torch.tensor([1, 1]), torch.tensor([True, False]))
    assert torch.equal(v.combine({"A": 2.0, "B": -0.5}), torch.tensor([2.0, 1.0]))  # balanced by default
    assert torch.equal(v.combine({"A": 2.0}, balanced=False), torch.tensor([2.0, 0.0]))
    with pytest.raises(UserError, match="unknown attribute 'C'; the known ones: A, B"):
        v.combine({"C": 1.0})


def test_principal_directions_against_the_covariance_eigendecomposition():
    """A planted Gaussian with a known covariance: the directions are the eigenvectors of the sample covariance
    scaled by the square roots of its eigenvalues, and close to the population's."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    sd = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    x = 4.0 + (torch.randn(20_000, 6, generator=g, dtype=torch.float64) * sd) @ q.T  # covariance Q diag(sd^2) Q^T
    vectors, explained = principal_directions(x, 4)
    cov = torch.cov(x.T)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending
    for i in range(4):
        want = eigenvectors[:, -1 - i] * eigenvalues[-1 - i].sqrt()
        got = vectors[i].double()
        assert torch.allclose(got, want * torch.sign(want @ got), atol=1e-4)
        assert got.abs().argmax() == got.argmax()  # sign: the largest entry is positive
    assert torch.allclose(vectors.double().norm(dim=1), sd[:4], rtol=0.03)  # the population's standard deviations
    assert torch.allclose(explained.double(), eigenvalues.flip(0)[:4] / eigenvalues.sum(), atol=1e-5)
