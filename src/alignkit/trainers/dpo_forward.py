"""The DPO forward pass: sequence log-probs of a group batch, the frozen reference that computes them, and
KTO's reference point z0 (from the same forward passes over mismatched pairs)."""

from __future__ import annotations

from collections.abc import Callable
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


def kto_log_ratio_sum(model: Any, reference: Reference, batch: dict, backend: Backend) -> torch.Tensor:
    """Sum over a batch's mismatched pairs (`batch["kl_batch"]`) of log pi(y_j|x_i) - log pi_ref(y_j|x_i).

    No gradients: KTO's reference point is a constant of the loss. Shapes: returns a scalar.
    """
    with torch.no_grad():
        policy = response_logps(model, batch["kl_batch"], backend)[0][:, 0]  # B
        return (policy - reference.logps(batch["kl_batch"])[:, 0]).float().sum()


def kto_reference_point(log_ratio_sum: torch.Tensor, count: int | torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0 (Ethayarajh et al. 2024, Sec. 4.2), detached.

    Equation: z0 = max(0, (1/m) sum_i log(pi(y_j(i)|x_i) / pi_ref(y_j(i)|x_i))), over the m mismatched
    pairs (x_i, y_j(i)), j(i) = i - 1 within each micro-batch (`mismatched_groups`), of the global batch
    (every micro-batch of the step on every process: the trainer sums `log_ratio_sum` and `count`
    over them first). An estimate of KL(pi || pi_ref) on prompts the responses were not written for.
    """
    return (log_ratio_sum / torch.as_tensor(count, dtype=log_ratio_sum.dtype).clamp(min=1)).clamp(min=0).detach()


def set_kto_reference_point(model: Any, reference: Reference, batches: list[dict], backend: Backend,
                            reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """Work out z0 over `batches` (summed across processes by `reduce`) and store it as `batch["kto_z0"]`."""
    if not batches:
        totals = torch.zeros(2)
    else:
        device = batches[0]["input_ids"].device
        totals = torch.stack([sum(kto_log_ratio_sum(model, reference, b, backend) for b in batches),
                              torch.tensor(float(sum(b["n_terms"] for b in batches)), device=device)])
    totals = reduce(totals) if reduce is not None else totals
    z0 = kto_reference_point(totals[0], totals[1])
    for batch in batches:
        batch["kto_z0"] = z0
    return float(z0)
