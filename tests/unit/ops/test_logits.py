"""`labelled_logits`: the output layer only at labelled columns gives the same loss and gradients."""

from __future__ import annotations

import torch
from tests.conftest import build_tiny_llama

from alignkit.losses.sft import IGNORE_INDEX, causal_lm_loss_sum, token_nll_sum
from alignkit.models.logits import labelled_columns, labelled_logits

X = IGNORE_INDEX


def test_labelled_columns_by_hand():
    labels = torch.tensor([[X, X, 5, 6, X, X],
                           [X, X, X, X, 7, X]])
    # column t predicts token t + 1: tokens 2, 3 (row 0) and 4 (row 1) -> columns 1, 2, 3
    assert labelled_columns(labels).tolist() == [1, 2, 3]


class IgnoresLogitsToKeep(torch.nn.Module):
    """A model whose forward drops `logits_to_keep` and returns every column."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, logits_to_keep=None, **inputs):
        return self.model(**inputs)


def test_same_loss_and_gradients_as_full_logits():
    torch.manual_seed(0)
    model = build_tiny_llama(64)
    ids = torch.randint(3, 64, (3, 10))
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0  # right padding
    labels = ids.clone()
    labels[:, :4] = X  # prompt
    labels[1, :6] = X  # a longer prompt in one row
    labels[mask == 0] = X

    full = causal_lm_loss_sum(model(input_ids=ids, attention_mask=mask).logits, labels)[0]
    full.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for m in (model, IgnoresLogitsToKeep(model)):
        logits, targets = labelled_logits(m, labels, input_ids=ids, attention_mask=mask)
        assert logits.shape[:2] == targets.shape == (3, 6)  # columns 3..8, not all 9 (0..8)
        loss = token_nll_sum(logits, targets)
        torch.testing.assert_close(loss, full, rtol=1e-6, atol=1e-5)
        loss.backward()
        for p, g in zip(model.parameters(), expected, strict=True):
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
        model.zero_grad()
