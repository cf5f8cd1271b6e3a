"""DPO-family losses against hand-computed values and the DPO / Bradley-Terry / Plackett-Luce identities."""

import math

import torch
from torch.testing import assert_close

from alignkit.losses.preference import (
    PREFERENCE_LOSSES,
    cdpo_loss,
    dpo_loss,
    ipo_loss,
    kto_loss,
    orpo_loss,
    plackett_luce_dpo_loss,
    simpo_loss,
)
from alignkit.losses.reward import pairwise_loss, plackett_luce_loss

# log-ratio chosen = -10 - (-12) = 2, log-ratio rejected = -11 - (-8) = -3
PAIR = (torch.tensor([-10.0]), torch.tensor([-11.0]), torch.tensor([-12.0]), torch.tensor([-8.0]))


def _random_logps(seed, shape=(8,)):
    g = torch.Generator().manual_seed(seed)
    return tuple(-10 * torch.rand(shape, generator=g) for _ in range(4))


def test_dpo_by_hand():
    # beta = 0.1: z = 0.1 * (2 - (-3)) = 0.5; sigma(0.5) = 0.622459, -log -> 0.474077
    loss, metrics = dpo_loss(*PAIR, beta=0.1)
    assert_close(loss, torch.tensor(0.474077))
    assert_close(metrics["rewards/chosen"], torch.tensor(0.2))
    assert_close(metrics["rewards/rejected"], torch.tensor(-0.3))
    assert_close(metrics["rewards/margins"], torch.tensor(0.5))
    assert_close(metrics["rewards/accuracy"], torch.tensor(1.0))


def test_dpo_with_policy_equal_to_reference_is_log_2():
    policy_chosen, policy_rejected, _, _ = _random_logps(0)
    loss, _ = dpo_loss(policy_chosen, policy_rejected, policy_chosen, policy_rejected, beta=0.3)
    assert_close(loss, torch.tensor(math.log(2)))


def test_dpo_equals_bradley_terry_on_implicit_rewards():
    pc, pr, rc, rr = _random_logps(1)
    beta = 0.2
    bt, _ = pairwise_loss(beta * (pc - rc), beta * (pr - rr))
    assert_close(dpo_loss(pc, pr, rc, rr, beta=beta)[0], bt)


def test_dpo_gradient_does_not_reach_the_reference():
    pc, pr, rc, rr = (x.requires_grad_(True) for x in _random_logps(2))
    dpo_loss(pc, pr, rc, rr, beta=0.1)[0].backward()
    assert rc.grad is None and rr.grad is None and pc.grad is not None


def test_ipo_by_hand():
    # h = 2 - (-3) = 5; beta = 0.25 -> 1 / (2 beta) = 2; (5 - 2)^2 = 9
    assert_close(ipo_loss(*PAIR, beta=0.25)[0], torch.tensor(9.0))


def test_cdpo_by_hand_and_zero_smoothing_is_dpo():
    # z = 0.5: 0.9 * (-log sigma(0.5)) + 0.1 * (-log sigma(-0.5)) = 0.9 * 0.474077 + 0.1 * 0.974077 = 0.524077
    assert_close(cdpo_loss(*PAIR, beta=0.1, label_smoothing=0.1)[0], torch.tensor(0.524077))
    logps = _random_logps(3)
    assert_close(cdpo_loss(*logps, beta=0.1, label_smoothing=0.0)[0], dpo_loss(*logps, beta=0.1)[0])


def test_simpo_by_hand():
    # beta = 2, gamma = 0.5: 2 * (-0.5) - 2 * (-1.0) - 0.5 = 0.5 -> -log sigma(0.5) = 0.474077
    loss, metrics = simpo_loss(torch.tensor([-0.5]), torch.tensor([-1.0]), beta=2.0, gamma=0.5)
    assert_close(loss, torch.tensor(0.474077))
    assert_close(metrics["rewards/margins"], torch.tensor(1.0))


