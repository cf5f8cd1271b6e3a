"""Reward-model losses on scalar reward scores: pairwise, best-of-K, listwise, pointwise, hinge.

Every loss takes the scores r(x, y) the reward model gave (already computed) and returns
``(loss, metrics)``; the loss is a mean over the batch (over prompts for the listwise losses).
Metrics use the ``rewards/`` prefix: ``rewards/accuracy``, ``rewards/margins``, ...
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Metrics = dict[str, torch.Tensor]


def pairwise_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    *,
    margin: float | torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """Bradley-Terry pairwise loss (Xiao & Zhu, Eq. 10.35-10.37), with optional margin and centring.

    Equation: L = -mean log Sigmoid(r_c - r_r - m) + coef * mean (r_c + r_r)^2
    - m is an optional margin (per pair or a constant; Touvron et al. 2023, Llama 2, Eq. 2);
    - the second term is the reward-centring regulariser of Eisenstein et al. 2023 (Xiao & Zhu,
      Eq. 10.63). The book prints it as "+ (-E[r_a + r_b]^2)", a leading minus that would
      *reward* a large squared sum; the intended regulariser penalises it, as implemented here.

    Shapes:
        chosen, rejected: B scores of the preferred and the dispreferred response.
        margin: B or scalar, optional.
        returns: scalar loss and metrics.

    Reduces by the mean over pairs. Metrics: ``rewards/chosen``, ``rewards/rejected`` (means),
    ``rewards/margins`` (mean r_c - r_r), ``rewards/accuracy`` (fraction with r_c > r_r).
    """
    diff = chosen - rejected  # B
    logits = diff if margin is None else diff - margin
    loss = -F.logsigmoid(logits).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
    metrics = {
        "rewards/chosen": chosen.detach().mean(),
        "rewards/rejected": rejected.detach().mean(),
        "rewards/margins": diff.detach().mean(),
        "rewards/accuracy": (diff.detach() > 0).to(chosen.dtype).mean(),
    }
    return loss, metrics


def best_of_k_loss(scores: torch.Tensor, best: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
    """Softmax (K-way) loss over K samples, one of which the labeler picked (Ziegler et al. 2019, Sec. 2.2).

    Equation: L = -mean log( exp(r_best) / sum_i exp(r_i) ). With K = 2 this is the
    Bradley-Terry loss -log Sigmoid(r_best - r_other) of Xiao & Zhu, Eq. 10.36.

    Shapes:
        scores: B×K scores of the K samples for each prompt.
        best: B long, index of the chosen sample.
        returns: scalar loss and metrics.

    Reduces by the mean over prompts. Metrics: ``rewards/accuracy`` (argmax == best),
    ``rewards/chosen`` (mean r_best), ``rewards/margins`` (mean r_best - mean of the others).
    """
    loss = F.cross_entropy(scores, best)
    s = scores.detach()
    chosen = s.gather(1, best.unsqueeze(1)).squeeze(1)  # B
    others = (s.sum(dim=1) - chosen) / max(s.shape[1] - 1, 1)  # B
    metrics = {
        "rewards/chosen": chosen.mean(),
        "rewards/margins": (chosen - others).mean(),
        "rewards/accuracy": (s.argmax(dim=1) == best).to(s.dtype).mean(),
    }
    return loss, metrics


def _valid(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """B×K bool of the items present in each list (all True if no mask)."""
    return torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.to(torch.bool)


def listwise_pairs_loss(
    scores: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, Metrics]:
    """Pairwise loss accumulated over all pairs of a ranked list (Xiao & Zhu, Eq. 10.57).

    Equation: L = -mean_lists (1 / P) sum_{a ranked above b} log Sigmoid(r_a - r_b), P the number
    of such pairs, N(N - 1) / 2 for a list of N. The book normalises by N(N - 1) (it counts both
    orders of a pair but only one order is a preference); we average over the pairs actually
    compared, so K = 2 gives exactly the pairwise loss. This differs from the book by a factor 2.

    Shapes:
        scores: B×K, each row ordered best first.
        mask: B×K bool, optional; False marks padding in lists shorter than K.
        returns: scalar loss and metrics.

    Reduces by the mean over pairs within a list, then the mean over lists. Metrics:
    ``rewards/accuracy`` (fraction of pairs ordered correctly), ``rewards/margins``.
    """
    k = scores.shape[1]
    valid = _valid(scores, mask)
    above = torch.ones(k, k, dtype=torch.bool, device=scores.device).triu(diagonal=1)  # a < b: a above b
    pairs = above & valid.unsqueeze(2) & valid.unsqueeze(1)  # B×K×K
    diff = scores.unsqueeze(2) - scores.unsqueeze(1)  # B×K×K, diff[:, a, b] = r_a - r_b
    n_pairs = pairs.sum(dim=(1, 2)).clamp(min=1).to(scores.dtype)  # B
    per_pair = torch.where(pairs, -F.logsigmoid(diff), 0.0)
    loss = (per_pair.sum(dim=(1, 2)) / n_pairs).mean()
    d = diff.detach()
    metrics = {
        "rewards/accuracy": ((torch.where(pairs, d > 0, False).sum(dim=(1, 2)) / n_pairs).mean()),
        "rewards/margins": (torch.where(pairs, d, 0.0).sum(dim=(1, 2)) / n_pairs).mean(),
    }
    return loss, metrics


def plackett_luce_loss(
    scores: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, Metrics]:
    """Plackett-Luce negative log-likelihood of a ranking (Xiao & Zhu, Eq. 10.58-10.61).

    Equation: with worths exp(r) (Eq. 10.58) and the list ordered best first, j_1 > ... > j_N,
        log Pr(ranking) = sum_k [ r_{j_k} - log sum_{i >= k} exp(r_{j_i}) ]     (Eq. 10.60)
        L = -mean_lists log Pr(ranking)                                         (Eq. 10.61)
    With K = 2 this is the Bradley-Terry loss -log Sigmoid(r_1 - r_2).

    Shapes:
        scores: B×K, each row ordered best first.
        mask: B×K bool, optional; False marks items absent from a list (shorter lists). They are
            left out of every denominator and contribute no term.
        returns: scalar loss and metrics.

    Reduces by the sum over the stages of a list, then the mean over lists. Metrics:
    ``rewards/accuracy`` (fraction of lists whose top-scored item is ranked first).
    """
    valid = _valid(scores, mask)
    # Absent items get a very negative finite score: exp() of it is 0 in every denominator, and
    # unlike -inf it cannot produce nan in the forward or the backward pass.
    fill = torch.finfo(scores.dtype).min
    filled = torch.where(valid, scores, fill)
    # suffix_lse[:, k] = log sum_{i >= k} exp(r_i): logcumsumexp of the reversed row, reversed back.
    suffix_lse = torch.logcumsumexp(filled.flip(1), dim=1).flip(1)  # B×K
    stages = torch.where(valid, filled - suffix_lse, 0.0)  # B×K
    loss = -stages.sum(dim=1).mean()
    top = filled.detach().argmax(dim=1)
    metrics = {"rewards/accuracy": (top == valid.to(torch.int8).argmax(dim=1)).to(scores.dtype).mean()}
    return loss, metrics


def pointwise_loss(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
    """Pointwise regression of the reward on a rating (Xiao & Zhu, Eq. 10.62).

    Equation: L = mean (phi(x, y) - r(x, y))^2, phi the human rating. The book prints
    "L = -E[phi - r]^2", a leading minus that would maximise the error; the intended loss
    minimises the squared error, as implemented (the same holds for Eq. 10.70).

    Shapes:
        pred: B predicted rewards r(x, y).
        target: B ratings phi(x, y).
        returns: scalar loss and metrics.

    Reduces by the mean over examples. Metrics: ``rewards/mae`` (mean |phi - r|), ``rewards/mean``.
    """
    target = target.to(pred.dtype)
    loss = ((target - pred) ** 2).mean()
    metrics = {
        "rewards/mae": (target - pred.detach()).abs().mean(),
        "rewards/mean": pred.detach().mean(),
    }
    return loss, metrics


def hinge_loss(
    scores: torch.Tensor, labels_pm1: torch.Tensor, margin: float = 1.0
) -> tuple[torch.Tensor, Metrics]:
    """Hinge loss for binary (+1 / -1) labels (Xiao & Zhu, Eq. 10.71).

    Equation: L = mean max(0, margin - r * r_hat), r_hat in {+1, -1} the label (margin 1 in the book).

    Shapes:
        scores: B predicted scores r.
        labels_pm1: B labels, +1 or -1.
        returns: scalar loss and metrics.

    Reduces by the mean over examples. Metrics: ``rewards/accuracy`` (fraction with r * r_hat > 0).
    """
    agreement = scores * labels_pm1.to(scores.dtype)  # B
    loss = torch.clamp(margin - agreement, min=0).mean()
    return loss, {"rewards/accuracy": (agreement.detach() > 0).to(scores.dtype).mean()}


REWARD_LOSSES = {
    "pairwise": pairwise_loss,
    "best_of_k": best_of_k_loss,
    "listwise_pairs": listwise_pairs_loss,
    "plackett_luce": plackett_luce_loss,
    "pointwise": pointwise_loss,
    "hinge": hinge_loss,
}
