"""Policy-gradient losses: PPO (clipped), value, REINFORCE, A2C and GRPO.

Notation (Xiao & Zhu, Sec. 10.3.3): ``logprobs`` = log pi_theta(y_t | x, y_<t) of the sampled
tokens, ``old_logprobs`` = the same under the policy that sampled them, ``advantages`` A_t.

Reduction: every loss is a *token mean over the response mask*: the sum of per-token losses over
all response tokens of the batch divided by ``num_tokens``, which defaults to the number of
response tokens in this batch. Under gradient accumulation pass the token count of the whole
accumulated batch as ``num_tokens`` so that the summed micro-batch losses equal the full-batch
loss, however the batch is split. Sequence-level advantages (shape B) are broadcast over tokens.
"""

from __future__ import annotations

import torch

from alignkit.losses.kl import kl_k3
from alignkit.ops.masking import masked_mean, masked_sum

Metrics = dict[str, torch.Tensor]


def _token_mean(x: torch.Tensor, mask: torch.Tensor, num_tokens: int | torch.Tensor | None) -> torch.Tensor:
    """Sum over masked tokens / ``num_tokens`` (default: the masked token count of ``mask``)."""
    if num_tokens is None:
        return masked_mean(x, mask)
    return masked_sum(x, mask) / num_tokens