def test_orpo_by_hand():
    # p_c = 0.5 -> odds 1, log odds 0; p_r = 0.2 -> odds 0.25, log odds -1.386294
    # L_OR = -log sigma(1.386294) = -log 0.8 = 0.223144; L = 1.5 + 0.1 * 0.223144 = 1.522314
    loss, metrics = orpo_loss(
        torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.2)]), torch.tensor([1.5]), beta=0.1
    )
    assert_close(loss, torch.tensor(1.522314))
    assert_close(metrics["loss/or"], torch.tensor(0.223144))
    assert_close(metrics["loss/nll"], torch.tensor(1.5))


def test_kto_by_hand():
    # beta = 0.1, z0 = 0.5. Desirable r = 2.5: 1 - sigma(0.1 * 2) = 1 - 0.549834 = 0.450166.
    # Undesirable r = 4.5: 1 - sigma(0.1 * (0.5 - 4.5)) = 1 - sigma(-0.4) = 1 - 0.401312 = 0.598688.
    # mean = 0.524427; with desirable_weight 2: (0.900332 + 0.598688) / 2 = 0.749510
    policy, ref = torch.tensor([-7.5, -5.5]), torch.tensor([-10.0, -10.0])
    labels = torch.tensor([True, False])
    loss, metrics = kto_loss(policy, ref, labels, beta=0.1, kl_ref=0.5)
    assert_close(loss, torch.tensor(0.524427))
    assert_close(metrics["rewards/chosen"], torch.tensor(0.25))
    assert_close(metrics["rewards/rejected"], torch.tensor(0.45))
    assert_close(metrics["rewards/accuracy"], torch.tensor(0.5))
    weighted, _ = kto_loss(policy, ref, labels, beta=0.1, kl_ref=torch.tensor(0.5), desirable_weight=2.0)
    assert_close(weighted, torch.tensor(0.749510))


def test_kto_reference_point_is_clamped_at_zero():
    policy, ref, labels = (
        torch.tensor([-7.5, -5.5]),
        torch.tensor([-10.0, -10.0]),
        torch.tensor([True, False]),
    )
    assert_close(
        kto_loss(policy, ref, labels, beta=0.1, kl_ref=-3.0)[0],
        kto_loss(policy, ref, labels, beta=0.1, kl_ref=0.0)[0],
    )


def test_plackett_luce_dpo_treats_a_list_with_no_present_item_like_plackett_luce():
    policy, ref = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]]), torch.zeros(2, 2)
    mask = torch.tensor([[True, True], [False, False]])
    loss, metrics = plackett_luce_dpo_loss(policy, ref, beta=1.0, mask=mask)
    expected, _ = plackett_luce_loss(policy, mask)
    assert_close(loss, expected)
    # the empty list adds no term but counts in the mean over lists: -log Sigmoid(1) / 2
    assert_close(loss, torch.tensor(-math.log(1 / (1 + math.exp(-1.0))) / 2))
    assert_close(metrics["rewards/chosen"], torch.tensor(-1.0))  # the first list's only
    assert_close(metrics["rewards/rejected"], torch.tensor(-2.0))


def test_plackett_luce_dpo_k2_equals_dpo():
    pc, pr, rc, rr = _random_logps(4)
    listwise, metrics = plackett_luce_dpo_loss(torch.stack([pc, pr], 1), torch.stack([rc, rr], 1), beta=0.1)
    pairwise, pair_metrics = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert_close(listwise, pairwise)
    assert_close(metrics["rewards/margins"], pair_metrics["rewards/margins"])


def test_plackett_luce_dpo_is_plackett_luce_on_implicit_rewards():
    g = torch.Generator().manual_seed(5)
    policy, ref = -10 * torch.rand(4, 5, generator=g), -10 * torch.rand(4, 5, generator=g)
    mask = torch.arange(5) < torch.tensor([[5], [3], [2], [4]])
    expected, _ = plackett_luce_loss(0.5 * (policy - ref), mask)
    assert_close(plackett_luce_dpo_loss(policy, ref, beta=0.5, mask=mask)[0], expected)


def test_preference_losses_dict():
    assert PREFERENCE_LOSSES["sigmoid"] is dpo_loss
    assert set(PREFERENCE_LOSSES) == {"sigmoid", "ipo", "cdpo", "simpo", "orpo", "kto", "plackett_luce"}
