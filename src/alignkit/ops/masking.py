"""Masked reductions over per-token tensors (sums, means, variances, whitening) and mask positions.

Every function takes ``values`` and a ``mask`` of the same shape (or broadcastable to it). The mask
is boolean, ``True`` = the position counts (a response token); a 0/1 float mask is accepted and
read as boolean. Positions outside the mask are never read arithmetically: they are replaced by zero
with ``torch.where`` before any sum, so a ``-inf`` or ``nan`` at a pad position cannot leak into the
result or its gradient.
"""

from __future__ import annotations

import torch


def masked_sum(
    values: torch.Tensor, mask: torch.Tensor, dim: int | None = None, *, keepdim: bool = False
) -> torch.Tensor:
    """Sum of ``values`` over the positions where ``mask`` is True.

    Equation: S = sum_i m_i * x_i.

    Shapes:
        values: any shape, e.g. B×T.
        mask: same shape as ``values`` (or broadcastable), bool.
        returns: a scalar if ``dim`` is None, else ``values`` reduced over ``dim``.

    Reduces by summation over all elements (``dim=None``) or over ``dim``.
    """
    mask = mask.to(torch.bool)
    kept = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    if dim is None:
        return kept.sum()
    return kept.sum(dim=dim, keepdim=keepdim)


def _count(values: torch.Tensor, mask: torch.Tensor, dim: int | None, keepdim: bool) -> torch.Tensor:
    """Number of masked-in positions, as ``values.dtype`` (broadcast like ``values``)."""
    ones = torch.ones_like(values)
    return masked_sum(ones, mask, dim, keepdim=keepdim)


def masked_mean(
    values: torch.Tensor, mask: torch.Tensor, dim: int | None = None, *, keepdim: bool = False
) -> torch.Tensor:
    """Mean of ``values`` over the positions where ``mask`` is True.

    Equation: mean = sum_i m_i * x_i / max(1, sum_i m_i).

    Shapes:
        values: any shape, e.g. B×T.
        mask: same shape as ``values`` (or broadcastable), bool.
        returns: a scalar if ``dim`` is None, else ``values`` reduced over ``dim``.

    Reduces by a masked mean over everything (``dim=None``, i.e. the token mean of a batch) or over
    ``dim`` (e.g. ``dim=1`` gives one mean per sequence). An empty mask gives 0 (the count is
    clamped to 1), not ``nan``: a row with no response token contributes nothing.
    """
    total = masked_sum(values, mask, dim, keepdim=keepdim)
    return total / _count(values, mask, dim, keepdim).clamp(min=1)


def masked_var(
    values: torch.Tensor,
    mask: torch.Tensor,
    dim: int | None = None,
    *,
    unbiased: bool = False,
    keepdim: bool = False,
) -> torch.Tensor:
    """Variance of ``values`` over the positions where ``mask`` is True.

    Equation: var = sum_i m_i * (x_i - mean)^2 / (n - c), n = sum_i m_i, c = 1 if ``unbiased``
    else 0 (the denominator is clamped to at least 1).

    Shapes:
        values: any shape, e.g. B×T.
        mask: same shape as ``values`` (or broadcastable), bool.
        returns: a scalar if ``dim`` is None, else ``values`` reduced over ``dim``.

    Reduces over everything (``dim=None``) or over ``dim``. The default is the population
    variance (``unbiased=False``), which is what makes ``masked_whiten`` give variance exactly 1.
    """
    mean = masked_mean(values, mask, dim, keepdim=True)
    # Squared deviations; positions outside the mask are dropped by masked_sum.
    sq_dev = (values - mean) ** 2
    n = _count(values, mask, dim, keepdim)
    denom = (n - 1 if unbiased else n).clamp(min=1)
    return masked_sum(sq_dev, mask, dim, keepdim=keepdim) / denom


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, *, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise ``values`` to mean 0 and variance 1 over the masked positions.

    Equation: w_i = (x_i - mean) / sqrt(var + eps), with mean and (population) var taken over all
    masked-in positions of the batch; if ``shift_mean`` is False the mean is added back,
    w_i = (x_i - mean) / sqrt(var + eps) + mean, so only the scale changes.

    Used to normalise PPO advantages (mean 0, var 1) and, with ``shift_mean=False``, rewards.

    Shapes:
        values: any shape, e.g. B×T.
        mask: same shape as ``values``, bool.
        returns: same shape as ``values``; positions outside the mask are 0.

    Statistics are taken over the whole masked batch (not per row).
    """
    mean = masked_mean(values, mask)
    var = masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.to(torch.bool), whitened, torch.zeros_like(whitened))


def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of padded rows: cumsum(mask) - 1 along the last dim, clamped at 0 on left padding.

    Left padding then does not shift a sequence's positions, so a left- and a right-padded row get
    the same positions on their real tokens (Hugging Face models take them as `position_ids`).

    Shapes:
        mask: ...×T (bool or 0/1). returns: ...×T long.
    """
    return (mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def last_true_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last True position of each row along the last dim; -1 for a row with no True.

    For a response mask (True up to and including the first EOS) that is the row's last response
    token: its EOS, or its last sampled token when it has none; for a right-padded attention mask
    it is the last real token. The -1 of an empty row is a flag for the caller to check, not an
    index to use (it would read the last column).

    Shapes:
        mask: ...×T (bool or 0/1). returns: ... long.
    """
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return torch.where(mask.to(torch.bool), positions, -1).amax(dim=-1)
