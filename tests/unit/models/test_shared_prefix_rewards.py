"""Reward-model groups scored with their common prefix run once equal full-sequence rewards."""

from __future__ import annotations

import pytest
import torch

from alignkit.models.reward_model import reward_scores, shared_prefix_scores
from alignkit.ops.prefix import shared_prefix_layout
from alignkit.rollout.score import right_pad

PAD = 0


def tiny_classifier(attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=50, max_position_embeddings=64, pad_token_id=PAD,
                         num_labels=1, attn_implementation=attn)
    return LlamaForSequenceClassification(config).eval()


ROWS = [
    [1, 5, 6, 7, 8, 9],        # group 0: a pair sharing the prompt [1, 5, 6]
    [1, 5, 6, 10, 11],
    [1, 12, 13, 14, 15, 16],   # group 1: three ranked responses sharing [1, 12, 13, 14] (beyond the prompt)
    [1, 12, 13, 14, 17],
    [1, 12, 13, 14, 15],
    [1, 20, 21],               # group 2: one item
    [1, 22, 23],               # group 3: one item a prefix of the other
    [1, 22, 23, 24, 25],
]
GROUPS = [[0, 1], [2, 3, 4], [5], [6, 7]]


def test_layout_by_hand():
    layout = shared_prefix_layout(ROWS, GROUPS, PAD)
    assert layout["prefix_index"].tolist() == [0, 0, 1, 1, 1, 2, 3, 3]
    prefixes = [row[mask.bool()].tolist() for row, mask in zip(layout["prefix_ids"], layout["prefix_mask"], strict=True)]
    assert prefixes == [[1, 5, 6], [1, 12, 13, 14], [1, 20], [1, 22]]  # every item keeps >= 1 suffix token
    suffixes = [row[mask.bool()].tolist() for row, mask in zip(layout["suffix_ids"], layout["suffix_mask"], strict=True)]
    assert suffixes[1] == [10, 11] and suffixes[4] == [15] and suffixes[5] == [21] and suffixes[6] == [23]


def test_shared_prefix_rewards_and_gradients_equal_full_sequences():
    model = tiny_classifier()
    ids, mask = right_pad(ROWS, PAD)
    full = reward_scores(model, ids, mask)
    (full * torch.arange(1.0, 9.0)).sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    shared = shared_prefix_scores(model, shared_prefix_layout(ROWS, GROUPS, PAD))
    torch.testing.assert_close(shared, full, atol=1e-5, rtol=0)
    (shared * torch.arange(1.0, 9.0)).sum().backward()
    for p, g in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)


def _groups_as_records(rows, groups):
    return [{"items": [rows[i] for i in items], "best": 0} for items in groups]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rewards_and_gradients_equal_full_sequences(monkeypatch, attn):
    """[prefix, item 1, ..., item K] packed one row per prefix under a 4D mask, read at each item's end
    (eager attention adds its mask to the scores: it gets the additive form)."""
    from alignkit.models.reward_model import packed_scores
    from alignkit.ops import packing
    from alignkit.trainers.reward_data import collate_groups

    model = tiny_classifier(attn)
    ids, mask = right_pad(ROWS, PAD)
    full = reward_scores(model, ids, mask)
    (full * torch.arange(1.0, 9.0)).sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    monkeypatch.setattr(packing, "PACKING_MARGIN", float("inf"))  # pack these tiny rows
    batch = collate_groups(_groups_as_records(ROWS, GROUPS), PAD, share_prefixes=True, pack_config=model.config)
    assert batch["packed_input_ids"].shape[0] == 4  # one row per distinct prefix
    # distinct left-padded prefixes in sorted order: [0,0,1,20], [0,0,1,22], [0,1,5,6], [1,12,13,14]
    assert batch["read_row"].tolist() == [2, 2, 3, 3, 3, 0, 1, 1]
    # prefix width 4, then 3 slots of 3 columns (the longest suffix); each item read at its last token
    assert batch["read_col"].tolist() == [6, 8, 5, 7, 10, 4, 4, 9]
    packed = packed_scores(model, batch)
    torch.testing.assert_close(packed, full, atol=1e-5, rtol=0)
    (packed * torch.arange(1.0, 9.0)).sum().backward()
    for p, g in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)


