"""Masked reductions: hand-computed sums, means, variances, and whitening over a mask."""

import torch
from torch.testing import assert_close

from alignkit.ops.masking import (
    last_true_index,
    mask_positions,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)

VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[True, True, False], [True, False, False]])


def test_masked_sum_and_mean_by_hand():
    # Masked-in values: 1, 2, 4 -> sum 7, mean 7/3; per row: (1+2)/2 = 1.5 and 4/1 = 4.
    assert_close(masked_sum(VALUES, MASK), torch.tensor(7.0))
    assert_close(masked_mean(VALUES, MASK), torch.tensor(7.0 / 3.0))
    assert_close(masked_sum(VALUES, MASK, dim=1), torch.tensor([3.0, 4.0]))
    assert_close(masked_mean(VALUES, MASK, dim=1), torch.tensor([1.5, 4.0]))
    assert_close(masked_mean(VALUES, MASK, dim=1, keepdim=True), torch.tensor([[1.5], [4.0]]))


def test_float_mask_is_read_as_bool():
    assert_close(masked_mean(VALUES, MASK.float()), torch.tensor(7.0 / 3.0))


def test_empty_row_gives_zero_not_nan():
    mask = torch.tensor([[True, True, False], [False, False, False]])
    assert_close(masked_mean(VALUES, mask, dim=1), torch.tensor([1.5, 0.0]))


def test_nonfinite_values_outside_mask_do_not_leak_into_value_or_gradient():
    values = torch.tensor([[1.0, 2.0, float("-inf")], [4.0, float("nan"), float("inf")]], requires_grad=True)
    mean = masked_mean(values, MASK)
    mean.backward()
    assert_close(mean, torch.tensor(7.0 / 3.0))
    assert_close(values.grad, MASK.float() / 3.0)


def test_masked_var_by_hand():
    # Values 1, 2, 4: mean 7/3, squared deviations 16/9, 1/9, 25/9 (sum 42/9 = 14/3).
    # Population variance (14/3)/3 = 14/9; unbiased (14/3)/2 = 7/3.
    assert_close(masked_var(VALUES, MASK), torch.tensor(14.0 / 9.0))
    assert_close(masked_var(VALUES, MASK, unbiased=True), torch.tensor(7.0 / 3.0))
    # Per row: row 0 = {1, 2}, population var 0.25; row 1 = {4}, var 0.
    assert_close(masked_var(VALUES, MASK, dim=1), torch.tensor([0.25, 0.0]))


def test_masked_var_matches_torch_on_the_masked_elements():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(4, 7, generator=g)
    mask = torch.rand(4, 7, generator=g) > 0.3
    assert_close(masked_var(values, mask), values[mask].var(correction=0))
    assert_close(masked_var(values, mask, unbiased=True), values[mask].var(correction=1))


def test_masked_whiten_gives_mean_zero_var_one_over_the_mask():
    g = torch.Generator().manual_seed(1)
    values = 3.0 + 5.0 * torch.randn(6, 9, generator=g)
    mask = torch.rand(6, 9, generator=g) > 0.4
    white = masked_whiten(values, mask)
    assert_close(white[mask].mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    assert_close(white[mask].var(correction=0), torch.tensor(1.0))
    assert torch.all(white[~mask] == 0)


def test_masked_whiten_without_shift_keeps_the_mean():
    g = torch.Generator().manual_seed(2)
    values = 3.0 + 5.0 * torch.randn(6, 9, generator=g)
    mask = torch.rand(6, 9, generator=g) > 0.4
    white = masked_whiten(values, mask, shift_mean=False)
    assert_close(white[mask].mean(), values[mask].mean())
    assert_close(white[mask].var(correction=0), torch.tensor(1.0))


def test_masked_whiten_by_hand():
    # Values 1, 2, 4: mean 7/3, population std sqrt(14/9) = 1.247219...
    # (1 - 7/3) / 1.247219 = -1.069045, (2 - 7/3) / 1.247219 = -0.267261, (4 - 7/3) / 1.247219 = 1.336306.
    expected = torch.tensor([[-1.069045, -0.267261, 0.0], [1.336306, 0.0, 0.0]])
    assert_close(masked_whiten(VALUES, MASK, eps=0.0), expected, atol=1e-6, rtol=1e-6)


def test_last_true_index_by_hand():
    # Response masks: EOS at column 2 (then pads); no EOS, cut at 4 columns; a single token; none.
    mask = torch.tensor([
        [True, True, True, False],
        [True, True, True, True],
        [True, False, False, False],
        [False, False, False, False],
    ])
    assert last_true_index(mask).tolist() == [2, 3, 0, -1]  # -1 flags the row with no True
    assert last_true_index(mask.long()).tolist() == [2, 3, 0, -1]  # 0/1 masks read as bool
    # Left padding (an attention mask of left-padded prompts): the last real token is the last column.
    assert last_true_index(torch.tensor([[False, True, True], [False, False, True]])).tolist() == [2, 2]
    # Leading dims are kept: ...×T -> ...
    assert last_true_index(mask.view(2, 2, 4)).tolist() == [[2, 3], [0, -1]]


def test_mask_positions_by_hand():
    # Left padding: pads at 0, real tokens 0, 1, ...; right padding: pads repeat the last position.
    mask = torch.tensor([[False, False, True, True], [True, True, True, False]])
    assert mask_positions(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 2]]
