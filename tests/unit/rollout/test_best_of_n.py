"""Best-of-N: analytic KL on a toy categorical distribution, the exact subset estimator, selection."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.testing import assert_close

from alignkit.rollout.best_of_n import (
    analytic_kl,
    best_index,
    best_of_n_curve,
    best_of_n_distribution,
    expected_best_of_n,
    kl_divergence,
    subset_max_weights,
)


def test_analytic_kl_values():
    assert analytic_kl(1) == 0.0
    assert analytic_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert analytic_kl(64) == pytest.approx(math.log(64) - 63 / 64)


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_empirical_kl_of_best_of_n_matches_log_n_minus_n_minus_1_over_n(n):
    # A toy categorical base distribution over V items with distinct, continuous-valued rewards.
    gen = torch.Generator().manual_seed(n)
    vocab, draws = 500, 400_000
    torch.manual_seed(n)
    probs = torch.distributions.Dirichlet(torch.full((vocab,), 5.0)).sample()  # no atom holds much mass
    rewards = torch.rand(vocab, generator=gen, dtype=torch.float64)
    # Empirical: draw N items per trial, keep the best by reward, histogram the winners.
    samples = torch.multinomial(probs.expand(draws, vocab), n, replacement=True, generator=gen)  # draws×N
    winners = samples.gather(1, rewards[samples].argmax(dim=1, keepdim=True)).squeeze(1)
    empirical = torch.bincount(winners, minlength=vocab).double() / draws
    target = analytic_kl(n)
    assert kl_divergence(empirical, probs) == pytest.approx(target, rel=0.02)
    # The exact best-of-N distribution agrees with the histogram and with the analytic KL.
    exact = best_of_n_distribution(probs, rewards, n)
    assert_close(exact.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert kl_divergence(exact, probs) == pytest.approx(target, rel=0.02)
    assert (empirical - exact).abs().max() < 0.005


def test_subset_weights_equal_enumerating_every_subset():
    scores = torch.tensor([[0.3, 1.2, -0.5, 0.9, 2.0, 0.1]])
    gold = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    for n in range(1, 7):
        subsets = list(itertools.combinations(range(6), n))
        best = [max(s, key=lambda i: scores[0, i].item()) for s in subsets]
        loop_score = sum(scores[0, i].item() for i in best) / len(subsets)
        loop_gold = sum(gold[0, i].item() for i in best) / len(subsets)
        assert expected_best_of_n(scores, scores, n).item() == pytest.approx(loop_score)
        assert expected_best_of_n(scores, gold, n).item() == pytest.approx(loop_gold)
        assert subset_max_weights(6, n).sum().item() == pytest.approx(1.0)


def test_curve_rises_with_n_and_endpoints():
    torch.manual_seed(0)
    scores = torch.randn(32, 16)
    gold = scores + 0.5 * torch.randn(32, 16)
    rows = best_of_n_curve(scores, [1, 2, 4, 8, 16], gold)
    model = [r["reward/model"] for r in rows]
    assert model == sorted(model)
    assert model[0] == pytest.approx(scores.mean().item())  # N = 1: the mean sample
    assert model[-1] == pytest.approx(scores.max(dim=1).values.mean().item())  # N = N_max: the max
    assert rows[-1]["reward/gold"] > rows[0]["reward/gold"]
    assert [r["kl_analytic"] for r in rows] == [analytic_kl(n) for n in (1, 2, 4, 8, 16)]


def test_best_index_picks_the_highest_score():
    assert best_index(torch.tensor([[0.1, 0.7, 0.2], [3.0, -1.0, 3.0]])).tolist() == [1, 0]
