"""Reward model: reading at the last non-pad token (left and right padding), head init, normalisation, scorers."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.accel.cpu import CpuBackend, shared_prompts
from alignkit.accel.plain import PlainBackend
from alignkit.config import ModelConfig
from alignkit.data.collate import right_pad
from alignkit.data.reward_groups import encode_scored
from alignkit.data.segments import segment_prefixes, split_sentences
from alignkit.errors import AlignkitError
from alignkit.models.ensemble import EnsembleScorer, combine_rewards, save_ensemble
from alignkit.models.load import load_sequence_classifier, load_tokenizer
from alignkit.models.reward_model import (
    CONFIG_BIAS,
    init_head,
    last_token_index,
    load_reward_model,
    reward_scores,
    score_head,
)
from alignkit.models.reward_normalization import apply_normalization, normalization
from alignkit.models.save import save_pretrained_atomic
from alignkit.rollout.score import GoldScorer, RewardModelScorer, Scorer, load_scorer

PROMPTS = ["I loved this", "Terrible film.", "The plot"]
RESPONSES = [" movie, it was great!", " I hated it.", " was fine but the ending felt rushed."]


@pytest.fixture(scope="module")
def rm(tiny_llama_dir):
    cfg = ModelConfig(name_or_path=str(tiny_llama_dir))
    tokenizer = load_tokenizer(cfg)
    model = load_sequence_classifier(cfg, num_labels=1, tokenizer=tokenizer).eval()
    init_head(model, seed=0)
    return model, tokenizer


def _rows(tokenizer):
    return [encode_scored(tokenizer, p, r) for p, r in zip(PROMPTS, RESPONSES, strict=True)]


def _left_pad(rows, pad_id):
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask


def test_last_token_index_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 3, 0]
    assert last_token_index(left).tolist() == [3, 3, 3]


def test_reward_read_at_last_non_pad_token_left_and_right_padded_alike(rm):
    model, tokenizer = rm
    rows = _rows(tokenizer)
    with torch.no_grad():
        alone = torch.cat([reward_scores(model, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long)) for r in rows])
        right = reward_scores(model, *right_pad(rows, tokenizer.pad_token_id))
        left = reward_scores(model, *_left_pad(rows, tokenizer.pad_token_id))
        # the plain loop: the head applied to the backbone's state at the last real token
        head, backbone = score_head(model), model.model
        loop = torch.stack([head(backbone(input_ids=torch.tensor([r])).last_hidden_state[0, -1])[0] for r in rows])
    torch.testing.assert_close(right, alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(left, alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loop, alone, rtol=1e-4, atol=1e-5)
    assert len(set(alone.tolist())) == 3  # distinct sequences, distinct rewards


def test_pad_inside_a_sequence_is_refused(rm):
    model, tokenizer = rm
    ids = torch.tensor([[5, tokenizer.pad_token_id, 6]])
    with pytest.raises(AlignkitError, match="pad id"):
        reward_scores(model, ids, torch.ones_like(ids))


def test_head_init_variance():
    torch.manual_seed(0)
    head = torch.nn.Linear(4095, 1, bias=True)
    model = torch.nn.Module()
    model.score = head
    model.config = None
    init_head(model, seed=1)
    assert head.bias.abs().sum() == 0
    assert abs(head.weight.var().item() * 4096 - 1.0) < 0.1  # N(0, 1 / (d + 1))


def test_normalisation_gives_mean_0_std_1_and_survives_save_load(rm, tmp_path):
    import copy

    model, tokenizer = rm
    model = copy.deepcopy(model)
    rows = _rows(tokenizer) * 2 + [encode_scored(tokenizer, "What a", " beautiful story.")]
    ids, mask = right_pad(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        gain, bias = normalization(reward_scores(model, ids, mask))
        folded = apply_normalization(model, gain, bias)
        normed = reward_scores(model, ids, mask, apply_bias=True)
    assert not folded  # Llama's HF head has no bias: it is stored in config.json
    assert abs(normed.mean().item()) < 1e-5 and abs(normed.std(unbiased=False).item() - 1) < 1e-5
    save_pretrained_atomic(model, tokenizer, tmp_path / "rm")
    loaded, tok = load_reward_model(str(tmp_path / "rm"))
    assert getattr(loaded.config, CONFIG_BIAS) == pytest.approx(bias)
    scorer = RewardModelScorer(loaded, tok)
    again = scorer([*PROMPTS * 2, "What a"], [*RESPONSES * 2, " beautiful story."])
    torch.testing.assert_close(again, normed, rtol=1e-4, atol=1e-5)
    # plain transformers: unit std, shifted by the (documented) constant -bias
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        raw = plain(input_ids=ids, attention_mask=mask).logits[:, 0]
    torch.testing.assert_close(raw + bias, normed, rtol=1e-4, atol=1e-4)
    assert isinstance(scorer, Scorer) and isinstance(load_scorer(tmp_path / "rm"), RewardModelScorer)


def test_normalisation_folds_bias_when_the_head_has_one():
    head = torch.nn.Linear(3, 1, bias=True)
    model = torch.nn.Module()
    model.score = head
    model.config = type("C", (), {})()
    x = torch.randn(50, 3)
    with torch.no_grad():
        gain, bias = normalization(head(x)[:, 0])
        assert apply_normalization(model, gain, bias)
        out = head(x)[:, 0]
    assert abs(out.mean().item()) < 1e-5 and abs(out.std(unbiased=False).item() - 1) < 1e-5
    with pytest.raises(AlignkitError):
        normalization(torch.ones(4))


def test_segment_rewards_sum_in_context_equals_prefix_scores(rm):
    model, tokenizer = rm
    response = " I loved it. The actors were great! Fine."
    assert "".join(split_sentences(response)) == response and len(split_sentences(response)) == 3
    scorer = RewardModelScorer(model, tokenizer, segments="sentences")
    total = scorer(["The film"], [response])
    prefixes = segment_prefixes(tokenizer, "The film", split_sentences(response))
    with torch.no_grad():
        each = reward_scores(model, *right_pad(prefixes, tokenizer.pad_token_id))
    torch.testing.assert_close(total, each.sum().reshape(1), rtol=1e-4, atol=1e-5)
    whole = RewardModelScorer(model, tokenizer)(["The film"], [response])
    chunked = RewardModelScorer(model, tokenizer, segments="chunks:1000")(["The film"], [response])
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-5)  # one chunk == the whole response


def test_combine_rewards_and_ensemble_scorer(rm, tmp_path):
    scores = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    mean, metrics = combine_rewards(scores)
    assert mean.tolist() == [2.0, 1.0]
    weighted, _ = combine_rewards(scores, weights=torch.tensor([2.0, 0.0]))
    assert weighted.tolist() == [1.0, 2.0]  # (1/K) sum w_k r_k, Eq. 10.72
    pess, _ = combine_rewards(scores, combine="mean_minus_std", k=2.0)
    assert pess.tolist() == [0.0, -1.0]
    assert combine_rewards(scores, combine="min")[0].tolist() == [1.0, 0.0]
    assert metrics["reward/disagreement"].item() == pytest.approx(1.0)
    with pytest.raises(AlignkitError, match="combine"):
        combine_rewards(scores, combine="max")
    model, tokenizer = rm
    save_pretrained_atomic(model, tokenizer, tmp_path / "m0")
    final = save_ensemble(tmp_path / "ens", [tmp_path / "m0", tmp_path / "m0"], combine="min")
    scorer = load_scorer(final)
    assert isinstance(scorer, EnsembleScorer) and len(scorer.members) == 2
    single = RewardModelScorer(model, tokenizer)(PROMPTS, RESPONSES)
    torch.testing.assert_close(scorer(PROMPTS, RESPONSES), single, rtol=1e-4, atol=1e-5)
    assert scorer.last_metrics["reward/disagreement"] == pytest.approx(0.0, abs=1e-5)


def test_gold_scorer_wrapper_and_bad_specs(tmp_path):
    gold = GoldScorer(lambda texts: torch.tensor([float(len(t)) for t in texts]))
    assert gold(["ab", "c"], ["c", ""]).tolist() == [3.0, 1.0]
    with pytest.raises(TypeError):
        gold("ab", "c")
    with pytest.raises(AlignkitError, match="scorer"):
        load_scorer(tmp_path)
    assert math.isfinite(gold(["a"], ["b"]).item())
    calls = []
    memo = GoldScorer(lambda texts: calls.append(list(texts)) or torch.ones(len(texts)), memo=True)
    memo(["a", "a"], ["b", "b"])
    assert memo(["a", "c"], ["b", "d"]).tolist() == [1.0, 1.0] and calls == [["ab"], ["cd"]]


def test_token_chunks_join_back_to_the_text_with_a_metaspace_tokenizer():
    """SentencePiece-style tokenizers drop a chunk's leading space when it is decoded alone."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from alignkit.data.segments import split_text

    words = ["▁I", "▁loved", "▁this", "▁movie", "!", "▁It", "▁was", "▁great", "."]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", *words])}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    text = "I loved this movie ! It was great ."
    naive = [tokenizer.decode(ids) for ids in ([1, 2, 3], [4, 5, 6], [7, 8, 9])]
    assert "".join(naive) != tokenizer.decode(tokenizer(text)["input_ids"])  # the bug this guards against
    pieces = split_text(text, "chunks:3", tokenizer)
    assert len(pieces) == 3 and "".join(pieces) == tokenizer.decode(tokenizer(text)["input_ids"])


