"""Token log-probs of labels under logits, without materialising the log-softmax.

Only torch is imported here.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
"""Label of a position that is not trained (prompt tokens, padding), as in PyTorch's cross-entropy."""


def label_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) at every position, 0 where the label is IGNORE_INDEX.

    Equation: logprobs[n, c] = z[labels[n, c]] - logsumexp(z), z = logits[n, c] (a gather and a
    logsumexp; the B×C×V log-softmax is never built).

    Shapes:
        logits: N×C×V, column c predicting labels[:, c]; labels: N×C long. returns: N×C (logits' dtype).

    No reduction.
    """
    mask = labels != IGNORE_INDEX
    picked = logits.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)  # N×C
    return torch.where(mask, picked - logits.logsumexp(dim=-1), 0.0)
