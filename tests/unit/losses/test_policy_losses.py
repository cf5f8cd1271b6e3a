"""PPO, value, REINFORCE, A2C and GRPO losses: hand-computed values, clip gradients, reductions."""

import math

import pytest
import torch
from torch.testing import assert_close

from alignkit.losses.policy import (
    a2c_loss,
    aggregate,
    aggregation_terms,
    grpo_loss,
    ppo_policy_loss,
    reinforce_loss,
    value_loss,
)

LN15, LN05 = math.log(1.5), math.log(0.5)


def _ppo_batch():
    # Four response tokens with ratios (1.5, 0.5, 0.5, 1.5) and advantages (1, 1, -1, -1), then a pad.
    old = torch.tensor([[-1.0, -1.0, -1.0, -1.0, -1.0]])
    logprobs = old + torch.tensor([[LN15, LN05, LN05, LN15, 3.0]])
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0, 100.0]])
    mask = torch.tensor([[True, True, True, True, False]])
    return logprobs, old, advantages, mask


def test_ppo_policy_loss_by_hand():
    # eps = 0.2. Per token -min(rho A, clip(rho) A):
    #   rho 1.5, A  1: -min(1.5, 1.2)   = -1.2   (clipped)
    #   rho 0.5, A  1: -min(0.5, 0.8)   = -0.5
    #   rho 0.5, A -1: -min(-0.5, -0.8) =  0.8   (clipped)
    #   rho 1.5, A -1: -min(-1.5, -1.2) =  1.5
    # mean = (-1.2 - 0.5 + 0.8 + 1.5) / 4 = 0.15; clipfrac = 2/4.
    # approx_kl k3 = (rho - 1) - log rho: 0.5 - 0.405465 = 0.094535 and -0.5 + 0.693147 = 0.193147,
    # mean = (2 * 0.094535 + 2 * 0.193147) / 4 = 0.143841.
    logprobs, old, advantages, mask = _ppo_batch()
    loss, metrics = ppo_policy_loss(logprobs, old, advantages, mask, cliprange=0.2)
    assert_close(loss, torch.tensor(0.15))
    assert_close(metrics["loss/policy"], torch.tensor(0.15))
    assert_close(metrics["policy/clipfrac"], torch.tensor(0.5))
    assert_close(metrics["policy/approx_kl"], torch.tensor(0.143841), atol=1e-6, rtol=1e-5)
    assert not any(v.requires_grad for v in metrics.values())


@pytest.mark.parametrize(
    ("ratio", "advantage", "zero_grad"),
    [
        (1.3, 1.0, True),  # above 1 + eps with A > 0: clipped, no gradient
        (0.7, -1.0, True),  # below 1 - eps with A < 0: clipped, no gradient
        (1.3, -1.0, False),  # above 1 + eps but A < 0: the unclipped term is the min
        (0.7, 1.0, False),  # below 1 - eps but A > 0: the unclipped term is the min
        (1.1, 1.0, False),  # inside the clip range
        (0.9, -1.0, False),
    ],
)
def test_ppo_gradient_is_zero_only_where_the_clip_applies(ratio, advantage, zero_grad):
    old = torch.tensor([[-2.0]])
    logprobs = (old + math.log(ratio)).requires_grad_(True)
    loss, _ = ppo_policy_loss(
        logprobs, old, torch.tensor([[advantage]]), torch.tensor([[True]]), cliprange=0.2
    )
    loss.backward()
    if zero_grad:
        assert logprobs.grad.item() == 0.0
    else:
        # d/dlogp of -rho A = -A rho.
        assert_close(logprobs.grad, torch.tensor([[-advantage * ratio]]))


def test_sequence_advantages_broadcast_over_tokens():
    logprobs, old, _, mask = _ppo_batch()
    per_token = torch.full_like(logprobs, 0.7)
    a, _ = ppo_policy_loss(logprobs, old, torch.tensor([0.7]), mask, cliprange=0.2)
    b, _ = ppo_policy_loss(logprobs, old, per_token, mask, cliprange=0.2)
    assert_close(a, b)


