"""Reward-model losses against hand-computed values and their K = 2 / Bradley-Terry identities."""

import itertools
import math

import pytest
import torch
from torch.testing import assert_close

from alignkit.losses.reward import (
    REWARD_LOSSES,
    best_of_k_loss,
    hinge_loss,
    listwise_pairs_loss,
    pairwise_loss,
    plackett_luce_loss,
    pointwise_loss,
)


def _random_pairs(seed, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g), torch.randn(n, generator=g)


def test_pairwise_loss_by_hand():
    # pair 1: sigma(1.0 - 0.5) = sigma(0.5) = 0.622459, -log -> 0.474077
    # pair 2: sigma(0.0 - 1.0) = sigma(-1) = 0.268941, -log -> 1.313262
    # mean = 0.893669; accuracy 1/2; margins (0.5 - 1) / 2 = -0.25
    loss, metrics = pairwise_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 1.0]))
    assert_close(loss, torch.tensor(0.893669))
    assert_close(metrics["rewards/accuracy"], torch.tensor(0.5))
    assert_close(metrics["rewards/margins"], torch.tensor(-0.25))
    assert_close(metrics["rewards/chosen"], torch.tensor(0.5))
    assert_close(metrics["rewards/rejected"], torch.tensor(0.75))


def test_pairwise_loss_margin_and_centring_by_hand():
    chosen, rejected = torch.tensor([1.0]), torch.tensor([0.5])
    # margin 0.5: -log sigma(1.0 - 0.5 - 0.5) = -log 0.5 = 0.693147
    assert_close(pairwise_loss(chosen, rejected, margin=0.5)[0], torch.tensor(0.693147))
    assert_close(pairwise_loss(chosen, rejected, margin=torch.tensor([0.5]))[0], torch.tensor(0.693147))
    # centring: 0.474077 + 0.01 * (1.0 + 0.5)^2 = 0.474077 + 0.0225 = 0.496577
    assert_close(pairwise_loss(chosen, rejected, center_coef=0.01)[0], torch.tensor(0.496577))


def test_pairwise_centring_pulls_the_reward_sum_towards_zero():
    chosen = torch.tensor([3.0], requires_grad=True)
    rejected = torch.tensor([1.0], requires_grad=True)
    loss, _ = pairwise_loss(chosen, rejected, center_coef=1.0)
    loss.backward()
    # d/d(r_c + r_r) of (r_c + r_r)^2 = 2 * 4 > 0: descent lowers the sum
    # (the book's printed leading minus would raise it).
    assert (chosen.grad + rejected.grad).item() > 0


def test_best_of_k_by_hand_and_k2_equals_bradley_terry():
    # scores (1, 0, 0), best 0: e / (e + 2) = 2.718282 / 4.718282 = 0.576117, -log -> 0.551445
    loss, metrics = best_of_k_loss(torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([0]))
    assert_close(loss, torch.tensor(0.551445))
    assert_close(metrics["rewards/accuracy"], torch.tensor(1.0))
    chosen, rejected = _random_pairs(0)
    # best = 1 for half of the rows: the chosen score sits in column 1 there.
    best = torch.arange(8) % 2
    scores = torch.where(
        best[:, None] == 0, torch.stack([chosen, rejected], 1), torch.stack([rejected, chosen], 1)
    )
    assert_close(best_of_k_loss(scores, best)[0], pairwise_loss(chosen, rejected)[0])


def test_listwise_pairs_by_hand():
    # scores (2, 1, 0) best first: pairs (2,1), (2,0), (1,0) with differences 1, 2, 1.
    # -log sigma(1) = 0.313262, -log sigma(2) = 0.126928 -> mean (2 * 0.313262 + 0.126928) / 3 = 0.251151
    loss, metrics = listwise_pairs_loss(torch.tensor([[2.0, 1.0, 0.0]]))
    assert_close(loss, torch.tensor(0.251151))
    assert_close(metrics["rewards/accuracy"], torch.tensor(1.0))
    assert_close(metrics["rewards/margins"], torch.tensor(4.0 / 3.0))