def _per_token(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast B sequence-level advantages to B×T; pass B×T through. Detached."""
    advantages = advantages.detach()
    return advantages.unsqueeze(-1).expand_as(like) if advantages.dim() == 1 else advantages


def _clipped_surrogate(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, cliprange: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO-clip loss, clipped indicator and k3 approx KL(old || new); all B×T."""
    log_ratio = logprobs - old_logprobs.detach()
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    losses = torch.maximum(unclipped, clipped)  # = -min(ratio A, clip(ratio) A)
    approx_kl = (ratio - 1.0) - log_ratio  # k3 with samples from the old policy
    return losses, (clipped > unclipped).to(logprobs.dtype), approx_kl.detach()


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    cliprange: float,
    num_tokens: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """PPO clipped surrogate loss (Schulman et al. 2017, Eq. 7; Xiao & Zhu, Eq. 10.49-10.50).

    Equation, with rho_t = pi(y_t) / pi_old(y_t) = exp(logprobs - old_logprobs):
        L = -mean_t min(rho_t * A_t, clip(rho_t, 1 - eps, 1 + eps) * A_t)
    Xiao & Zhu's Eq. 10.50 writes the min over the ratios, min(rho, clip(rho)) * A; that agrees
    with the above only for A >= 0. We implement the standard PPO form (min over the products),
    which is the pessimistic bound for both signs of A. The KL penalty of Eq. 10.53 is applied
    in the rewards (``kl_penalized_rewards``), as in Ziegler et al. 2019, not here.

    Shapes:
        logprobs, old_logprobs: B×T.
        advantages: B×T (or B, broadcast over tokens).
        response_mask: B×T bool.
        returns: scalar loss and metrics.

    Reduces by the token mean over the response mask (see module docstring). Metrics:
    ``loss/policy``, ``policy/clipfrac`` (fraction of tokens where the clip is active),
    ``policy/approx_kl`` (k3 estimate of KL(pi_old || pi)).
    """
    advantages = _per_token(advantages, logprobs)
    losses, clipped, approx_kl = _clipped_surrogate(logprobs, old_logprobs, advantages, cliprange)
    loss = _token_mean(losses, response_mask, num_tokens)
    metrics = {
        "loss/policy": loss.detach(),
        "policy/clipfrac": masked_mean(clipped, response_mask),
        "policy/approx_kl": masked_mean(approx_kl, response_mask),
    }
    return loss, metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    cliprange_value: float | None = None,
    num_tokens: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Squared-error value loss (Xiao & Zhu, Eq. 10.32), optionally clipped as in PPO.

    Equation: L = mean_t (V(s_t) - R_t)^2, where R_t is the return target (e.g. from ``gae``,
    R_t = A_t + V_old(s_t); with lam = 0 it is r_t + gamma V(s_{t+1}) as in Eq. 10.32). There is
    no 1/2 factor; scale it with the trainer's value coefficient. With ``cliprange_value`` c:
        V_clip = V_old + clip(V - V_old, -c, c),  L = mean_t max((V - R)^2, (V_clip - R)^2).

    Shapes:
        values, old_values, returns: B×T.
        response_mask: B×T bool.
        returns: scalar loss and metrics.

    Reduces by the token mean over the response mask. Metrics: ``loss/value``,
    ``value/clipfrac`` (0 without clipping), ``value/mean``.
    """
    returns = returns.detach()
    losses = (values - returns) ** 2
    clipfrac = torch.zeros((), dtype=values.dtype, device=values.device)
    if cliprange_value is not None:
        old_values = old_values.detach()
        clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
        clipped_losses = (clipped_values - returns) ** 2
        clipfrac = masked_mean((clipped_losses > losses).to(values.dtype), response_mask)
        losses = torch.maximum(losses, clipped_losses)
    loss = _token_mean(losses, response_mask, num_tokens)
    metrics = {
        "loss/value": loss.detach(),
        "value/clipfrac": clipfrac.detach(),
        "value/mean": masked_mean(values.detach(), response_mask),
    }
    return loss, metrics


def reinforce_loss(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    num_tokens: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """REINFORCE with a baseline (Williams 1992; Xiao & Zhu, Eq. 10.26).

    Equation: L = -mean_t log pi(y_t) * A_t, where the caller supplies A_t = sum_{k>=t} r_k - b
    (e.g. ``gae`` with lam = 1 and the baseline as V, or ``rloo_advantages`` per sequence).

    Shapes:
        logprobs: B×T.
        advantages: B×T (or B, broadcast over tokens).
        response_mask: B×T bool.
        returns: scalar loss and metrics.

    Reduces by the token mean over the response mask (Eq. 10.26 sums over t; the token mean
    rescales each sequence's gradient by the batch's token count). Metrics: ``loss/policy``.
    """
    advantages = _per_token(advantages, logprobs)
    loss = _token_mean(-logprobs * advantages, response_mask, num_tokens)
    return loss, {"loss/policy": loss.detach()}


def a2c_loss(
    logprobs: torch.Tensor,
    values: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    value_coef: float = 0.5,
    num_tokens: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Advantage actor-critic loss: actor and critic in one (Mnih et al. 2016; Xiao & Zhu, Eq. 10.40).

    Equation: L = -mean_t log pi(y_t) A_t + value_coef * mean_t (V(s_t) - R_t)^2, with A_t the TD
    error r_t + gamma V(s_{t+1}) - V(s_t) (Eq. 10.31, ``gae`` with lam = 0) or any GAE, and R_t
    the value target (Eq. 10.32).

    Shapes:
        logprobs, values, returns: B×T.
        advantages: B×T (or B).
        response_mask: B×T bool.
        returns: scalar loss and metrics.

    Reduces by the token mean over the response mask. Metrics: ``loss/policy``, ``loss/value``,
    ``loss/total``.
    """
    policy, _ = reinforce_loss(logprobs, advantages, response_mask, num_tokens=num_tokens)
    value, _ = value_loss(values, values, returns, response_mask, num_tokens=num_tokens)
    loss = policy + value_coef * value
    metrics = {"loss/policy": policy.detach(), "loss/value": value.detach(), "loss/total": loss.detach()}
    return loss, metrics


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    cliprange: float,
    kl_coef: float,
    num_tokens: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """GRPO loss: PPO clipped surrogate plus a k3 KL penalty in the loss (Shao et al. 2024, Eq. 3).

    Equation, with rho_t and the clip as in ``ppo_policy_loss`` and the k3 estimator of
    KL(pi || pi_ref) (``kl_k3``):
        L = mean_t [ -min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A) + beta * k3_t ]
    A is the group-normalised sequence advantage (``grpo_advantages``), the same for every token.

    Shapes:
        logprobs, old_logprobs, ref_logprobs: B×T.
        advantages: B (or B×T).
        response_mask: B×T bool.
        returns: scalar loss and metrics.

    Reduces by the token mean over the response mask of the whole batch. DeepSeekMath's Eq. 3
    averages per sequence first (1/|o_i|), which weights short responses' tokens more; the token
    mean does not. Metrics: ``loss/policy``, ``policy/clipfrac``, ``policy/approx_kl``,
    ``objective/kl_k3_token_mean`` (the token mean of k3 in the loss; not ``objective/kl``, which is
    the per-response sequence KL everywhere).
    """
    advantages = _per_token(advantages, logprobs)
    losses, clipped, approx_kl = _clipped_surrogate(logprobs, old_logprobs, advantages, cliprange)
    kl = kl_k3(logprobs, ref_logprobs.detach())  # B×T
    loss = _token_mean(losses + kl_coef * kl, response_mask, num_tokens)
    metrics = {
        "loss/policy": loss.detach(),
        "policy/clipfrac": masked_mean(clipped, response_mask),
        "policy/approx_kl": masked_mean(approx_kl, response_mask),
        "objective/kl_k3_token_mean": masked_mean(kl.detach(), response_mask),
    }
    return loss, metrics
