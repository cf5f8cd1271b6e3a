"""The DPO forward pass: sequence log-probs of a group batch, and the frozen reference that computes them."""

from __future__ import annotations

from typing import Any

import torch

from alignkit.accel import Backend
from alignkit.models.value_head import AdapterDisabledReference
from alignkit.ops.logprobs import IGNORE_INDEX, label_logprobs


def response_logps(model: Any, batch: dict, backend: Backend) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs of every response of a group batch, from one forward pass over its K·B rows
    (the backend's: e.g. one shared row per prompt on the CPU backend; see `collate_preference_groups`).

    Equation: seq_logps[b, k] = sum_t log pi(y_t | x, y_<t) over the labelled (response) tokens of
    response k of group b; n_tokens counts them.

    Shapes:
        batch: `collate_preference_groups` output ((K·B)×T rows, slot-major). returns: (seq_logps B×K,
        n_tokens B×K).
    """
    logits, labels = backend.group_logits(model, batch)  # N×C×V, N×C: the response columns
    logprobs = label_logprobs(logits.float(), labels)  # N×C, 0 where not trained
    size = batch["group_mask"].shape[1]
    seq = logprobs.sum(dim=1).view(size, -1).T  # B×K
    n_tokens = (labels != IGNORE_INDEX).sum(dim=1).view(size, -1).T.to(seq.dtype)
    return seq, n_tokens


class Reference:
    """The frozen reference pi_ref: a separate model, or the LoRA policy with its adapters disabled."""

    def __init__(self, model: Any | None, policy: Any, backend: Backend):
        # The model that runs (as DDP's `.module`): the separate model, or the policy without adapters.
        self.module = model if model is not None else AdapterDisabledReference(policy)
        self.backend = backend

    def __call__(self, **inputs: Any) -> Any:
        """A forward pass of the reference (no gradients), e.g. for `evaluate_policy`."""
        with torch.no_grad():
            return self.module(**inputs)

    def logps(self, batch: dict) -> torch.Tensor:
        """Reference sequence log-probs of a group batch, B×K."""
        return response_logps(self, batch, self.backend)[0]
