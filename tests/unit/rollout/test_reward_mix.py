"""Weighted reward mixes: the documented sum, None handling, per-component standardisation, row columns."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.errors import AlignkitError
from alignkit.rewards.functions import from_callable
from alignkit.rollout.reward_mix import build_mix, row_columns, standardize


def const_scorer(values):
    return lambda prompts, responses: torch.tensor(values, dtype=torch.float32)


def fn(values, name):
    return from_callable(lambda prompts, completions, **kw: list(values), name)


def test_weights_combine_as_a_weighted_sum_with_the_scorer_first():
    mix = build_mix(const_scorer([1.0, 2.0, 3.0, 4.0]), "reward_model",
                    [fn([1, 0, 1, 0], "match"), fn([-2, -2, 0, 0], "length")], [0.5, 2.0, 0.25])
    total, metrics = mix.score(["p"] * 4, ["r"] * 4)
    # 0.5 * rm + 2 * match + 0.25 * length, by hand
    torch.testing.assert_close(total, torch.tensor([0.5 + 2 - 0.5, 1.0 + 0 - 0.5, 1.5 + 2 + 0, 2.0 + 0 + 0]))
    assert metrics == {"reward/reward_model": 2.5, "reward/match": 0.5, "reward/length": -1.0}


def test_none_drops_the_component_from_that_row_and_all_none_is_an_error():
    mix = build_mix(None, "", [fn([1, None, None], "a"), fn([None, 3, None], "b")], [1.0, 2.0])
    with pytest.raises(AlignkitError, match=r"no reward applies to the completion of prompt index 12"):
        mix.score(["p"] * 3, ["r"] * 3, indices=[10, 11, 12])
    mix = build_mix(None, "", [fn([1, None], "a"), fn([None, 3], "b")], [1.0, 2.0])
    total, metrics = mix.score(["p"] * 2, ["r"] * 2)
    torch.testing.assert_close(total, torch.tensor([1.0, 6.0]))
    assert metrics["reward/a"] == 1.0 and metrics["reward/a_applicable"] == 0.5


def test_weights_must_match_the_components():
    with pytest.raises(AlignkitError, match=r"2 weight\(s\) for 3 reward component\(s\) \(reward_model, f, g\)"):
        build_mix(const_scorer([0.0]), "reward_model", [fn([0], "f"), fn([0], "g")], [1.0, 2.0])
    mix = build_mix(None, "", [fn([1.0], "f"), fn([2.0], "f")], [])  # default weights 1; repeats numbered
    assert [c.name for c in mix.components] == ["f", "f_2"] and [c.weight for c in mix.components] == [1.0, 1.0]


def test_standardize_per_group_and_over_the_batch_by_hand():
    values = torch.tensor([1.0, 3.0, 10.0, 10.0, float("nan"), 4.0])
    out = standardize(values, group_size=2, eps=0.0)
    torch.testing.assert_close(out[:2], torch.tensor([-1.0, 1.0]))  # mean 2, population std 1
    assert out[2].item() == 0.0 and out[3].item() == 0.0  # equal values: no spread, 0 (not 0 / 0)
    assert math.isnan(out[4].item()) and out[5].item() == 0.0
    batch = standardize(torch.tensor([0.0, 2.0, 4.0, 6.0]), None, eps=0.0)
    std = math.sqrt(5.0)
    torch.testing.assert_close(batch, torch.tensor([-3 / std, -1 / std, 1 / std, 3 / std]))
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        standardize(torch.zeros(6), 4)


def test_group_normalisation_makes_each_component_scale_free_before_weighting():
    big = fn([100.0, 300.0, 0.0, 0.0], "big")  # two groups of two
    small = fn([0.0, 0.0, 0.1, 0.3], "small")
    mix = build_mix(None, "", [big, small], [1.0, 1.0], normalize_components="group")
    total, _ = mix.score(["p"] * 4, ["r"] * 4, group_size=2)
    torch.testing.assert_close(total, torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-4, rtol=0)
    plain, _ = build_mix(None, "", [big, small], []).score(["p"] * 4, ["r"] * 4)
    torch.testing.assert_close(plain, torch.tensor([100.0, 300.0, 0.1, 0.3]))


def test_row_columns_follow_the_rows_prompt_indices():
    per_prompt = [{"answer": "a0"}, {"answer": "a1", "level": 2}, {"answer": "a2"}]
    cols = row_columns(per_prompt, [2, 2, 0, 1])
    assert cols == {"answer": ["a2", "a2", "a0", "a1"], "level": [None, None, None, 2]}