def test_value_loss_by_hand():
    # V = (1, 2, 1.5), V_old = (1.2, 1, 1), R = (1.5, 1, 1.5), c = 0.2.
    # unclipped (V - R)^2 = (0.25, 1, 0); V_clip = (1.0, 1.2, 1.2) -> (0.25, 0.04, 0.09)
    # max -> (0.25, 1, 0.09), mean = 1.34 / 3 = 0.446667; clipfrac = 1/3; without clipping 1.25/3.
    values = torch.tensor([[1.0, 2.0, 1.5, 50.0]])
    old = torch.tensor([[1.2, 1.0, 1.0, 0.0]])
    returns = torch.tensor([[1.5, 1.0, 1.5, 0.0]])
    mask = torch.tensor([[True, True, True, False]])
    loss, metrics = value_loss(values, old, returns, mask, cliprange_value=0.2)
    assert_close(loss, torch.tensor(1.34 / 3))
    assert_close(metrics["value/clipfrac"], torch.tensor(1 / 3))
    loss, metrics = value_loss(values, old, returns, mask)
    assert_close(loss, torch.tensor(1.25 / 3))
    assert_close(metrics["value/clipfrac"], torch.tensor(0.0))
    assert_close(metrics["value/mean"], torch.tensor(1.5))


def test_reinforce_loss_by_hand():
    # -log pi * A: -(-1)(0.5) = 0.5 and -(-2)(-1) = -2 -> mean -0.75 (pad ignored).
    logprobs = torch.tensor([[-1.0, -2.0, -9.0]])
    mask = torch.tensor([[True, True, False]])
    loss, _ = reinforce_loss(logprobs, torch.tensor([[0.5, -1.0, 7.0]]), mask)
    assert_close(loss, torch.tensor(-0.75))


def test_a2c_loss_is_policy_plus_weighted_value_loss():
    # policy term as above (-0.75); value (V - R)^2 = (0.5^2, 1^2) -> mean 0.625; total -0.75 + 0.5 * 0.625.
    logprobs = torch.tensor([[-1.0, -2.0, -9.0]])
    mask = torch.tensor([[True, True, False]])
    values, returns = torch.tensor([[1.0, 1.0, 3.0]]), torch.tensor([[1.5, 0.0, 0.0]])
    loss, metrics = a2c_loss(
        logprobs, values, torch.tensor([[0.5, -1.0, 7.0]]), returns, mask, value_coef=0.5
    )
    assert_close(loss, torch.tensor(-0.75 + 0.5 * 0.625))
    assert_close(metrics["loss/value"], torch.tensor(0.625))


def test_grpo_loss_by_hand():
    # rho = 1 (on-policy), A = 1, pi = 0.5, pi_ref = 0.25, beta = 0.1:
    # -min(1, 1) + 0.1 * k3 = -1 + 0.1 * 0.193147 = -0.980685.
    logprobs = torch.tensor([[math.log(0.5), 0.0]])
    ref = torch.tensor([[math.log(0.25), 0.0]])
    mask = torch.tensor([[True, False]])
    loss, metrics = grpo_loss(logprobs, logprobs, ref, torch.tensor([1.0]), mask, cliprange=0.2, kl_coef=0.1)
    assert_close(loss, torch.tensor(-0.980685))
    assert_close(metrics["objective/kl_k3_token_mean"], torch.tensor(0.193147))
    assert "objective/kl" not in metrics  # that name is the per-response sequence KL (the trainer's)
    assert_close(metrics["policy/clipfrac"], torch.tensor(0.0))


def test_grpo_without_kl_equals_ppo():
    logprobs, old, advantages, mask = _ppo_batch()
    ppo, _ = ppo_policy_loss(logprobs, old, advantages, mask, cliprange=0.2)
    grpo, _ = grpo_loss(logprobs, old, old, advantages, mask, cliprange=0.2, kl_coef=0.0)
    assert_close(grpo, ppo)


@pytest.mark.parametrize(("name", "aggregation"), [("ppo", "token"), ("grpo", "token"), ("grpo", "sequence"),
                                                   ("grpo", "fixed_length"), ("reinforce", "token")])
