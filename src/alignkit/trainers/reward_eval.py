"""Held-out metrics of a reward model: pairwise and best-of-K accuracy, Kendall's tau, calibration, Spearman.

Every function takes plain score tensors (already computed) and returns a float; `group_metrics`
computes the ones that apply to a batch of scored groups.
"""

from __future__ import annotations

import torch


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Fraction of pairs with r(chosen) > r(rejected); a tie counts one half. Shapes: N each."""
    if chosen.numel() == 0:
        return float("nan")
    return ((chosen > rejected).double() + 0.5 * (chosen == rejected).double()).mean().item()


def best_of_k_accuracy(scores: torch.Tensor, best: torch.Tensor, mask: torch.Tensor) -> float:
    """Fraction of groups whose highest-scored present item is the labelled best. Shapes: G×K, G, G×K."""
    if scores.numel() == 0:
        return float("nan")
    filled = torch.where(mask, scores, float("-inf"))
    return (filled.argmax(dim=1) == best).double().mean().item()


def kendall_tau(scores: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over lists of Kendall's tau between the labelled order (best first) and the scores.

    Equation: tau = (concordant - discordant) / number of pairs, a pair (a above b) concordant when
    r_a > r_b and discordant when r_a < r_b (ties count neither: tau-a).

    Shapes:
        scores, mask: G×K, each row in labelled order, best first; mask False on padding.
    """
    if scores.numel() == 0:
        return float("nan")
    k = scores.shape[1]
    above = torch.ones(k, k, dtype=torch.bool).triu(diagonal=1)
    pairs = above & mask[:, :, None] & mask[:, None, :]  # G×K×K
    diff = scores[:, :, None] - scores[:, None, :]  # diff[g, a, b] = r_a - r_b
    sign = torch.where(pairs, diff.sign(), 0.0).sum(dim=(1, 2))
    return (sign / pairs.sum(dim=(1, 2)).clamp(min=1)).mean().item()


def calibration_error(probs: torch.Tensor, outcomes: torch.Tensor, n_bins: int = 10) -> float:
    """Expected calibration error of predicted preference probabilities (equal-width bins over [0, 1]).

    Equation: ECE = sum_bins (n_bin / N) |mean(outcome) - mean(p)| over the bins of p. Each pair is
    counted in both orientations, (p, outcome) and (1 - p, 1 - outcome), so the result does not
    depend on which response is listed first (and equals the usual confidence-based ECE).

    Shapes:
        probs: N predicted P(a > b) = sigmoid(r_a - r_b); outcomes: N in {0, 1} (1: a preferred).
    """
    if probs.numel() == 0:
        return float("nan")
    p = torch.cat([probs, 1 - probs]).double()
    o = torch.cat([outcomes, 1 - outcomes]).double()
    bins = (p * n_bins).long().clamp(max=n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            total += sel.double().mean().item() * abs(o[sel].mean().item() - p[sel].mean().item())
    return total


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..N with ties given their average rank."""
    x = x.double()
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    for value in torch.unique(x):
        tie = x == value
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation: the Pearson correlation of the (tie-averaged) ranks. Shapes: N each."""
    if x.numel() < 2:
        return float("nan")
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = (rx.norm() * ry.norm()).item()
    return (rx @ ry).item() / denom if denom > 0 else float("nan")


def group_metrics(scores: torch.Tensor, mask: torch.Tensor, best: torch.Tensor | None) -> dict[str, float]:
    """Metrics of scored groups in labelled order (best first), or with a labelled `best` (choices).

    Pairwise accuracy and calibration use every (better, worse) pair of ordered groups, or
    (best, other) for choices; Kendall's tau is reported for groups of more than 2.

    Shapes:
        scores, mask: G×K; best: G long or None (groups are ordered best first).
    """
    if best is not None:
        top = scores.gather(1, best[:, None])  # G×1
        others = mask.clone()
        others.scatter_(1, best[:, None], False)
        chosen, rejected = top.expand_as(scores)[others], scores[others]
        out = {"eval/best_of_k_accuracy": best_of_k_accuracy(scores, best, mask)}
    else:
        k = scores.shape[1]
        above = torch.ones(k, k, dtype=torch.bool).triu(diagonal=1)
        pairs = above & mask[:, :, None] & mask[:, None, :]  # G×K×K
        chosen = scores[:, :, None].expand(-1, -1, k)[pairs]
        rejected = scores[:, None, :].expand(-1, k, -1)[pairs]
        out = {"eval/kendall_tau": kendall_tau(scores, mask)} if k > 2 else {}
    probs = torch.sigmoid(chosen - rejected)
    out["eval/pairwise_accuracy"] = pairwise_accuracy(chosen, rejected)
    out["eval/calibration_error"] = calibration_error(probs, torch.ones_like(probs))
    return out
