"""Labelers: Bradley-Terry noise (tau = 0 deterministic), Plackett-Luce choices/rankings, file answers by id."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignkit.data.formats import validate_records
from alignkit.errors import AlignkitError
from alignkit.feedback.labelers import (
    FileLabeler,
    ScorerLabeler,
    bradley_terry_prob,
    make_labeler,
    noisy_order,
)

QUERIES = [
    {"id": "q0", "prompt": "I", "responses": [" a", " bbb"]},
    {"id": "q1", "prompt": "You", "responses": [" cc", " d"]},
]


def length_scorer(prompts, responses):
    return torch.tensor([float(len(r)) for r in responses])


def test_tau_zero_is_deterministic_and_records_are_valid():
    labeler = ScorerLabeler(length_scorer, tau=0.0)
    pairs = labeler(QUERIES, "pairs")
    assert [r["chosen"] for r in pairs] == [" bbb", " cc"]
    validate_records(pairs, "preference", "pairs")
    choices = labeler([{"id": "q", "prompt": "p", "responses": [" x", " xxx", " xx"]}], "choice")
    assert choices[0]["best"] == 1
    validate_records(choices, "choice", "choices")
    ranking = labeler([{"id": "q", "prompt": "p", "responses": [" x", " xxx", " xx"]}], "ranking")
    assert ranking[0]["responses"] == [" xxx", " xx", " x"]
    ratings = labeler(QUERIES[:1], "rating")[0]
    assert [r["score"] for r in ratings] == [2.0, 4.0]
    validate_records(ratings, "rating", "ratings")


def test_bradley_terry_noise_matches_sigmoid():
    assert bradley_terry_prob(torch.tensor([1.0]), torch.tensor([0.0]), 0.0).item() == 1.0
    assert bradley_terry_prob(torch.tensor([1.0]), torch.tensor([1.0]), 0.0).item() == 0.5
    tau, n = 2.0, 4000
    labeler = ScorerLabeler(lambda p, r: torch.tensor([1.0, 0.0] * (len(r) // 2)), tau=tau, seed=3)
    queries = [{"id": str(i), "prompt": "p", "responses": [" a", " b"]} for i in range(n)]
    wins = sum(r["chosen"] == " a" for r in labeler(queries, "pairs")) / n
    expected = 1 / (1 + math.exp(-1 / tau))
    assert abs(wins - expected) < 3 * math.sqrt(expected * (1 - expected) / n)


def test_gumbel_choice_is_softmax_and_k2_is_bradley_terry():
    s, tau, n = torch.tensor([0.0, 1.0, 2.0]), 1.0, 6000
    gen = torch.Generator().manual_seed(0)
    firsts = torch.stack([noisy_order(s, tau, gen)[0] for _ in range(n)])
    freq = torch.bincount(firsts, minlength=3).double() / n
    torch.testing.assert_close(freq, torch.softmax(s.double() / tau, 0), atol=0.025, rtol=0)
    pair = torch.tensor([0.5, 0.0])
    wins = sum(noisy_order(pair, 0.5, gen)[0].item() == 0 for _ in range(n)) / n
    assert abs(wins - bradley_terry_prob(pair[:1], pair[1:], 0.5).item()) < 0.025


def test_file_labeler_joins_by_id(tmp_path):
    path = tmp_path / "answers.jsonl"
    rows = [{"id": "q1", "chosen": 1}, {"id": "q0", "best": 0}, {"id": "r", "ranking": [2, 0, 1]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    labeler = make_labeler("file", answers=str(path))
    out = labeler([*QUERIES, {"id": "missing", "prompt": "p", "responses": [" a", " b"]}], "pairs")
    assert out[0]["chosen"] == " a" and out[1]["chosen"] == " d" and out[2] is None
    ranked = labeler([{"id": "r", "prompt": "p", "responses": [" x", " y", " z"]}], "ranking")[0]
    assert ranked["responses"] == [" z", " x", " y"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "q0", "best": 5}) + "\n")
    with pytest.raises(AlignkitError, match="bad.jsonl, row 1, field 'best'"):
        FileLabeler(bad)(QUERIES, "choice")
    with pytest.raises(AlignkitError, match="answers"):
        make_labeler("file")
    with pytest.raises(AlignkitError, match="tau"):
        ScorerLabeler(length_scorer, tau=-1.0)


def test_steps_label_each_segment_with_its_change_in_score():
    from functools import partial

    from alignkit.data.segments import split_text

    def scorer(prompts, texts):  # s(x, y) = number of "!" in y, squared: not additive over segments
        return torch.tensor([float(t.count("!") ** 2) for t in texts])

    queries = [{"id": "q0", "prompt": "p", "responses": ["Great! Really great!! Meh.", "No."]}]
    labeler = ScorerLabeler(scorer, tau=0.0, split=partial(split_text, spec="sentences"))
    records = labeler(queries, "steps")[0]
    validate_records(records, "steps", "steps")
    first, second = records
    assert first["steps"] == ["Great!", " Really great!!", " Meh."] and "".join(first["steps"]) == queries[0]["responses"][0]
    # prefix scores 1, 9, 9 -> labels 1, 9 - 1, 9 - 9; they sum to the whole response's score
    assert first["labels"] == [1.0, 8.0, 0.0] and first["utility"] == 9.0 == sum(first["labels"])
    assert second["steps"] == ["No."] and second["labels"] == [0.0] and second["id"] == "q0/1"
    with pytest.raises(AlignkitError, match="needs a segmentation"):
        ScorerLabeler(scorer)(queries, "steps")
