"""KL estimators, KL-shaped rewards, and the adaptive KL controller (incl. a toy bandit)."""

import math

import pytest
import torch
from torch.testing import assert_close

from alignkit.losses.kl import (
    AdaptiveKLController,
    FixedKLController,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalized_rewards,
)
from alignkit.losses.policy import reinforce_loss


def test_estimators_by_hand():
    # pi = 0.5, pi_ref = 0.25: d = log pi - log pi_ref = log 2 = 0.693147
    # k1 = 0.693147;  k2 = d^2 / 2 = 0.240227;  k3 = exp(-d) + d - 1 = 0.5 + 0.693147 - 1 = 0.193147
    logprobs, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert_close(kl_k1(logprobs, ref), torch.tensor([0.693147]))
    assert_close(kl_k2(logprobs, ref), torch.tensor([0.240227]))
    assert_close(kl_k3(logprobs, ref), torch.tensor([0.193147]))


def test_k1_and_k3_expectations_equal_the_exact_kl():
    # Exact expectation over a categorical pi: sum_y pi(y) k(y) = KL(pi || pi_ref) for k1 and k3.
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(7, generator=g), 0)
    ref = torch.log_softmax(torch.randn(7, generator=g), 0)
    exact = (logp.exp() * (logp - ref)).sum()
    assert_close((logp.exp() * kl_k1(logp, ref)).sum(), exact)
    assert_close((logp.exp() * kl_k3(logp, ref)).sum(), exact)
    assert torch.all(kl_k3(logp, ref) >= 0)


def test_kl_penalized_rewards_by_hand():
    # beta = 0.1; row 0 has 3 response tokens, row 1 has 2 (then padding).
    # row 0: log-ratios (0.5, -0.2, 1.0) -> -beta * k1 = (-0.05, 0.02, -0.1); score 2 at t=2 -> 1.9
    # row 1: log-ratios (0.3, 0.4)       -> (-0.03, -0.04); score -1 at t=1 -> -1.04; pad -> 0
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -3.0]])
    ref = torch.tensor([[-1.5, -1.8, -1.5], [-1.3, -1.4, -0.1]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    scores = torch.tensor([2.0, -1.0])
    rewards, metrics = kl_penalized_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    assert_close(rewards, torch.tensor([[-0.05, 0.02, 1.9], [-0.03, -1.04, 0.0]]))
    # Per-sequence KL sums: 1.3 and 0.7 -> mean 1.0; non-score reward -0.1.
    assert_close(metrics["objective/kl"], torch.tensor(1.0))
    assert_close(metrics["objective/non_score_reward"], torch.tensor(-0.1))
    assert_close(metrics["objective/kl_coef"], torch.tensor(0.1))
    given, _ = kl_penalized_rewards(scores, logprobs, ref, mask, kl_coef=0.1, last_index=torch.tensor([2, 1]))
    assert_close(given, rewards)


def test_kl_penalized_rewards_sum_to_score_minus_beta_sequence_kl():
    g = torch.Generator().manual_seed(1)
    logprobs, ref = -torch.rand(4, 6, generator=g), -torch.rand(4, 6, generator=g)
    mask = torch.arange(6) < torch.tensor([[6], [3], [1], [5]])
    scores = torch.randn(4, generator=g)
    rewards, _ = kl_penalized_rewards(scores, logprobs, ref, mask, kl_coef=0.05)
    seq_kl = torch.where(mask, logprobs - ref, 0.0).sum(1)
    assert_close(rewards.sum(1), scores - 0.05 * seq_kl)


def test_kl_penalized_rewards_refuse_a_row_without_response_tokens():
    # No last response token to carry the score (the old fallback put it on the last column, a pad).
    logprobs = ref = torch.zeros(2, 3)
    mask = torch.tensor([[True, False, False], [False, False, False]])
    with pytest.raises(ValueError, match="at least one token"):
        kl_penalized_rewards(torch.ones(2), logprobs, ref, mask, kl_coef=0.1)


@pytest.mark.parametrize("n_steps", [1, 16, 256])
def test_adaptive_controller_at_twice_the_target(n_steps):
    # KL = 2 * target -> e = clip((2t - t)/t, -0.2, 0.2) = 0.2 -> beta * (1 + 0.2 * n / horizon).
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    new = ctl.update(torch.tensor(12.0), n_steps=n_steps)
    assert new == pytest.approx(0.1 * (1 + 0.2 * n_steps / 10_000), rel=1e-12)
    assert ctl.value == new


def test_adaptive_controller_shrinks_clips_and_holds():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    assert ctl.update(0.0, n_steps=10) == pytest.approx(0.1 * (1 - 0.2 * 10 / 100))  # e = -1 clipped to -0.2
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    assert ctl.update(6.6, n_steps=10) == pytest.approx(0.1 * (1 + 0.1 * 10 / 100))  # e = 0.1, not clipped
    assert ctl.update(6.0, n_steps=10) == pytest.approx(
        0.1 * (1 + 0.1 * 10 / 100)
    )  # at the target: no change


def test_controller_state_round_trips():
    ctl = AdaptiveKLController(0.2, target=3.0, horizon=50)
    ctl.update(5.0, n_steps=4)
    state = ctl.state_dict()
    assert all(isinstance(v, float) for v in state.values())
    restored = AdaptiveKLController(1.0, target=1.0, horizon=1)
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    fixed = FixedKLController(0.3)
    assert fixed.update(100.0, n_steps=8) == 0.3
    assert fixed.state_dict() == {"value": 0.3}


def test_adaptive_controller_settles_the_kl_of_a_toy_bandit_near_the_target():
    # A 5-armed bandit, a categorical policy (logits) starting at the uniform reference, trained by
    # gradient ascent on reward - beta * KL: sampled arms -> KL-shaped rewards -> REINFORCE with a
    # mean baseline; beta is driven by the adaptive controller from the measured (k1) KL.
    g = torch.Generator().manual_seed(0)
    arm_rewards = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0])
    ref = torch.log_softmax(torch.zeros(5), 0)
    logits = torch.zeros(5, requires_grad=True)
    opt = torch.optim.SGD([logits], lr=0.5)
    target, batch = 0.3, 256
    ctl = AdaptiveKLController(0.01, target=target, horizon=20)
    mask = torch.ones(batch, 1, dtype=torch.bool)
    exact_kls = []
    for _ in range(1000):
        logp = torch.log_softmax(logits, 0)
        arms = torch.multinomial(logp.exp().detach(), batch, replacement=True, generator=g)
        lp = logp[arms].unsqueeze(1)  # B×1: one "token" per episode
        rewards, metrics = kl_penalized_rewards(
            arm_rewards[arms], lp, ref[arms].unsqueeze(1), mask, kl_coef=ctl.value
        )
        loss, _ = reinforce_loss(lp, rewards - rewards.mean(), mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctl.update(metrics["objective/kl"], n_steps=1)
        exact_kls.append((logp.exp() * (logp - ref)).sum().item())
    # beta starts too small, so the KL first overshoots (towards log 5 = 1.61 for the greedy policy).
    assert max(exact_kls) > 3 * target
    assert all(0.8 * target <= kl <= 1.2 * target for kl in exact_kls[-200:])