def test_aggregation_is_invariant_to_how_the_batch_is_split(name, aggregation):
    g = torch.Generator().manual_seed(0)
    logprobs = (-torch.rand(6, 5, generator=g)).requires_grad_(True)
    old, ref = -torch.rand(6, 5, generator=g), -torch.rand(6, 5, generator=g)
    advantages = torch.randn(6, 5, generator=g)
    mask = torch.arange(5) < torch.tensor([[5], [1], [3], [4], [2], [5]])
    count = {"num_tokens": None} if name == "reinforce" else {"num_terms": None}
    options = {"ppo": {"cliprange": 0.2}, "reinforce": {},
               "grpo": {"cliprange": 0.2, "kl_coef": 0.1, "aggregation": aggregation, "max_len": 7}}[name]

    def loss_of(rows, n=None):
        args = {
            "ppo": (logprobs[rows], old[rows], advantages[rows], mask[rows]),
            "grpo": (logprobs[rows], old[rows], ref[rows], advantages[rows], mask[rows]),
            "reinforce": (logprobs[rows], advantages[rows], mask[rows]),
        }[name]
        loss_fn = {"ppo": ppo_policy_loss, "grpo": grpo_loss, "reinforce": reinforce_loss}[name]
        return loss_fn(*args, **{key: n for key in count}, **options)[0]

    full = loss_of(slice(0, 6))
    (full_grad,) = torch.autograd.grad(full, logprobs)
    n = aggregation_terms(mask, aggregation, max_len=7)  # the count of the whole accumulated batch
    accumulated = loss_of(slice(0, 2), n) + loss_of(slice(2, 6), n)
    (acc_grad,) = torch.autograd.grad(accumulated, logprobs)
    assert_close(accumulated, full)
    assert_close(acc_grad, full_grad)
    # The loop's protocol (`TrainLoop.update`): each micro-batch's own mean x its own count, summed, divided
    # once by the total count.
    parts = [slice(0, 1), slice(1, 4), slice(4, 6)]
    sums = sum(loss_of(rows) * aggregation_terms(mask[rows], aggregation, max_len=7) for rows in parts)
    assert sum(aggregation_terms(mask[rows], aggregation, max_len=7) for rows in parts) == n
    assert_close(sums / n, full)


def _two_responses():
    # On-policy (ratio 1) with kl_coef 0, the per-token GRPO loss is -A: response 0 has one token with
    # A = 2, response 1 three tokens with A = (1, 2, 6); the last column is padding.
    logprobs = torch.full((2, 4), -1.0)
    advantages = torch.tensor([[2.0, 50.0, 50.0, 50.0], [1.0, 2.0, 6.0, 50.0]])
    mask = torch.tensor([[True, False, False, False], [True, True, True, False]])
    return logprobs, advantages, mask


@pytest.mark.parametrize(
    ("aggregation", "expected"),
    [
        ("token", -(2 + 9) / 4),  # DAPO: token sum -11 over the 4 tokens = -2.75
        ("sequence", -(2 + 9 / 3) / 2),  # GRPO Eq. 3: response means -2 and -3, their mean = -2.5
        ("fixed_length", -(2 + 9) / (2 * 5)),  # Dr. GRPO: -11 / (2 responses x max_len 5) = -1.1
    ],
)
def test_grpo_loss_aggregations_by_hand(aggregation, expected):
    logprobs, advantages, mask = _two_responses()
    loss, metrics = grpo_loss(logprobs, logprobs, logprobs, advantages, mask, cliprange=0.2, kl_coef=0.0,
                              aggregation=aggregation, max_len=5)
    assert_close(loss, torch.tensor(expected))
    assert aggregation_terms(mask, aggregation, max_len=5) == {"token": 4, "sequence": 2, "fixed_length": 10}[
        aggregation]
    assert_close(metrics["policy/clipfrac"], torch.tensor(0.0))


