"""Advantage estimators: GAE over tokens, RLOO and GRPO group baselines.

Notation (Xiao & Zhu, Sec. 10.3.1): per-token rewards r_t, values V(s_t), discount gamma, GAE
parameter lam. Per-token tensors are B×T; ``response_mask`` is True on response tokens. All
estimators here produce *targets*: inputs are detached and nothing here carries gradient.
"""

from __future__ import annotations

import torch


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over response tokens.

    Equations, written as the reverse recursion over the response tokens t = T..1:
        delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)        (TD error, Xiao & Zhu, Eq. 10.31)
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V(s_t)                              (the value target, Eq. 10.32)
    with V(s_{T+1}) = 0 and A_{T+1} = 0 after the last response token. Special cases:
    lam = 0 gives the TD error A_t = r_t + gamma V(s_{t+1}) - V(s_t) (Eq. 10.31); lam = 1 and
    gamma = 1 give the Monte-Carlo return minus the value, A_t = sum_{k>=t} r_k - V(s_t)
    (Eq. 10.26-10.27).

    Positions outside ``response_mask`` are skipped: the recursion carries A_{t+1} and
    V(s_{t+1}) across them unchanged, so left padding, a prompt prefix or right padding in the
    same B×T tensor do not change the result. Rewards and values there are ignored (so "values
    beyond the last response token are 0" holds whatever the tensor holds there).

    Shapes:
        rewards: B×T per-token rewards (e.g. from ``kl_penalized_rewards``).
        values: B×T value estimates V(s_t).
        response_mask: B×T bool.
        returns: ``(advantages, returns)``, both B×T, 0 outside the mask.

    No reduction; the loop runs over T and is vectorised over B.
    """
    rewards, values = rewards.detach(), values.detach()
    mask = response_mask.to(torch.bool)
    zeros = torch.zeros_like(rewards[:, 0])  # B
    next_value, next_adv = zeros, zeros
    advantages = torch.zeros_like(rewards)  # B×T
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        m = mask[:, t]
        advantages[:, t] = torch.where(m, adv_t, zeros)
        # Skip masked positions: carry the next step's quantities across them.
        next_adv = torch.where(m, adv_t, next_adv)
        next_value = torch.where(m, values[:, t], next_value)
    returns = torch.where(mask, advantages + values, torch.zeros_like(values))
    return advantages, returns


def _groups(scores: torch.Tensor, k: int) -> torch.Tensor:
    """View prompt-major scores (B = n_prompts * k) as n_prompts × k, checking the layout."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (B = n_prompts * k), got shape {tuple(scores.shape)}")
    if k < 2 or scores.shape[0] % k != 0:
        raise ValueError(f"need k >= 2 samples per prompt dividing B={scores.shape[0]}, got k={k}")
    return scores.detach().view(-1, k)


def rloo_advantages(scores: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (Kool et al. 2019; Ahmadian et al. 2024).

    Equation: for sample i of a prompt with k samples,
        A_i = s_i - (1 / (k - 1)) * sum_{j != i} s_j
    i.e. the baseline b of Xiao & Zhu, Eq. 10.26, is the mean score of the *other* samples for
    the same prompt, so it does not depend on the sample it is subtracted from.

    Shapes:
        scores: B sequence-level scores, laid out prompt-major: B = n_prompts * k and
            scores[p * k + i] is sample i of prompt p.
        returns: B advantages (same layout).

    No reduction.
    """
    grouped = _groups(scores, k)  # n_prompts × k
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).reshape(-1)


def grpo_advantages(
    scores: torch.Tensor,
    k: int,
    eps: float = 1e-4,
    scale: str = "group",
    batch_scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Group-relative advantages of GRPO (Shao et al. 2024, DeepSeekMath, Sec. 4.1.2) and two variants.

    Equations, over the k samples j of the prompt of sample i, with unbiased (n - 1) standard
    deviations:
        scale = "group":  A_i = (s_i - mean_j s_j) / (std_j s_j + eps)       (GRPO, Sec. 4.1.2)
        scale = "batch":  A_i = (s_i - mean_j s_j) / (std(batch scores) + eps)
                          (the group mean, one std of the scores of the whole batch: Liu et al.
                          2025, "Part I: Tricks or Traps?"; TRL's scale_rewards="batch")
        scale = "none":   A_i = s_i - mean_j s_j
                          (Liu et al. 2025, "Dr. GRPO": the group std over-weights prompts whose
                          samples agree, i.e. ones that are too easy or too hard)
    The batch std is taken over ``batch_scores`` when given (the scores of every process, so that
    every process divides by the same figure), else over ``scores``.

    Shapes:
        scores: B sequence-level scores, prompt-major: B = n_prompts * k.
        batch_scores: N >= 2 scores (the global batch) or None.
        returns: B advantages (same layout).

    No reduction. A group with equal scores gets advantage 0 (``eps`` avoids 0/0).
    """
    grouped = _groups(scores, k)  # n_prompts × k
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        pool = scores if batch_scores is None else batch_scores
        centred = centred / (pool.detach().to(grouped.dtype).reshape(-1).std() + eps)
    elif scale != "none":
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    return centred.reshape(-1)
