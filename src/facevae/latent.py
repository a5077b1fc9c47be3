"""Latent arithmetic: paths between codes, traversals, principal directions, attribute vectors and how well each one
reads its attribute.

Pure tensor functions (no model, no files), so that the commands, the web page and the tests share them. Codes are
posterior means, (N, D) or (D,); attribute labels are booleans (N, A).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from facevae.errors import UserError
from facevae.vocabulary import MODES



def lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Straight line from a to b: (D,), (D,), t (T,) -> (T, D)."""
    t = t.to(a.dtype)[:, None]
    return (1 - t) * a + t * b


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical path from a to b: (D,), (D,), t (T,) -> (T, D). The direction turns at constant speed along the
    great circle; the norm goes linearly from |a| to |b|, so it stays between the ends' norms (White 2016 applies
    the formula to the unnormalised codes, whose norm can dip below both ends when they point nearly apart).
    Falls back to lerp where a direction is undefined (a zero end) or the ends are parallel."""
    t = t.to(a.dtype)[:, None]
    na, nb = a.norm(), b.norm()
    if min(na.item(), nb.item()) < 1e-12:
        return lerp(a, b, t[:, 0])
    ua, ub = a / na, b / nb
    omega = torch.arccos((ua @ ub).clamp(-1, 1))  # the angle between the ends
    if omega.item() < 1e-6:
        return lerp(a, b, t[:, 0])
    direction = (torch.sin((1 - t) * omega) * ua + torch.sin(t * omega) * ub) / torch.sin(omega)  # unit (T, D)
    return ((1 - t) * na + t * nb) * direction


def latent_path(a: torch.Tensor, b: torch.Tensor, steps: int, mode: str = "slerp") -> torch.Tensor:
    """`steps` codes from a to b inclusive, (steps, D): the first is a, the last b."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    t = torch.linspace(0, 1, steps, dtype=torch.float64)
    path = (slerp if mode == "slerp" else lerp)(a.double(), b.double(), t)
    path[0], path[-1] = a, b  # exact ends: the path's end faces are the reconstructions of a and b
    return path.to(a.dtype)


def latent_grid(center: torch.Tensor, directions: torch.Tensor, amounts: torch.Tensor) -> torch.Tensor:
    """Codes that move away from a center along each direction: center (D,), directions (R, D), amounts (V,) ->
    (R, V, D), where [r, v] = center + amounts[v] * directions[r]. A traversal of dimension d uses the unit vector
    e_d (amounts in prior standard deviations); an attribute edit uses the attribute's vector."""
    return center + amounts.to(center.dtype)[None, :, None] * directions.to(center.dtype)[:, None, :]


def principal_directions(codes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top k principal directions of codes (N, D), each one standard deviation long: (k, D), largest first; and
    the fraction of the total variance along each, (k,).

    With the centred codes X = U diag(s) V^T, the covariance X^T X / (N - 1) has eigenvectors V and eigenvalues
    s^2 / (N - 1), so row i is V_i * s_i / sqrt(N - 1). Each direction's sign makes its largest entry positive.
    """
    x = codes.double() - codes.double().mean(0)  # (N, D)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)  # s descending, vh (min(N, D), D)
    k = min(k, len(s))
    biggest = vh.abs().argmax(dim=1, keepdim=True)
    vh = vh * torch.sign(vh.gather(1, biggest))
    std = s / math.sqrt(max(len(x) - 1, 1))
    explained = s**2 / (s**2).sum().clamp(min=1e-300)
    return (vh[:k] * std[:k, None]).float(), explained[:k].float()


@dataclass
class AttributeVectors:
    """One vector per attribute: the mean code of positives minus the mean code of negatives."""

    names: list[str]
    plain: torch.Tensor  # (A, D) mean(positives) - mean(negatives)
    balanced: torch.Tensor  # (A, D) the same with each side the average of its confounder groups' means
    positives: torch.Tensor  # (A,) int64 images with the attribute
    negatives: torch.Tensor  # (A,) int64 images without it
    is_balanced: torch.Tensor  # (A,) bool: False where a confounder x attribute group was empty (balanced = plain)

    def vector(self, name: str, *, balanced: bool = True) -> torch.Tensor:
        """The vector of one attribute, (D,); an unknown name is a UserError that lists the known ones."""
        if name not in self.names:
            raise UserError(f"unknown attribute '{name}'; the known ones: {', '.join(self.names)}")
        return (self.balanced if balanced else self.plain)[self.names.index(name)]

    def combine(self, amounts: dict[str, float], *, balanced: bool = True) -> torch.Tensor:
        """The sum of amount x vector over named attributes, (D,): amounts in units of each vector's length (1
        moves a code by the whole difference between the mean codes with and without the attribute)."""
        total = torch.zeros(self.plain.shape[1])
        for name, amount in amounts.items():
            total += amount * self.vector(name, balanced=balanced)
        return total


def attribute_vectors(means: torch.Tensor, labels: torch.Tensor, names: list[str],
                      confounder: torch.Tensor | None = None) -> AttributeVectors:
    """Attribute vectors from codes (N, D) and boolean labels (N, A) (White 2016, "Sampling Generative Networks").

    The balanced variant first equalises the confounder groups (e.g. Male): each side's mean is the average of the
    mean over confounder-positive and the mean over confounder-negative images, so a vector for Smiling learnt on
    data where women smile more does not also change gender. confounder: bool (N,), or None (balanced = plain).
    """
    means, labels = means.double(), labels.bool()
    pos, neg = labels.double(), (~labels).double()  # (N, A)
    plain = _group_mean(pos, means) - _group_mean(neg, means)  # (A, D)
    balanced, ok = plain.clone(), torch.zeros(len(names), dtype=torch.bool)
    if confounder is not None:
        c = confounder.bool().double()[:, None]  # (N, 1)
        groups = [pos * c, pos * (1 - c), neg * c, neg * (1 - c)]  # (N, A) each
        counts = torch.stack([g.sum(0) for g in groups])  # (4, A)
        ok = (counts > 0).all(0)  # the confounder itself has empty groups, so it keeps its plain vector
        pm, pf, nm, nf = (_group_mean(g, means) for g in groups)
        balanced[ok] = (0.5 * (pm + pf) - 0.5 * (nm + nf))[ok]
    return AttributeVectors(list(names), plain.float(), balanced.float(), labels.sum(0), (~labels).sum(0), ok)


def _group_mean(weights: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Mean code of each group: weights (N, A) of 0/1, means (N, D) -> (A, D); an empty group's mean is 0."""
    return (weights.T @ means) / weights.sum(0).clamp(min=1)[:, None]