def test_grpo_sequence_aggregation_includes_the_kl_term_per_response():
    # Response 0: one token, pi = 0.5, pi_ref = 0.25, A = 0 -> l = 0.1 * k3 = 0.1 * 0.193147.
    # Response 1: two tokens, pi = pi_ref, A = 1 -> l = -1, -1; mean -1.
    # sequence: (0.0193147 - 1) / 2 = -0.490343; token: (0.0193147 - 2) / 3 = -0.660228.
    logprobs = torch.tensor([[math.log(0.5), 0.0], [-1.0, -1.0]])
    ref = torch.tensor([[math.log(0.25), 0.0], [-1.0, -1.0]])
    mask = torch.tensor([[True, False], [True, True]])
    for aggregation, expected in [("sequence", -0.490343), ("token", -0.660228)]:
        loss, _ = grpo_loss(logprobs, logprobs, ref, torch.tensor([0.0, 1.0]), mask, cliprange=0.2, kl_coef=0.1,
                            aggregation=aggregation)
        assert_close(loss, torch.tensor(expected), atol=1e-6, rtol=1e-5)


def test_aggregation_options_are_checked():
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="max_len"):
        aggregation_terms(mask, "fixed_length", max_len=2)  # shorter than the responses
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate(torch.zeros(2, 3), mask, "mean")


def _asymmetric_batch():
    # Ratios (1.4, 1.25, 0.85, 0.5), advantages (1, 1, -1, 1).
    old = torch.full((1, 4), -1.0)
    logprobs = old + torch.log(torch.tensor([[1.4, 1.25, 0.85, 0.5]]))
    return logprobs, old, torch.tensor([[1.0, 1.0, -1.0, 1.0]]), torch.ones(1, 4, dtype=torch.bool)


def test_clip_higher_by_hand():
    # eps_low 0.1, eps_high 0.3: clip to [0.9, 1.3]. Per token -min(rho A, clip(rho) A):
    #   rho 1.4,  A  1: -min(1.4, 1.3)     = -1.3   (clipped above)
    #   rho 1.25, A  1: -min(1.25, 1.25)   = -1.25  (inside [0.9, 1.3]; 0.2 either side clips it to 1.2)
    #   rho 0.85, A -1: -min(-0.85, -0.9)  =  0.9   (clipped below; 0.2 either side leaves it)
    #   rho 0.5,  A  1: -min(0.5, 0.9)     = -0.5
    # mean = (-1.3 - 1.25 + 0.9 - 0.5) / 4 = -0.5375, clipfrac 2/4.
    # Symmetric 0.2: (-1.2 - 1.2 + 0.85 - 0.5) / 4 = -0.5125, clipfrac 2/4.
    logprobs, old, advantages, mask = _asymmetric_batch()
    loss, metrics = ppo_policy_loss(logprobs, old, advantages, mask, cliprange=0.2, cliprange_low=0.1,
                                    cliprange_high=0.3)
    assert_close(loss, torch.tensor(-0.5375))
    assert_close(metrics["policy/clipfrac"], torch.tensor(0.5))
    symmetric, _ = ppo_policy_loss(logprobs, old, advantages, mask, cliprange=0.2)
    assert_close(symmetric, torch.tensor(-0.5125))
    # Each bound defaults to `cliprange` on its own: only the upper one at 0.3 -> tokens 2 and 3 as
    # (-1.3 - 1.25 + 0.85 - 0.5) / 4 = -0.55.
    high_only, _ = ppo_policy_loss(logprobs, old, advantages, mask, cliprange=0.2, cliprange_high=0.3)
    assert_close(high_only, torch.tensor(-0.55))
    grpo, _ = grpo_loss(logprobs, old, old, advantages, mask, cliprange=0.2, kl_coef=0.0, cliprange_low=0.1,
                        cliprange_high=0.3, aggregation="token")
    assert_close(grpo, torch.tensor(-0.5375))


def test_clip_higher_lets_the_gradient_through_up_to_the_upper_bound():
    # rho 1.25 with A > 0: no gradient with 0.2 (clipped at 1.2), -A rho = -1.25 with eps_high = 0.3.
    old = torch.tensor([[-2.0]])
    for high, grad in [(None, 0.0), (0.3, -1.25)]:
        logprobs = (old + math.log(1.25)).requires_grad_(True)
        loss, _ = ppo_policy_loss(logprobs, old, torch.tensor([[1.0]]), torch.tensor([[True]]), cliprange=0.2,
                                  cliprange_high=high)
        loss.backward()
        assert_close(logprobs.grad, torch.tensor([[grad]]))