def test_scorer_packs_the_responses_to_one_prompt_into_one_row(rm, monkeypatch):
    """k responses per prompt (as RL scores them): the CPU backend shared_rows one row per prompt and gives
    the plain backend's rewards."""
    model, tokenizer = rm
    prompts = ["The film", "The film", "I think", "The film", "I think"]
    responses = [" was great.", " bored me to tears.", " it works", " was fine", " not"]
    expected = RewardModelScorer(model, tokenizer, backend=PlainBackend())(prompts, responses)
    monkeypatch.setattr(shared_prompts, "SHARING_MARGIN", float("inf"))  # pack these tiny rows
    packed = RewardModelScorer(model, tokenizer, backend=CpuBackend())(prompts, responses)
    torch.testing.assert_close(packed, expected, atol=1e-5, rtol=0)
    assert len(set(expected.tolist())) == len(prompts)


def test_scorer_works_out_the_special_prefix_once_per_call(rm, monkeypatch):
    import alignkit.rollout.score as score

    model, tokenizer = rm
    calls = []
    original = score.special_prefix
    monkeypatch.setattr(score, "special_prefix", lambda tok: calls.append(1) or original(tok))
    scores = RewardModelScorer(model, tokenizer)([*PROMPTS, "What a"], [*RESPONSES, " beautiful story."])
    assert len(calls) == 1 and scores.shape == (len(PROMPTS) + 1,)
    rows = [encode_scored(tokenizer, p, r) for p, r in zip([*PROMPTS, "What a"], [*RESPONSES, " beautiful story."],
                                                           strict=True)]
    ids, mask = right_pad(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(scores, reward_scores(model, ids, mask, apply_bias=True), rtol=1e-4, atol=1e-5)
