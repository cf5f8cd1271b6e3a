"""Policy-gradient losses: PPO (clipped), value, REINFORCE, A2C and GRPO.

Notation (Xiao & Zhu, Sec. 10.3.3): ``logprobs`` = log pi_theta(y_t | x, y_<t) of the sampled
tokens, ``old_logprobs`` = the same under the policy that sampled them, ``advantages`` A_t.

Reduction: by default every loss is a *token mean over the response mask*: the sum of per-token
losses over all response tokens of the batch divided by ``num_tokens``, which defaults to the number
of response tokens in this batch. Under gradient accumulation pass the token count of the whole
accumulated batch as ``num_tokens`` so that the summed micro-batch losses equal the full-batch
loss, however the batch is split. Sequence-level advantages (shape B) are broadcast over tokens.

The clipped losses (``ppo_policy_loss``, ``grpo_loss``) also take ``aggregation`` (see
``aggregate``): ``token`` (the above), ``sequence`` (each response's token mean, then the mean over
responses) or ``fixed_length`` (the token sum over responses x ``max_len``). Each is a sum of terms
divided by a count (``aggregation_terms``), so the same protocol holds: pass the count of the whole
accumulated batch as ``num_terms``.
"""

from __future__ import annotations

from typing import Literal

import torch

from alignkit.losses.kl import kl_k3
from alignkit.ops.masking import masked_mean, masked_sum

Metrics = dict[str, torch.Tensor]
Aggregation = Literal["token", "sequence", "fixed_length"]
AGGREGATIONS: tuple[str, ...] = ("token", "sequence", "fixed_length")


def _token_mean(x: torch.Tensor, mask: torch.Tensor, num_tokens: int | torch.Tensor | None) -> torch.Tensor:
    """Sum over masked tokens / ``num_tokens`` (default: the masked token count of ``mask``)."""
    if num_tokens is None:
        return masked_mean(x, mask)
    return masked_sum(x, mask) / num_tokens


