"""Training-side log-probs of a `Rollout`: one forward pass over prompt + response.

`sequence_logprobs` recomputes the log-probs the sampler recorded (`alignkit.rollout.generate`), as
a trainer does; it agrees with the sampler's to float rounding (tested to 1e-5). The acceleration
backend runs the forward pass (`Backend.rollout_logits`: the CPU backend runs a prompt that k rows
repeat once, in one shared row).
"""

from __future__ import annotations

from typing import Any

import torch

from alignkit.accel import Backend, resolve
from alignkit.rollout.types import Rollout


def sequence_logprobs(
    model, rollout: Rollout, *, temperature: float = 1.0, with_entropy: bool = False, backend: Backend | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Training-side log-probs of the response tokens: one forward pass over prompt + response.

    Equation: logprobs[b, j] = z[y_j] - logsumexp(z), z = logits(x, y_<j) / temperature, taken from
    the logits at column P + j - 1 of `full_ids()`; entropy[b, j] = logsumexp(z) - sum_v p_v z_v.
    Only the logit columns that predict response tokens are computed (`logits_to_keep`), and the
    log-softmax is never materialised: a gather and a per-row logsumexp read the (scaled) logits.
    Runs with gradients when they are enabled; the caller chooses the model's mode (eval for RL:
    dropout off).

    The forward pass is the backend's (default `alignkit.accel.resolve()`): the result is the same
    to float rounding with every backend, gradients included.

    Shapes:
        returns: logprobs B×R (0 where `response_mask` is False); with `with_entropy`, also the
        per-token entropy B×R (0 where masked).
    """
    width_r = rollout.response_ids.shape[1]
    # response token (b, j) is predicted by logits[rows[b, j], columns[b, j]]
    logits, rows, columns = (backend or resolve()).rollout_logits(model, rollout)
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits[rows, columns, rollout.response_ids]  # B×R
    # logsumexp over chunks of R columns keeps its temporaries at R×V instead of N×C×V.
    chunks = logits.reshape(-1, logits.shape[-1]).split(max(width_r, 1))
    lse = torch.cat([torch.logsumexp(chunk, dim=-1) for chunk in chunks]).view(logits.shape[:2])  # N×C
    mask = rollout.response_mask
    logprobs = torch.where(mask, picked - lse[rows, columns], 0.0)
    if not with_entropy:
        return logprobs
    expected = torch.cat([(chunk.softmax(dim=-1) * chunk).sum(dim=-1) for chunk in chunks]).view(lse.shape)
    return logprobs, torch.where(mask, (lse - expected)[rows, columns], 0.0)


def response_values(value_model: Any, rollout: Rollout) -> torch.Tensor:
    """V(s_t) for every response token of a rollout, 0 where `response_mask` is False.

    The value of the state before response token j is read at column P + j - 1 of `full_ids()`,
    where the model has seen the prompt and y_<j: the policy's log-probs' column alignment.
    `value_model(input_ids, attention_mask, position_ids)` gives B×T values
    (`alignkit.models.value_head.ValueModel`).

    Shapes:
        returns: B×R; entry j is the value read at column P + j - 1 of `full_ids()`.
    """
    width_p, width_r = rollout.prompt_length, rollout.response_ids.shape[1]
    values = value_model(rollout.full_ids(), rollout.full_mask().long(), rollout.position_ids())  # B×(P+R)
    values = values[:, width_p - 1 : width_p - 1 + width_r].float()  # B×R
    return torch.where(rollout.response_mask, values, 0.0)