def test_packing_only_when_it_saves_flops(monkeypatch):
    from alignkit.ops.packing import packing_pays
    from alignkit.trainers.reward_data import collate_groups

    model = tiny_classifier()
    records = _groups_as_records(ROWS, GROUPS)
    # hidden 32: per token 2 * (4 * 32^2 + 3 * 32 * 64) = 20480 FLOPs, attention 128 W^2 per row:
    # 8 rows of 6 vs 4 packed rows of up to 4 + 3 * 4 columns: attention grows more than tokens shrink
    assert not packing_pays(model.config, 8, 4, 4, 4, 3)
    batch = collate_groups(records, PAD, share_prefixes=True, pack_config=model.config)
    assert "packed_input_ids" not in batch and "prefix_ids" not in batch  # 0.34 of the tokens < MIN_SAVING
    from alignkit.ops import prefix

    monkeypatch.setattr(prefix, "MIN_SAVING", 0.34)  # not packed, but the KV-cache sharing now pays
    batch = collate_groups(records, PAD, share_prefixes=True, pack_config=model.config)
    assert "packed_input_ids" not in batch and batch["prefix_index"].tolist() == [0, 0, 1, 1, 1, 2, 3, 3]
    # the benchmark's shape: hidden 256, MLP 688; 16 rows of 16 + 32 tokens, 8 packed rows of 16 + 2 * 32
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=256, intermediate_size=688)
    assert packing_pays(config, 16, 8, 16, 32, 2)
    assert not packing_pays(config, 16, 1, 16, 128, 16)  # 16 + 16 * 128 columns > PACKED_MAX_WIDTH


def test_only_llama_family_models_with_sdpa_or_eager_attention_are_packed():
    from transformers import BloomConfig, LlamaConfig, Qwen2Config

    from alignkit.ops.packing import accepts_packed_masks

    assert accepts_packed_masks(LlamaConfig(attn_implementation="sdpa"))
    assert accepts_packed_masks(Qwen2Config(attn_implementation="eager"))
    assert not accepts_packed_masks(LlamaConfig(attn_implementation="flash_attention_2"))  # reads 2D masks only
    assert not accepts_packed_masks(BloomConfig(attn_implementation="sdpa"))  # ALiBi: positions from the mask
    assert not accepts_packed_masks(None)


def test_sharing_only_when_it_removes_enough_tokens(monkeypatch):
    from alignkit.ops import prefix
    from alignkit.ops.prefix import MIN_SAVING, worth_sharing

    # full rows: 6+5+6+5+5+3+3+5 = 38 tokens; prefixes 3, 4, 2, 2 used by 2, 3, 1, 2 items save
    # 3*1 + 4*2 + 2*0 + 2*1 = 13 tokens: 0.34 of them
    assert shared_prefix_layout(ROWS, GROUPS, PAD, only_if_worth=True) is None  # below MIN_SAVING
    monkeypatch.setattr(prefix, "MIN_SAVING", 0.34)
    assert shared_prefix_layout(ROWS, GROUPS, PAD, only_if_worth=True) is not None  # 0.342 >= 0.34
    monkeypatch.undo()
    assert MIN_SAVING == 0.4 and worth_sharing(4, 10) and not worth_sharing(3, 10) and not worth_sharing(0, 0)


def test_labelled_layout_stops_before_the_first_label_and_never_trains_token_0():
    from alignkit.ops.prefix import IGNORE_INDEX as X

    rows = [[1, 5, 6, 7, 8], [1, 5, 6, 9]]
    labels = [[X, X, 6, 7, 8], [X, X, 6, 9]]  # responses start at column 2 and share their first token
    layout = shared_prefix_layout(rows, [[0, 1]], PAD, labels=labels)
    assert layout["prefix_ids"].tolist() == [[1, 5]]  # the common [1, 5, 6] is cut before the labels
    assert layout["suffix_labels"].tolist() == [[6, 7, 8], [6, 9, X]]
    unlabelled_start = shared_prefix_layout([[7, 8], [7, 9]], [[0, 1]], PAD, labels=[[7, 8], [7, 9]])
    assert unlabelled_start["suffix_labels"][:, 0].tolist() == [X, X]  # empty prefix: token 0 not trained



def test_no_sharing_under_a_sliding_window():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    from alignkit.ops.prefix import attention_window, model_allows_sharing

    assert attention_window(MistralConfig(sliding_window=8)) == 8 and not model_allows_sharing(MistralConfig(sliding_window=8))
    assert attention_window(MistralConfig(sliding_window=None)) is None
    assert attention_window(Qwen2Config(sliding_window=8, use_sliding_window=False)) is None
    assert attention_window(LlamaConfig()) is None and model_allows_sharing(LlamaConfig())
