"""Drawing one token per row from next-token logits: top-k / top-p filters and inverse-CDF sampling."""

from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then nucleus (top-p) filtering: removed tokens get -inf; at least one token is kept.

    Top-k keeps tokens whose logit is >= the k-th largest (ties kept); top-p keeps the smallest set of
    most probable tokens whose probability reaches `top_p` (Holtzman et al. 2020, Sec. 3.1).

    Shapes:
        logits: B×V. returns: B×V (a new tensor when filtering, else `logits` itself).
    """
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # B×1
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # B×V
        probs = sorted_logits.softmax(dim=-1)
        # Remove a token when the tokens ranked above it already reach top_p (so the first is kept).
        remove_sorted = probs.cumsum(dim=-1) - probs >= top_p
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row from (unnormalised) probabilities, by inverting the cumulative distribution.

    Draws u ~ U[0, 1) (B numbers from `generator`) and returns the first index whose cumulative
    probability exceeds u * total. Same distribution as `torch.multinomial(probs, 1)`, but it reads B
    random numbers instead of B×V exponentials, which makes it ~15x faster on CPU at V = 4096.
    Zero-probability tokens are never drawn (their cumulative sum does not increase).

    Shapes:
        probs: B×V, non-negative, each row with a positive sum. returns: B long.
    """
    cdf = probs.cumsum(dim=-1)  # B×V
    total = cdf[:, -1:].contiguous()  # B×1
    u = torch.rand(total.shape, generator=generator, device=probs.device, dtype=cdf.dtype) * total
    index = torch.searchsorted(cdf, u, right=True)
    # u * total can round up to total; then take the last token with positive probability.
    last = torch.searchsorted(cdf, total, right=False)
    return torch.where(index >= probs.shape[-1], last, index).squeeze(1)


def draw_token(logits, block_eos, *, temperature, top_k, top_p, generator) -> tuple[torch.Tensor, ...]:
    """Draw one token per row from B×V next-token logits; (token B, its unfiltered log-prob B, entropy B)."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = logits.log_softmax(dim=-1)  # B×V: the policy's distribution, whose log-probs are recorded
    policy_probs = logp.exp()
    # B, of the unfiltered distribution (as a trainer computes). Tokens at -inf (p = 0) add 0, not NaN:
    # their log-prob is clamped to the lowest finite float (5x faster than xlogy, which takes a log again).
    # (nansum would save the clamp pass, ~0.2 ms per 32-token rollout, but would also hide NaN logits.)
    entropy = -(policy_probs * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(dim=-1)
    if block_eos is None and top_k <= 0 and top_p >= 1.0:
        probs = policy_probs  # no filter: sample the policy's distribution itself
    else:
        if block_eos is not None:
            logits = logits.index_fill(1, block_eos, float("-inf"))
        probs = filter_logits(logits, top_k=top_k, top_p=top_p).softmax(dim=-1)
    token = sample_categorical(probs, generator)  # B
    return token, logp.gather(1, token[:, None]).squeeze(1), entropy
