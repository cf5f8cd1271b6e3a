"""The DPO forward pass: sequence log-probs of a group batch, and the frozen reference that computes them."""

from __future__ import annotations

from typing import Any

import torch

from alignkit.losses.sft import IGNORE_INDEX
from alignkit.ops.logits import labelled_logits
from alignkit.ops.packing import accepts_packed_masks, packed_logits
from alignkit.ops.prefix import prefix_cache_forward


def response_logps(model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs of every response of a group batch, from one forward pass over K·B rows (or one
    packed row per prompt, or a prefix pass and a suffix pass: see `collate_groups`).

    Equation: seq_logps[b, k] = sum_t log pi(y_t | x, y_<t) over the labelled (response) tokens of
    response k of group b; n_tokens counts them.

    Shapes:
        batch: `collate_groups` output ((K·B)×T rows, slot-major). returns: (seq_logps B×K, n_tokens B×K).
    """
    target = _packed_target(model) if "packed_input_ids" in batch else None
    if target is not None:  # one row per prompt, [prompt, response 1, ...] (`alignkit.ops.packing`)
        layout = {key: batch[f"packed_{key}"] for key in ("input_ids", "attention_mask", "position_ids", "keep")}
        logits = packed_logits(model, layout, target.config, target.dtype)
        logits, labels = logits[batch["packed_group"], batch["packed_take"]], batch["suffix_labels"]  # N×S×V, N×S
    elif "prefix_ids" in batch:  # each prompt once, the responses against its keys/values (`alignkit.ops.prefix`)
        first, second = prefix_cache_forward(model, batch, logits_to_keep=1)
        head = first.logits[:, -1:][batch["prefix_index"]]  # N×1×V: predicts suffix token 0
        logits, labels = torch.cat([head, second.logits[:, :-1]], dim=1), batch["suffix_labels"]  # N×S×V, N×S
    else:
        logits, labels = labelled_logits(model, batch["labels"], input_ids=batch["input_ids"],
                                         attention_mask=batch["attention_mask"])  # N×C×V, N×C: response columns
    logits = logits.float()
    mask = labels != IGNORE_INDEX
    picked = logits.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)  # N×(T-1)
    logprobs = torch.where(mask, picked - logits.logsumexp(dim=-1), 0.0)
    size = batch["group_mask"].shape[1]
    seq = logprobs.sum(dim=1).view(size, -1).T  # B×K
    return seq, mask.sum(dim=1).view(size, -1).T.to(seq.dtype)


def _packed_target(model: Any) -> Any | None:
    """The model behind `model` (a policy, DDP-wrapped or not, or a `Reference`) if it takes packed rows."""
    model = getattr(model, "module", model)  # DDP, `Reference`
    return model if accepts_packed_masks(getattr(model, "config", None)) else None


class Reference:
    """The frozen reference pi_ref: a separate model, or the LoRA policy with its adapters disabled."""

    def __init__(self, model: Any | None, policy: Any):
        self.model, self.policy = model, policy

    @property
    def module(self) -> Any:
        """The model that runs (as DDP's `.module`): the separate model, or the policy."""
        return self.model if self.model is not None else self.policy

    def __call__(self, **inputs: Any) -> Any:
        """A forward pass of the reference (no gradients, eval mode), e.g. for `evaluate_policy`."""
        with torch.no_grad():
            if self.model is not None:
                return self.model(**inputs)
            was_training = self.policy.training
            self.policy.eval()
            try:
                with self.policy.disable_adapter():
                    return self.policy(**inputs)
            finally:
                self.policy.train(was_training)

    def logps(self, batch: dict) -> torch.Tensor:
        """Reference sequence log-probs of a group batch, B×K."""
        return response_logps(self, batch)[0]
