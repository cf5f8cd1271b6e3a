"""Best-of-N selection (Xiao & Zhu, Sec. 10.4.5, Eq. 10.85-10.86) and its reward / KL curve.

For each prompt, N responses y_1..y_N are sampled from the policy and a scorer r picks
y_best = argmax_i r(x, y_i) (Eq. 10.86). The best-of-N policy is a new distribution pi_N; when
the rewards of distinct responses differ (continuous-valued), its KL to the sampling policy pi is
the same for every task (Stiennon et al. 2020, App. G.3; Beirami et al. 2024 show it is an upper
bound otherwise):

    KL(pi_N || pi) = log N - (N - 1) / N

One set of N_max samples per prompt gives the curve for every N <= N_max without resampling:
`expected_best_of_n` averages the winner of all C(N_max, N) subsets exactly (order statistics),
which is the unbiased estimate of the best-of-N reward with the least variance.
"""

from __future__ import annotations

import math

import torch


def analytic_kl(n: int) -> float:
    """KL(pi_N || pi) = log N - (N - 1) / N of best-of-N with distinct rewards (0 for N = 1)."""
    if n < 1:
        raise ValueError(f"N must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_index(rewards: torch.Tensor) -> torch.Tensor:
    """Index of the best of the N samples of each prompt (Eq. 10.86; ties: the lower index).

    Shapes:
        rewards: P×N. returns: P long.
    """
    return rewards.argmax(dim=-1)


def subset_max_weights(n_total: int, n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Probability that the k-th smallest of n_total items is the largest of a random n-subset.

    Equation: w_k = C(k - 1, n - 1) / C(n_total, n) for k = 1..n_total (0 when k < n); sum_k w_k = 1.

    Shapes:
        returns: n_total, in ascending-rank order.
    """
    if not 1 <= n <= n_total:
        raise ValueError(f"need 1 <= n <= n_total, got n={n}, n_total={n_total}")
    k = torch.arange(1, n_total + 1, dtype=dtype)
    log_w = (torch.lgamma(k) - torch.lgamma(k - n + 1).where(k >= n, torch.zeros_like(k))
             - torch.lgamma(torch.tensor(float(n), dtype=dtype))
             - (math.lgamma(n_total + 1) - math.lgamma(n + 1) - math.lgamma(n_total - n + 1)))
    return torch.where(k >= n, log_w.exp(), torch.zeros_like(k))


def expected_best_of_n(scores: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """Expected `values` of the best-by-`scores` response of a uniformly random n-subset, per prompt.

    Equation: with the N samples sorted by score ascending, E = sum_k w_k * values_(k), w_k from
    `subset_max_weights(N, n)`. With values = scores this is the expected best-of-n score; with
    values = gold rewards, the gold reward of the response the scorer picks.

    Shapes:
        scores, values: P×N. returns: P (float64).
    """
    order = scores.argsort(dim=-1, stable=True)  # ascending
    ranked = values.double().gather(-1, order)  # P×N in ascending-score order
    return ranked @ subset_max_weights(scores.shape[-1], n)


def best_of_n_curve(scores: torch.Tensor, ns: list[int], gold: torch.Tensor | None = None) -> list[dict[str, float]]:
    """One row per N: `n`, `kl_analytic`, `reward/model` and (with `gold`) `reward/gold`, means over prompts.

    Shapes:
        scores, gold: P×N_max samples per prompt; every N in `ns` must be <= N_max.
    """
    rows = []
    for n in ns:
        row = {"n": n, "kl_analytic": analytic_kl(n), "reward/model": float(expected_best_of_n(scores, scores, n).mean())}
        if gold is not None:
            row["reward/gold"] = float(expected_best_of_n(scores, gold, n).mean())
        rows.append(row)
    return rows


def best_of_n_distribution(probs: torch.Tensor, rewards: torch.Tensor, n: int) -> torch.Tensor:
    """Exact distribution of the best-of-n draw from a categorical distribution with distinct rewards.

    Equation: with F(r) = P(reward <= r) under `probs`, pi_n(i) = F(r_i)^n - F(r_i^-)^n, where
    F(r_i^-) = F(r_i) - probs_i (the max of n draws is item i).

    Shapes:
        probs, rewards: V. returns: V.
    """
    order = rewards.argsort()
    cdf = probs[order].double().cumsum(0)
    below = cdf - probs[order].double()
    out = torch.empty_like(cdf)
    out[order] = cdf.pow(n) - below.clamp(min=0).pow(n)
    return out


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """KL(p || q) = sum_i p_i log(p_i / q_i) of two categorical distributions (0 log 0 = 0)."""
    p, q = p.double(), q.double()
    terms = torch.where(p > 0, p * (p.clamp(min=1e-300).log() - q.log()), 0.0)
    return float(terms.sum())
