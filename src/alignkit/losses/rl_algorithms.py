"""The RL algorithms of `alignkit ppo|a2c|reinforce|rloo|grpo` as pairs of pure functions.

Every algorithm is an `Algorithm`: an advantage estimator, run once per rollout batch, and a loss,
run on every minibatch. The trainer's loop is the same for all of them (rollout -> score ->
KL-shaped rewards -> advantages -> epochs of minibatch updates); it picks the pair from
`ALGORITHMS` by name. Estimators and losses take tensors and keyword hyperparameters: each names
the ones it reads and ignores any others (`**_`), so one call with every keyword serves them all.
The trainer passes only what the stage's config holds for its algorithm (`RLConfig.targets_options`,
`RLConfig.loss_options`) plus the current beta as `kl_coef` to the losses, and the scores of the whole
batch (every process's) as `batch_scores` to the estimators.

A loss is a mean over its minibatch of *terms* (`aggregation_terms`: response tokens by default; for
GRPO's `aggregation` option, responses or responses x max_len); the trainer multiplies it back by the
count to give the loop a sum, so any split of the batch gives the same loss.

Notation as in `alignkit.losses.policy` and `alignkit.ops.advantages`: per-token ``rewards`` B×T
(KL penalty on every token, score at the last one, from ``kl_penalized_rewards``), sequence
``scores`` B, ``values`` B×T, ``response_mask`` B×T. Samples are prompt-major: B = n_prompts * k.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from alignkit.losses.policy import a2c_loss, grpo_loss, ppo_policy_loss, reinforce_loss, value_loss
from alignkit.ops.advantages import gae, grpo_advantages, rloo_advantages
from alignkit.ops.masking import masked_whiten

Metrics = dict[str, torch.Tensor]
Targets = tuple[torch.Tensor, torch.Tensor]


def _maybe_whiten(advantages: torch.Tensor, mask: torch.Tensor, whiten: bool) -> torch.Tensor:
    return masked_whiten(advantages, mask) if whiten else advantages


def _per_token(seq_advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Broadcast B sequence advantages over the response tokens (0 elsewhere): B -> B×T."""
    return torch.where(mask, seq_advantages[:, None].to(torch.float32), 0.0)


# ---------------------------------------------------------------------------------------------
# Advantage estimators: (advantages B×T, returns B×T); returns are the value targets (0 if no critic)
# ---------------------------------------------------------------------------------------------


def gae_targets(rewards, values, scores, response_mask, *, gamma, lam, whiten, **_) -> Targets:
    """PPO: GAE(gamma, lam) advantages and returns R_t = A_t + V(s_t) (Schulman et al. 2016).

    Advantages are whitened over the batch's response tokens when `whiten` (returns are not).
    """
    advantages, returns = gae(rewards, values, response_mask, gamma=gamma, lam=lam)
    return _maybe_whiten(advantages, response_mask, whiten), returns


def td_targets(rewards, values, scores, response_mask, *, gamma, whiten, **_) -> Targets:
    """A2C: the TD error A_t = r_t + gamma V(s_{t+1}) - V(s_t) (Xiao & Zhu, Eq. 10.31; GAE with lam = 0)."""
    advantages, returns = gae(rewards, values, response_mask, gamma=gamma, lam=0.0)
    return _maybe_whiten(advantages, response_mask, whiten), returns


def baseline_targets(rewards, values, scores, response_mask, *, gamma, whiten, **_) -> Targets:
    """REINFORCE with a learned baseline: A_t = sum_{k>=t} gamma^(k-t) r_k - V(s_t) (Eq. 10.26-10.27).

    That is GAE with lam = 1; the return (reward-to-go) is the value model's target.
    """
    advantages, returns = gae(rewards, values, response_mask, gamma=gamma, lam=1.0)
    return _maybe_whiten(advantages, response_mask, whiten), returns


def rloo_targets(rewards, values, scores, response_mask, *, k, whiten, **_) -> Targets:
    """RLOO: the sequence reward (score - beta * KL, the sum of the KL-shaped rewards) minus the mean
    of the other k - 1 samples of the same prompt (Ahmadian et al. 2024, Eq. 8), on every token."""
    seq_rewards = torch.where(response_mask, rewards, 0.0).sum(dim=1)  # B
    advantages = _per_token(rloo_advantages(seq_rewards, k), response_mask)
    return _maybe_whiten(advantages, response_mask, whiten), torch.zeros_like(advantages)