def test_listwise_pairs_k2_and_masked_lists_equal_bradley_terry():
    chosen, rejected = _random_pairs(1)
    assert_close(
        listwise_pairs_loss(torch.stack([chosen, rejected], 1))[0], pairwise_loss(chosen, rejected)[0]
    )
    # K = 3 with the third item absent in every list is the same as K = 2.
    padded = torch.stack([chosen, rejected, torch.full_like(chosen, 99.0)], 1)
    mask = torch.tensor([True, True, False]).expand(8, 3)
    assert_close(listwise_pairs_loss(padded, mask)[0], pairwise_loss(chosen, rejected)[0])


def test_plackett_luce_by_hand():
    # scores (2, 1, 0) best first:
    # stage 1: 2 - log(e^2 + e + 1) = 2 - log(11.107338) = 2 - 2.407606 = -0.407606
    # stage 2: 1 - log(e + 1) = 1 - 1.313262 = -0.313262;  stage 3: 0 - 0 = 0
    # loss = 0.407606 + 0.313262 = 0.720868
    loss, metrics = plackett_luce_loss(torch.tensor([[2.0, 1.0, 0.0]]))
    assert_close(loss, torch.tensor(0.720868))
    assert_close(metrics["rewards/accuracy"], torch.tensor(1.0))


def test_plackett_luce_k2_equals_bradley_terry():
    chosen, rejected = _random_pairs(2)
    assert_close(
        plackett_luce_loss(torch.stack([chosen, rejected], 1))[0], pairwise_loss(chosen, rejected)[0]
    )


def test_plackett_luce_probabilities_of_all_rankings_sum_to_one():
    scores = torch.tensor([0.3, -1.2, 2.0, 0.7])
    total = sum(
        math.exp(-plackett_luce_loss(scores[list(p)][None])[0].item())
        for p in itertools.permutations(range(4))
    )
    assert total == pytest.approx(1.0, rel=1e-5)


def test_plackett_luce_mask_drops_items_and_keeps_gradients_finite():
    # Row 0: (2, 1, absent) == K=2 list (2, 1): -log sigma(1) = 0.313262.
    # Row 1: (absent, 2, 1) in the middle of the padding: also 0.313262.
    scores = torch.tensor([[2.0, 1.0, 50.0], [-7.0, 2.0, 1.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [False, True, True]])
    loss, _ = plackett_luce_loss(scores, mask)
    loss.backward()
    assert_close(loss, torch.tensor(0.313262))
    assert torch.isfinite(scores.grad).all()
    assert torch.all(scores.grad[~mask] == 0)


def test_pointwise_loss_by_hand():
    # (1.5 - 1)^2 = 0.25, (1 - 2)^2 = 1 -> mean 0.625; mae (0.5 + 1) / 2 = 0.75
    loss, metrics = pointwise_loss(torch.tensor([1.0, 2.0]), torch.tensor([1.5, 1.0]))
    assert_close(loss, torch.tensor(0.625))
    assert_close(metrics["rewards/mae"], torch.tensor(0.75))


def test_pointwise_loss_descends_towards_the_target():
    pred = torch.tensor([1.0], requires_grad=True)
    pointwise_loss(pred, torch.tensor([3.0]))[0].backward()
    assert pred.grad.item() < 0  # a descent step raises pred towards 3 (the printed minus would push it away)


def test_hinge_loss_by_hand():
    # r * label = (2, -0.5, 0.3): max(0, 1 - 2) = 0, max(0, 1.5) = 1.5, max(0, 0.7) = 0.7 -> 2.2 / 3
    loss, metrics = hinge_loss(torch.tensor([2.0, 0.5, -0.3]), torch.tensor([1, -1, -1]))
    assert_close(loss, torch.tensor(2.2 / 3))
    assert_close(metrics["rewards/accuracy"], torch.tensor(2 / 3))
    # margin 0.5: (0, 1.0, 0.2) -> 1.2 / 3
    assert_close(
        hinge_loss(torch.tensor([2.0, 0.5, -0.3]), torch.tensor([1, -1, -1]), margin=0.5)[0],
        torch.tensor(0.4),
    )


def test_reward_losses_dict():
    assert set(REWARD_LOSSES) == {
        "pairwise",
        "best_of_k",
        "listwise_pairs",
        "plackett_luce",
        "pointwise",
        "hinge",
    }
    assert REWARD_LOSSES["plackett_luce"] is plackett_luce_loss