def _per_token(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast B sequence-level advantages to B×T; pass B×T through. Detached."""
    advantages = advantages.detach()
    return advantages.unsqueeze(-1).expand_as(like) if advantages.dim() == 1 else advantages


def aggregation_terms(response_mask: torch.Tensor, aggregation: Aggregation = "token", *,
                      max_len: int | None = None) -> int:
    """The number of terms a loss aggregated by ``aggregation`` divides its sum by (see ``aggregate``).

    ``token``: the response tokens; ``sequence``: the responses (rows, B); ``fixed_length``:
    B * ``max_len``. Counts add up over micro-batches and processes, so the count of a whole
    accumulated batch is the sum of its parts'.

    Shapes:
        response_mask: B×T bool.
        returns: a Python int.
    """
    if aggregation == "token":
        return int(response_mask.sum())
    if aggregation == "sequence":
        return int(response_mask.shape[0])
    if aggregation == "fixed_length":
        if not max_len or max_len < response_mask.shape[1]:
            raise ValueError(f"aggregation fixed_length needs max_len >= the response length "
                             f"{response_mask.shape[1]}, got {max_len}")
        return int(response_mask.shape[0]) * int(max_len)
    raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {', '.join(AGGREGATIONS)}")


def aggregate(
    losses: torch.Tensor,
    response_mask: torch.Tensor,
    aggregation: Aggregation = "token",
    *,
    max_len: int | None = None,
    num_terms: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce per-token losses to a scalar: a sum of terms over ``num_terms`` (``aggregation_terms``).

    Equations, for B responses i with |o_i| response tokens and per-token losses l_{i,t}:
        token         L = sum_i sum_t l_{i,t} / sum_i |o_i|
                      (the token mean over the batch: DAPO, Yu et al. 2025, Sec. 3.3)
        sequence      L = (1/B) sum_i (1/|o_i|) sum_t l_{i,t}
                      (each response's token mean, then the mean over responses: GRPO, Shao et al.
                      2024, Eq. 3; a row with no response token has mean 0)
        fixed_length  L = sum_i sum_t l_{i,t} / (B * max_len)
                      (a constant instead of 1/|o_i|: Dr. GRPO, Liu et al. 2025, "Understanding
                      R1-Zero-Like Training", with max_len the generation budget, ``max_new_tokens``)
    The terms are tokens, per-response means, and tokens again; ``num_terms`` (default: the count
    of this batch) is the denominator, so micro-batches given the whole batch's count sum to the
    whole batch's loss, however the rows are split (rows are never split).

    Shapes:
        losses: B×T per-token losses.
        response_mask: B×T bool.
        returns: a scalar.

    Reduces as above; positions outside the mask are never read.
    """
    if num_terms is None:
        num_terms = aggregation_terms(response_mask, aggregation, max_len=max_len)
    if aggregation == "sequence":
        total = masked_mean(losses, response_mask, dim=1).sum()  # sum over B of per-response token means
    else:
        total = masked_sum(losses, response_mask)
    return total / max(num_terms, 1) if isinstance(num_terms, int) else total / num_terms.clamp(min=1)


def _clip_bounds(cliprange: float, cliprange_low: float | None, cliprange_high: float | None) -> tuple[float, float]:
    """(1 - eps_low, 1 + eps_high), each eps defaulting to ``cliprange``."""
    low = cliprange if cliprange_low is None else cliprange_low
    high = cliprange if cliprange_high is None else cliprange_high
    return 1.0 - low, 1.0 + high


def _clipped_surrogate(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, bounds: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO-clip loss, clipped indicator and k3 approx KL(old || new); all B×T."""
    log_ratio = logprobs - old_logprobs.detach()
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, bounds[0], bounds[1])
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
    cliprange_low: float | None = None,
    cliprange_high: float | None = None,
    aggregation: Aggregation = "token",
    max_len: int | None = None,
    num_terms: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """PPO clipped surrogate loss (Schulman et al. 2017, Eq. 7; Xiao & Zhu, Eq. 10.49-10.50).

    Equation, with rho_t = pi(y_t) / pi_old(y_t) = exp(logprobs - old_logprobs):
        L = -mean_t min(rho_t * A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) * A_t)
    eps_low = ``cliprange_low`` and eps_high = ``cliprange_high`` both default to eps =
    ``cliprange`` (symmetric, as in PPO); a larger eps_high is DAPO's clip-higher (Yu et al. 2025,
    Sec. 3.1: 0.2 and 0.28), which lets the ratio of a token with A > 0 rise further before its
    gradient stops. Xiao & Zhu's Eq. 10.50 writes the min over the ratios, min(rho, clip(rho)) * A;
    that agrees with the above only for A >= 0. We implement the standard PPO form (min over the
    products), which is the pessimistic bound for both signs of A. The KL penalty of Eq. 10.53 is
    applied in the rewards (``kl_penalized_rewards``), as in Ziegler et al. 2019, not here.

    Shapes:
        logprobs, old_logprobs: B×T.
        advantages: B×T (or B, broadcast over tokens).
        response_mask: B×T bool.
        returns: scalar loss and metrics.

    Reduces by ``aggregate(..., aggregation, max_len=max_len, num_terms=num_terms)``: by default the
    token mean over the response mask (see module docstring). Metrics: ``loss/policy``,
    ``policy/clipfrac`` (fraction of tokens where the clip is active), ``policy/approx_kl`` (k3
    estimate of KL(pi_old || pi)); both token means.
    """
    advantages = _per_token(advantages, logprobs)
    bounds = _clip_bounds(cliprange, cliprange_low, cliprange_high)
    losses, clipped, approx_kl = _clipped_surrogate(logprobs, old_logprobs, advantages, bounds)
    loss = aggregate(losses, response_mask, aggregation, max_len=max_len, num_terms=num_terms)
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
    cliprange_low: float | None = None,
    cliprange_high: float | None = None,
    aggregation: Aggregation = "sequence",
    max_len: int | None = None,
    num_terms: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """GRPO loss: PPO clipped surrogate plus a k3 KL penalty in the loss (Shao et al. 2024, Eq. 3).

    Equation, with rho_t and the clip as in ``ppo_policy_loss`` (eps_low, eps_high default to
    ``cliprange``) and the k3 estimator of KL(pi || pi_ref) (``kl_k3``), per token
        l_{i,t} = -min(rho_t A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) A_i) + beta * k3_t
    and L = aggregate(l) (``aggregate``): by default (``sequence``, Eq. 3) the mean over the
    responses of each response's token mean, (1/G) sum_i (1/|o_i|) sum_t l_{i,t}, which weights
    short responses' tokens more; ``token`` is DAPO's token mean over the batch, ``fixed_length``
    Dr. GRPO's sum / (B * ``max_len``). A is the group-normalised sequence advantage
    (``grpo_advantages``), the same for every token of a response.

    Shapes:
        logprobs, old_logprobs, ref_logprobs: B×T.
        advantages: B (or B×T).
        response_mask: B×T bool.
        returns: scalar loss and metrics.

    Reduces by ``aggregate``; under accumulation pass the whole batch's ``aggregation_terms`` as
    ``num_terms``. Metrics: ``loss/policy``, ``policy/clipfrac``, ``policy/approx_kl``,
    ``objective/kl_k3_token_mean`` (the token mean of k3 in the loss; not ``objective/kl``, which is
    the per-response sequence KL everywhere); the last three are token means whatever the aggregation.
    """
    advantages = _per_token(advantages, logprobs)
    bounds = _clip_bounds(cliprange, cliprange_low, cliprange_high)
    losses, clipped, approx_kl = _clipped_surrogate(logprobs, old_logprobs, advantages, bounds)
    kl = kl_k3(logprobs, ref_logprobs.detach())  # B×T
    loss = aggregate(losses + kl_coef * kl, response_mask, aggregation, max_len=max_len, num_terms=num_terms)
    metrics = {
        "loss/policy": loss.detach(),
        "policy/clipfrac": masked_mean(clipped, response_mask),
        "policy/approx_kl": masked_mean(approx_kl, response_mask),
        "objective/kl_k3_token_mean": masked_mean(kl.detach(), response_mask),
    }
    return loss, metrics
