"""Logits only where a loss reads them: a causal LM forward that skips the unlabelled columns.

SFT and DPO train on response tokens only, yet a plain forward computes the output projection
(hidden × vocabulary, the largest matrix product of a small model) and a log-softmax at every
position, prompt and padding included. `labelled_logits` asks the model for the columns whose next
token is labelled (Hugging Face's `logits_to_keep`, given as a tensor of column indices) and returns
them with their target ids. The loss is the same sum over the same terms; the prompt columns of the
output layer are simply never computed (a third of them on the benchmark's 16-token prompts and
32-token responses).
"""

from __future__ import annotations

from typing import Any

import torch

from alignkit.ops.logprobs import IGNORE_INDEX


def labelled_columns(labels: torch.Tensor) -> torch.Tensor:
    """Columns t (0..T-2) whose next token is labelled in at least one row: C long, increasing.

    Shapes:
        labels: B×T, IGNORE_INDEX where not trained. returns: C (C <= T - 1).
    """
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)


def labelled_logits(model: Any, labels: torch.Tensor, **inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits B×C×V of the labelled columns, targets B×C: the next token, IGNORE_INDEX where not trained).

    `inputs` go to `model(...)` (input_ids, attention_mask, position_ids). A model that ignores or
    does not take `logits_to_keep` returns every column; they are then selected here, so the result
    is the same.
    Column t of the result predicts token t + 1 for t in `labelled_columns(labels)`.
    """
    columns = labelled_columns(labels)
    try:
        logits = model(**inputs, logits_to_keep=columns).logits
    except TypeError as err:  # a forward without `logits_to_keep` (some remote-code models)
        if "logits_to_keep" not in str(err):
            raise
        logits = model(**inputs).logits
    if logits.shape[1] != columns.numel():  # the model computed every column
        logits = logits[:, columns]
    return logits, labels[:, columns + 1]