def roc_auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """ROC AUC of scores (N,) for boolean labels (N,): the Mann-Whitney statistic, ties counted one half
    (P(score of a positive > score of a negative) + P(equal) / 2). NaN when a class is empty."""
    scores, positive = scores.double().flatten(), positive.bool().flatten()
    n_pos = int(positive.sum())
    n_neg = len(scores) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    sorted_scores, order = torch.sort(scores, stable=True)
    _, group, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    average_rank = counts.cumsum(0) - (counts - 1) / 2  # 1-based ranks; tied scores share their average rank
    ranks = torch.empty_like(scores)
    ranks[order] = average_rank[group].double()
    return ((ranks[positive].sum().item() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def best_threshold(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """The threshold (predict positive when score > threshold) with the best balanced accuracy (the mean of the
    true-positive and true-negative rates: attributes such as Eyeglasses are rare). Midway between scores."""
    scores, positive = scores.double().flatten(), positive.bool().flatten()
    n_pos, n_neg = max(int(positive.sum()), 1), max(int((~positive).sum()), 1)
    sorted_scores, order = torch.sort(scores)
    _, counts = torch.unique_consecutive(sorted_scores, return_counts=True)
    ends = counts.cumsum(0)  # the cut after each group of tied scores: ends[k] scores at or below it
    is_pos = positive[order].double()
    tn = torch.cat([torch.zeros(1, dtype=torch.float64), (1 - is_pos).cumsum(0)[ends - 1]])  # (G + 1,)
    tp = n_pos - torch.cat([torch.zeros(1, dtype=torch.float64), is_pos.cumsum(0)[ends - 1]])
    k = int(torch.argmax(tp / n_pos + tn / n_neg))  # cut 0: everything positive
    if k == 0:
        return sorted_scores[0].item() - 1.0
    below = sorted_scores[ends[k - 1] - 1].item()
    return below + 1.0 if k == len(ends) else 0.5 * (below + sorted_scores[ends[k - 1]].item())


def project(codes: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Each code's projection on each vector's direction: codes (N, D), vectors (A, D) -> scores (N, A), float64."""
    directions = vectors.double() / vectors.double().norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return codes.double() @ directions.T


def readout(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """How well projections on a vector read its attribute: the threshold chosen on the training split, the test
    split's ROC AUC, accuracy and balanced accuracy there. train, test: (scores (N,), boolean labels (N,))."""
    threshold = best_threshold(*train)
    scores, positive = test[0].double(), test[1].bool()
    predicted = scores > threshold
    tpr = (predicted & positive).sum().item() / max(int(positive.sum()), 1)
    tnr = (~predicted & ~positive).sum().item() / max(int((~positive).sum()), 1)
    return {"auc": roc_auc(scores, positive), "threshold": threshold,
            "accuracy": (predicted == positive).double().mean().item() if len(scores) else math.nan,
            "balanced_accuracy": 0.5 * (tpr + tnr)}
