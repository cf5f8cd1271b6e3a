"""GAE, RLOO and GRPO advantages against hand-computed values and plain loops."""

import pytest
import torch
from torch.testing import assert_close

from alignkit.ops.advantages import gae, grpo_advantages, rloo_advantages


def gae_loop(rewards, values, mask, gamma, lam):
    """Plain Python GAE over each row's response tokens (skipping masked positions)."""
    advantages = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        idx = [t for t in range(rewards.shape[1]) if mask[b, t]]
        next_adv, next_value = 0.0, 0.0
        for t in reversed(idx):
            delta = rewards[b, t].item() + gamma * next_value - values[b, t].item()
            next_adv = delta + gamma * lam * next_adv
            next_value = values[b, t].item()
            advantages[b, t] = next_adv
    returns = torch.where(mask, advantages + values, 0.0)
    return advantages, returns


def test_gae_three_steps_by_hand():
    # r = (0, 0, 1), V = (0.5, 0.6, 0.7), gamma = 0.9, lam = 0.8, then one pad column (ignored).
    # delta_3 = 1 + 0.9*0 - 0.7 = 0.3;  delta_2 = 0 + 0.9*0.7 - 0.6 = 0.03;  delta_1 = 0.9*0.6 - 0.5 = 0.04
    # A_3 = 0.3;  A_2 = 0.03 + 0.72*0.3 = 0.246;  A_1 = 0.04 + 0.72*0.246 = 0.21712
    # returns = A + V = (0.71712, 0.846, 1.0)
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0]])
    mask = torch.tensor([[True, True, True, False]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert_close(advantages, torch.tensor([[0.21712, 0.246, 0.3, 0.0]]))
    assert_close(returns, torch.tensor([[0.71712, 0.846, 1.0, 0.0]]))


def _random_batch(seed):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(5, 8, generator=g)
    values = torch.randn(5, 8, generator=g)
    starts = torch.tensor([0, 2, 1, 0, 3])  # left padding / prompt prefix
    ends = torch.tensor([8, 6, 5, 1, 7])  # right padding
    t = torch.arange(8)
    mask = (t >= starts[:, None]) & (t < ends[:, None])
    return rewards, values, mask


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.8), (0.99, 0.0), (1.0, 1.0)])
def test_gae_matches_plain_loop(gamma, lam):
    rewards, values, mask = _random_batch(0)
    got = gae(rewards, values, mask, gamma=gamma, lam=lam)
    expected = gae_loop(rewards, values, mask, gamma, lam)
    assert_close(got[0], expected[0])
    assert_close(got[1], expected[1])


def test_gae_lambda_zero_is_the_td_error():
    # Eq. 10.31: A_t = r_t + gamma V(s_{t+1}) - V(s_t), with V = 0 after the last response token.
    rewards, values, _ = _random_batch(1)
    mask = torch.ones_like(rewards, dtype=torch.bool)
    gamma = 0.9
    next_values = torch.cat([values[:, 1:], torch.zeros(5, 1)], dim=1)
    advantages, _ = gae(rewards, values, mask, gamma=gamma, lam=0.0)
    assert_close(advantages, rewards + gamma * next_values - values)


def test_gae_lambda_one_gamma_one_is_monte_carlo_return_minus_value():
    # Eq. 10.26-10.27: A_t = sum_{k>=t} r_k - V(s_t); the return target is then sum_{k>=t} r_k.
    rewards, values, _ = _random_batch(2)
    mask = torch.ones_like(rewards, dtype=torch.bool)
    reward_to_go = rewards.flip(1).cumsum(1).flip(1)
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert_close(advantages, reward_to_go - values)
    assert_close(returns, reward_to_go)


def test_gae_carries_no_gradient():
    rewards, values, mask = _random_batch(3)
    values.requires_grad_(True)
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    assert not advantages.requires_grad and not returns.requires_grad


def test_rloo_by_hand():
    # One prompt, k = 3, scores (1, 2, 6): baselines (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5
    # -> advantages (1-4, 2-3.5, 6-1.5) = (-3, -1.5, 4.5).
    assert_close(rloo_advantages(torch.tensor([1.0, 2.0, 6.0]), k=3), torch.tensor([-3.0, -1.5, 4.5]))


def test_rloo_baseline_excludes_the_sample_itself():
    g = torch.Generator().manual_seed(4)
    n_prompts, k = 4, 5
    scores = torch.randn(n_prompts * k, generator=g)
    expected = torch.zeros_like(scores)
    for p in range(n_prompts):
        for i in range(k):
            others = [scores[p * k + j].item() for j in range(k) if j != i]
            expected[p * k + i] = scores[p * k + i] - sum(others) / len(others)
    assert_close(rloo_advantages(scores, k=k), expected)


def test_grpo_by_hand():
    # Group (1, 2, 3): mean 2, unbiased std 1 -> (-1, 0, 1) / (1 + 1e-4); second group (5, 5, 5) -> 0.
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    expected = torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / torch.tensor([1.0001, 1.0001, 1.0001, 1, 1, 1])
    assert_close(grpo_advantages(scores, k=3), expected)
    assert_close(grpo_advantages(scores, k=3, scale="none"), torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))


def test_grpo_advantage_scalings_by_hand():
    # Groups (1, 2, 3) and (4, 6, 8): means 2 and 6, centred (-1, 0, 1, -2, 0, 2); eps = 0.
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 6.0, 8.0])
    centred = torch.tensor([-1.0, 0.0, 1.0, -2.0, 0.0, 2.0])
    # group: unbiased stds 1 and 2 -> (-1, 0, 1, -1, 0, 1) (Shao et al.).
    assert_close(grpo_advantages(scores, k=3, eps=0.0, scale="group"), torch.tensor([-1.0, 0, 1, -1, 0, 1]))
    # batch: one std of all six scores: mean 4, squared deviations 9+4+1+0+4+16 = 34, 34/5 = 6.8,
    # std 2.607681 -> centred / 2.607681 = (-0.383482, 0, 0.383482, -0.766965, 0, 0.766965).
    assert_close(grpo_advantages(scores, k=3, eps=0.0, scale="batch"),
                 torch.tensor([-0.383482, 0.0, 0.383482, -0.766965, 0.0, 0.766965]))
    # batch with the scores of the whole batch (another process's six 4s): mean 4, 34/11 = 3.090909,
    # std 1.758098 -> centred / 1.758098.
    everyone = torch.cat([scores, torch.full((6,), 4.0)])
    assert_close(grpo_advantages(scores, k=3, eps=0.0, scale="batch", batch_scores=everyone),
                 centred / 1.758098)
    # none (Dr. GRPO): the centred scores.
    assert_close(grpo_advantages(scores, k=3, scale="none"), centred)
    with pytest.raises(ValueError, match="scale"):
        grpo_advantages(scores, k=3, scale="std")


def test_group_advantages_reject_bad_layouts():
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(torch.zeros(6), k=4)
    with pytest.raises(ValueError, match="k >= 2"):
        grpo_advantages(torch.zeros(6), k=1)
    with pytest.raises(ValueError, match="1-D"):
        rloo_advantages(torch.zeros(3, 2), k=2)
