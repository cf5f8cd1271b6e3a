"""Token-level language-modelling losses (pretraining and supervised fine-tuning).

Only torch (and `alignkit.ops`) is imported here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignkit.ops.logprobs import IGNORE_INDEX


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Summed negative log-likelihood of the labelled next tokens.

    loss = -sum_t [label_{t+1} != ignore] log p(label_{t+1} | tokens_{<=t})
    For SFT the labels are the response tokens only, so this is -log Pr(y | x)
    (Xiao & Zhu, Eq. 10.1-10.3), summed over a batch; for a K-round conversation masked to the
    assistant turns it is the sum of the per-round losses in one pass (Eq. 10.5-10.7).

    Shapes:
        logits: B x T x V (position t predicts token t+1); labels: B x T, IGNORE_INDEX = not trained.

    Returns the SUM over trained tokens (the caller divides by the token count of the whole
    accumulated batch, so accumulation does not change the result) and metrics with `n_terms`.
    """
    shift_logits = logits[:, :-1, :].float()  # B x T-1 x V
    shift_labels = labels[:, 1:]  # B x T-1
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    n_terms = (shift_labels != IGNORE_INDEX).sum()
    return loss, {"n_terms": n_terms.detach()}


def token_nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of `targets` under already-aligned `logits` (no shift).

    Shapes:
        logits: B×C×V, column c predicting targets[:, c]; targets: B×C, IGNORE_INDEX = not trained.
    """
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")

