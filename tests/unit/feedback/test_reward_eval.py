"""Held-out reward metrics against plain loops / scipy, and the reward stage's grouping of records."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from alignkit.data.reward_groups import collate_reward_groups, record_groups
from alignkit.losses.reward import REWARD_LOSSES
from alignkit.trainers.reward import LOSS_ADAPTERS, RewardConfig
from alignkit.trainers.reward_eval import (
    best_of_k_accuracy,
    calibration_error,
    group_metrics,
    kendall_tau,
    pairwise_accuracy,
    spearman,
)


def test_spearman_and_kendall_match_scipy():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (40,), generator=gen).double()  # with ties
    y = x + torch.randn(40, generator=gen, dtype=torch.float64)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)
    scores = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    mask = torch.tensor([[True] * 4, [True, True, True, False]])
    # labelled order is best first: rank position i has "true" value -i
    expected = [stats.kendalltau([-i for i in range(n)], s[:n]).statistic for s, n in zip(scores.tolist(), (4, 3), strict=True)]
    assert kendall_tau(scores, mask) == pytest.approx(sum(expected) / 2)


def test_accuracies_and_calibration():
    assert pairwise_accuracy(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, 2.0])) == pytest.approx(0.5)
    scores = torch.tensor([[0.0, 2.0, 1.0], [5.0, 1.0, -9.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    assert best_of_k_accuracy(scores, torch.tensor([1, 1]), mask) == 0.5
    # perfectly calibrated: p = 0.8 and 80% of the outcomes are 1
    probs = torch.full((10,), 0.8)
    outcomes = torch.tensor([1.0] * 8 + [0.0] * 2)
    assert calibration_error(probs, outcomes) == pytest.approx(0.0, abs=1e-6)  # float32 0.8
    assert calibration_error(torch.full((4,), 0.9), torch.zeros(4)) == pytest.approx(0.9)
    m = group_metrics(scores, mask, torch.tensor([1, 0]))
    assert m["eval/best_of_k_accuracy"] == 1.0 and m["eval/pairwise_accuracy"] == pytest.approx(3 / 3)


def _items(groups):
    start = 0
    for g in groups:
        g["items"] = [[start + i + 3] for i in range(len(g["responses"]))]
        start += len(g["responses"])
    return groups


def test_records_group_into_the_loss_inputs():
    choice = {"prompt": "p", "responses": ["a", "b", "c"], "best": 2}
    assert [g["responses"] for g in record_groups(choice, "choice", "pairwise")] == [["c", "a"], ["c", "b"]]
    ranking = {"prompt": "p", "responses": ["a", "b", "c"]}
    assert len(record_groups(ranking, "ranking", "pairwise")) == 3
    pref = {"prompt": "p", "chosen": "a", "rejected": "b"}
    assert record_groups(pref, "preference", "best_of_k")[0]["best"] == 0
    cfg = RewardConfig()
    groups = _items(record_groups(ranking, "ranking", "plackett_luce") + [{"prompt": "q", "responses": ["x", "y"]}])
    batch = collate_reward_groups(groups, pad_id=0)
    assert batch["group_index"].tolist() == [[0, 1, 2], [3, 4, -1]] and batch["n_terms"] == 2
    scores = torch.tensor([0.5, 0.2, -1.0, 0.3, 0.9])
    loss, _ = LOSS_ADAPTERS["plackett_luce"](scores, batch, cfg)
    alone = [REWARD_LOSSES["plackett_luce"](s[None])[0] for s in (scores[:3], scores[3:])]
    torch.testing.assert_close(loss, torch.stack(alone).mean())
    pairs = _items([record_groups(pref, "preference", "pairwise")[0] for _ in range(2)])
    pairs[1]["margin"] = 0.5
    batch = collate_reward_groups(pairs, pad_id=0)
    loss, _ = LOSS_ADAPTERS["pairwise"](torch.tensor([1.0, 0.0, 2.0, 0.0]), batch, cfg)
    expected, _ = REWARD_LOSSES["pairwise"](torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]),
                                            margin=torch.tensor([0.0, 0.5]))
    torch.testing.assert_close(loss, expected)