def group_targets(rewards, values, scores, response_mask, *, k, scale="group", batch_scores=None, **_) -> Targets:
    """GRPO: scores centred within each prompt's group of k and scaled by `scale` (`grpo_advantages`):
    the group's std (Shao et al. 2024, Sec. 4.1.2), the whole batch's, or none (Dr. GRPO).

    The KL penalty is in the loss, not the reward, so only the scores are used; not whitened again.
    """
    advantages = _per_token(grpo_advantages(scores, k, scale=scale, batch_scores=batch_scores), response_mask)
    return advantages, torch.zeros_like(advantages)


# ---------------------------------------------------------------------------------------------
# Losses: (loss as a mean over the minibatch's terms, by default its response tokens; metrics)
# ---------------------------------------------------------------------------------------------


def ppo_loss(logprobs, values, batch, *, cliprange, cliprange_value, value_coef, cliprange_low=None,
             cliprange_high=None, **_) -> tuple:
    """PPO: clipped surrogate (Eq. 10.49-10.50) + value_coef * (optionally clipped) value MSE."""
    mask = batch["response_mask"]
    policy, metrics = ppo_policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], mask,
                                      cliprange=cliprange, cliprange_low=cliprange_low,
                                      cliprange_high=cliprange_high)
    value, value_metrics = value_loss(values, batch["old_values"], batch["returns"], mask,
                                      cliprange_value=cliprange_value)
    return policy + value_coef * value, {**metrics, **value_metrics}


def actor_critic_loss(logprobs, values, batch, *, value_coef, **_) -> tuple:
    """A2C: -log pi * A_t + value_coef * (V - R)^2 in one loss (Eq. 10.40)."""
    return a2c_loss(logprobs, values, batch["advantages"], batch["returns"], batch["response_mask"],
                    value_coef=value_coef)


def reinforce_baseline_loss(logprobs, values, batch, *, value_coef, **_) -> tuple:
    """REINFORCE with baseline (Eq. 10.26) + value_coef * the baseline's MSE to the returns."""
    mask = batch["response_mask"]
    policy, metrics = reinforce_loss(logprobs, batch["advantages"], mask)
    value, value_metrics = value_loss(values, batch["old_values"], batch["returns"], mask)
    return policy + value_coef * value, {**metrics, **value_metrics}


def clipped_policy_loss(logprobs, values, batch, *, cliprange, cliprange_low=None, cliprange_high=None,
                        **_) -> tuple:
    """RLOO's policy loss: the clipped surrogate with the leave-one-out advantages, no critic.

    On-policy (one epoch, one minibatch) the ratio is 1 and its gradient equals REINFORCE's,
    -A * grad log pi; the clip only acts when a batch is reused for several updates.
    """
    return ppo_policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], batch["response_mask"],
                           cliprange=cliprange, cliprange_low=cliprange_low, cliprange_high=cliprange_high)


def group_policy_loss(logprobs, values, batch, *, cliprange, kl_coef, cliprange_low=None, cliprange_high=None,
                      aggregation="sequence", max_len=None, **_) -> tuple:
    """GRPO: clipped surrogate + kl_coef * k3 KL to the reference in the loss (Shao et al. 2024, Eq. 3),
    reduced by `aggregation` (sequence: Eq. 3; token: DAPO; fixed_length: Dr. GRPO, see `aggregate`)."""
    return grpo_loss(logprobs, batch["old_logprobs"], batch["ref_logprobs"], batch["advantages"],
                     batch["response_mask"], cliprange=cliprange, kl_coef=kl_coef, cliprange_low=cliprange_low,
                     cliprange_high=cliprange_high, aggregation=aggregation, max_len=max_len)


@dataclass(frozen=True)
class Algorithm:
    """An RL algorithm: whether it trains a critic and where its KL penalty goes, and its two functions."""

    critic: bool
    """Trains a value model (and reads its values for the advantages)."""
    kl_in_reward: bool
    """The KL penalty is in the per-token rewards (Ziegler et al.); else it is in the loss (GRPO)."""
    grouped: bool
    """Needs k >= 2 samples per prompt (a group baseline)."""
    targets: Callable[..., Targets]
    loss: Callable[..., tuple[torch.Tensor, Metrics]]


ALGORITHMS: dict[str, Algorithm] = {
    "ppo": Algorithm(critic=True, kl_in_reward=True, grouped=False, targets=gae_targets, loss=ppo_loss),
    "a2c": Algorithm(critic=True, kl_in_reward=True, grouped=False, targets=td_targets,
                     loss=actor_critic_loss),
    "reinforce": Algorithm(critic=True, kl_in_reward=True, grouped=False, targets=baseline_targets,
                           loss=reinforce_baseline_loss),
    "rloo": Algorithm(critic=False, kl_in_reward=True, grouped=True, targets=rloo_targets,
                      loss=clipped_policy_loss),
    "grpo": Algorithm(critic=False, kl_in_reward=False, grouped=True, targets=group_targets,
                      loss=group_policy_loss),
}
