"""Training-side log-probs of a `Rollout`: one forward pass over prompt + response.

`sequence_logprobs` recomputes the log-probs the sampler recorded (`alignkit.rollout.generate`), as
a trainer does; it agrees with the sampler's to float rounding (tested to 1e-5). Rows that repeat a
prompt (k samples per prompt) run it once: packed into one row per prompt under a 4D mask
(`alignkit.ops.packing.packed_prompt_layout`), or through a shared KV cache.
"""

from __future__ import annotations

import torch

from alignkit.ops.packing import accepts_packed_masks, packed_logits, packed_prompt_layout, packing_pays
from alignkit.ops.prefix import distinct_rows, prefix_cache_forward, worth_sharing
from alignkit.rollout.types import Rollout


def sequence_logprobs(
    model, rollout: Rollout, *, temperature: float = 1.0, with_entropy: bool = False, share_prompts: bool = True
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Training-side log-probs of the response tokens: one forward pass over prompt + response.

    Equation: logprobs[b, j] = z[y_j] - logsumexp(z), z = logits(x, y_<j) / temperature, taken from
    the logits at column P + j - 1 of `full_ids()`; entropy[b, j] = logsumexp(z) - sum_v p_v z_v.
    Only the logit columns that predict response tokens are computed (`logits_to_keep`), and the
    log-softmax is never materialised: a gather and a per-row logsumexp read the (scaled) logits.
    Runs with gradients when they are enabled; the caller chooses the model's mode (eval for RL:
    dropout off).

    With `share_prompts` and rows that repeat a prompt (k samples per prompt), each distinct prompt
    runs once (`_shared_prompt_logits`): packed with its k responses into one row under a 4D mask
    when the model's attention takes one and that saves FLOPs (`alignkit.ops.packing.packing_pays`),
    else with its keys and values shared through a KV cache when that removes enough tokens. The
    result is the same to float rounding, gradients included.

    Shapes:
        returns: logprobs B×R (0 where `response_mask` is False); with `with_entropy`, also the
        per-token entropy B×R (0 where masked).
    """
    width_r = rollout.response_ids.shape[1]
    shared = _shared_prompt_logits(model, rollout) if share_prompts else None
    if shared is None:
        inputs = {"input_ids": rollout.full_ids(), "attention_mask": rollout.full_mask().long()}
        out = model(**inputs, position_ids=rollout.position_ids(), use_cache=False, logits_to_keep=width_r + 1)
        logits = out.logits[:, -(width_r + 1) : -1, :]  # B×R×V (also when logits_to_keep is ignored)
        rows = torch.arange(rollout.batch_size, device=logits.device)[:, None].expand(-1, width_r)
        shared = logits, rows, torch.arange(width_r, device=logits.device)[None].expand_as(rows)
    logits, rows, columns = shared  # response token (b, j) is predicted by logits[rows[b, j], columns[b, j]]
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


def _shared_prompt_logits(model, rollout: Rollout) -> tuple[torch.Tensor, ...] | None:
    """(logits N×C×V, rows B×R, columns B×R) running each distinct prompt once; None: one plain pass.

    Response token (b, j) is predicted by logits[rows[b, j], columns[b, j]]. Packed rows
    (`alignkit.ops.packing.packed_prompt_layout`) when the model takes a 4D mask and packing saves
    FLOPs; otherwise a shared-prefix pass through a KV cache (`prefix_cache_forward`) when it removes
    enough tokens (`worth_sharing`): the last prompt column predicts response token 0, the response
    columns tokens 1..R-1. Prompts are left-padded and responses follow them, so masks and positions
    are those of the one-pass forward.
    """
    width_p, width_r = rollout.prompt_length, rollout.response_ids.shape[1]
    ids, mask, inverse = distinct_rows(rollout.prompt_ids, rollout.prompt_mask)
    batch, n_groups = rollout.batch_size, ids.shape[0]
    if n_groups == batch:
        return None
    config = getattr(model, "config", None)
    slots = int(torch.bincount(inverse).max())
    if accepts_packed_masks(config) and packing_pays(config, batch, n_groups, width_p, width_r, slots):
        return _packed_logits(model, rollout, config)
    if not worth_sharing((batch - n_groups) * width_p, batch * (width_p + width_r)):
        return None
    layout = {"prefix_ids": ids, "prefix_mask": mask.long(), "prefix_index": inverse,
              "suffix_ids": rollout.response_ids, "suffix_mask": rollout.response_mask.long()}
    first, second = prefix_cache_forward(model, layout, logits_to_keep=1)
    head = first.logits[:, -1:, :][inverse]  # B×1×V
    logits = torch.cat([head, second.logits[:, -width_r:-1, :]], dim=1)
    rows = torch.arange(batch, device=logits.device)[:, None].expand(-1, width_r)
    return logits, rows, torch.arange(width_r, device=logits.device)[None].expand_as(rows)


def _packed_logits(model, rollout: Rollout, config) -> tuple[torch.Tensor, ...]:
    """`_shared_prompt_logits` over one packed row per distinct prompt (a single forward call)."""
    pad = getattr(config, "pad_token_id", None)
    layout = packed_prompt_layout(rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids,
                                  rollout.response_mask, 0 if pad is None else pad)
    logits = packed_logits(model, layout, config, model.dtype)
    return logits, layout["group"], layout["take"]
