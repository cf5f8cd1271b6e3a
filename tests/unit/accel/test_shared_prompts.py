"""Packed prompt rows: rows that repeat a prompt run it once, with the plain pass's results and gradients.

The layouts by hand (`shared_prompt_layout`, `shared_prefix_layout`), when the CPU backend shared_rows
(`sharing_pays`, `accepts_4d_masks`), and the packed forward of rollouts and reward groups
against the plain one under sdpa and eager attention (tests/unit/accel/test_backends.py has every
architecture; tests/unit/trainers/test_dpo_forward.py the DPO batches).
"""

from __future__ import annotations

import pytest
import torch
from tests.conftest import TINY_PROMPTS
from tests.unit.accel.conftest import causal_lm, classifier

from alignkit.accel.cpu import CpuBackend
from alignkit.accel.cpu.shared_prompts import (
    accepts_4d_masks,
    attention_window,
    shared_prefix_layout,
    shared_prompt_layout,
    sharing_pays,
)
from alignkit.accel.plain import PlainBackend
from alignkit.data.collate import right_pad
from alignkit.ops.logprobs import IGNORE_INDEX
from alignkit.rollout.generate import sample, tokenize_prompts
from alignkit.rollout.logprobs import sequence_logprobs

PAD = 0
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


def test_packed_layout_by_hand():
    """Two rows of prompt [7, 8] (one with a pad), one of [9]: rows, masks, positions and read columns."""
    prompt_ids = torch.tensor([[0, 9], [7, 8], [7, 8]])
    prompt_mask = torch.tensor([[False, True], [True, True], [True, True]])
    suffix_ids = torch.tensor([[1, 2], [3, 4], [5, 0]])
    suffix_mask = torch.tensor([[True, True], [True, True], [True, False]])
    out = shared_prompt_layout(prompt_ids, prompt_mask, suffix_ids, suffix_mask, pad_id=0)
    # distinct prompts sorted: [0, 9] (group 0, one response), [7, 8] (group 1, two); 2 slots of 2
    assert out["input_ids"].tolist() == [[0, 9, 1, 2, 0, 0], [7, 8, 3, 4, 5, 0]]
    assert out["position_ids"].tolist() == [[0, 0, 1, 2, 1, 2], [0, 1, 2, 3, 2, 3]]
    seen = out["attention_mask"][1, 0].int().tolist()
    assert seen == [[1, 0, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0, 0],
                    [1, 1, 1, 0, 0, 0],
                    [1, 1, 1, 1, 0, 0],
                    [1, 1, 0, 0, 1, 0],   # slot 1 sees the prompt and itself, not slot 0
                    [1, 1, 0, 0, 1, 1]]   # its pad (never a key) sees them and itself
    assert out["attention_mask"][0, 0, 1].int().tolist() == [0, 1, 0, 0, 0, 0]  # the left pad is never a key
    assert out["keep"].tolist() == [1, 2, 4]  # last prompt column, then each slot's first S - 1 columns
    assert out["group"].tolist() == [[0, 0], [1, 1], [1, 1]]
    assert out["take"].tolist() == [[0, 1], [0, 1], [0, 2]]
    assert out["columns"].tolist() == [[2, 3], [2, 3], [4, 5]]


def test_shared_prefix_layout_by_hand():
    layout = shared_prefix_layout(ROWS, GROUPS, PAD)
    assert layout["prefix_index"].tolist() == [0, 0, 1, 1, 1, 2, 3, 3]
    prefixes = [row[mask.bool()].tolist() for row, mask in zip(layout["prefix_ids"], layout["prefix_mask"], strict=True)]
    assert prefixes == [[1, 5, 6], [1, 12, 13, 14], [1, 20], [1, 22]]  # every item keeps >= 1 suffix token
    suffixes = [row[mask.bool()].tolist() for row, mask in zip(layout["suffix_ids"], layout["suffix_mask"], strict=True)]
    assert suffixes[1] == [10, 11] and suffixes[4] == [15] and suffixes[5] == [21] and suffixes[6] == [23]


def test_labelled_layout_stops_before_the_first_label_and_never_trains_token_0():
    x = IGNORE_INDEX
    rows = [[1, 5, 6, 7, 8], [1, 5, 6, 9]]
    labels = [[x, x, 6, 7, 8], [x, x, 6, 9]]  # responses start at column 2 and share their first token
    layout = shared_prefix_layout(rows, [[0, 1]], PAD, labels=labels)
    assert layout["prefix_ids"].tolist() == [[1, 5]]  # the common [1, 5, 6] is cut before the labels
    assert layout["suffix_labels"].tolist() == [[6, 7, 8], [6, 9, x]]
    unlabelled_start = shared_prefix_layout([[7, 8], [7, 9]], [[0, 1]], PAD, labels=[[7, 8], [7, 9]])
    assert unlabelled_start["suffix_labels"][:, 0].tolist() == [x, x]  # empty prefix: token 0 not trained


def test_packing_only_when_it_saves_flops():
    from transformers import LlamaConfig

    tiny = LlamaConfig(hidden_size=32, intermediate_size=64)
    # hidden 32: per token 2 * (4 * 32^2 + 3 * 32 * 64) = 20480 FLOPs, attention 128 W^2 per row:
    # 8 rows of 8 vs 4 packed rows of 4 + 3 * 4 columns: attention grows more than tokens shrink
    assert not sharing_pays(tiny, 8, 4, 4, 4, 3)
    # the benchmark's shape: hidden 256, MLP 688; 16 rows of 16 + 32 tokens, 8 packed rows of 16 + 2 * 32
    config = LlamaConfig(hidden_size=256, intermediate_size=688)
    assert sharing_pays(config, 16, 8, 16, 32, 2)
    assert not sharing_pays(config, 16, 1, 16, 128, 16)  # 16 + 16 * 128 columns > SHARED_ROW_MAX_WIDTH


def test_only_llama_family_models_with_sdpa_or_eager_attention_and_full_attention_are_packed():
    from transformers import BloomConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    assert accepts_4d_masks(LlamaConfig(attn_implementation="sdpa"))
    assert accepts_4d_masks(Qwen2Config(attn_implementation="eager"))
    assert accepts_4d_masks(Qwen3Config(attn_implementation="sdpa"))
    assert not accepts_4d_masks(LlamaConfig(attn_implementation="flash_attention_2"))  # reads 2D masks only
    assert not accepts_4d_masks(BloomConfig(attn_implementation="sdpa"))  # ALiBi: positions from the mask
    assert not accepts_4d_masks(None)
    windowed = MistralConfig(sliding_window=8, attn_implementation="sdpa")
    assert attention_window(windowed) == 8 and not accepts_4d_masks(windowed)
    assert attention_window(MistralConfig(sliding_window=None)) is None
    assert attention_window(Qwen2Config(sliding_window=8, use_sliding_window=False)) is None
    assert attention_window(LlamaConfig()) is None


def _weighted(values: torch.Tensor) -> torch.Tensor:
    return (values * torch.arange(1.0, values.numel() + 1).view_as(values)).sum()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("groups", [[0, 0, 0, 1, 1, 1, 2, 2, 2], [0, 1, 0, 2, 0, 1]], ids=["k=3", "unequal"])
def test_packed_rollout_logprobs_equal_one_plain_pass_with_gradients(tokenizer, shared_rows, attn, groups):
    """Rows that repeat a prompt, in groups of unequal size in any row order: one packed row per prompt
    gives the plain pass's log-probs, entropies and gradients (eager attention adds its mask to the
    scores: it gets the additive form)."""
    model = causal_lm("llama", len(tokenizer), attn_implementation=attn)
    ids, mask = tokenize_prompts(tokenizer, TINY_PROMPTS[:3])  # left-padded to different lengths
    # Many end ids, so that some responses end early and leave pad tokens inside the packed rows.
    rollout = sample(model, ids[groups], mask[groups], max_new_tokens=12, temperature=0.8, pad_token_id=0,
                     eos_token_id=list(range(2, 40)), generator=torch.Generator().manual_seed(0),
                     backend=PlainBackend())
    assert not rollout.response_mask.all()
    assert CpuBackend().rollout_logits(model, rollout)[0].shape[0] == 3  # one row per distinct prompt
    results = []
    for backend in (PlainBackend(), CpuBackend()):
        logprobs, entropy = sequence_logprobs(model, rollout, temperature=0.8, with_entropy=True, backend=backend)
        (logprobs.sum() + entropy.sum()).backward()
        results.append((logprobs.detach(), entropy.detach(), [p.grad.clone() for p in model.parameters()]))
        model.zero_grad()
    (lp0, en0, g0), (lp1, en1, g1) = results
    torch.testing.assert_close(lp1, lp0, atol=1e-5, rtol=0)
    torch.testing.assert_close(en1, en0, atol=1e-5, rtol=0)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert (lp1 - rollout.logprobs).abs().max() < 1e-5


def test_packed_logprobs_when_the_model_ignores_logits_to_keep(tokenizer, shared_rows, monkeypatch):
    """A model that returns every column (older transformers, remote code): the kept columns are picked."""
    model = causal_lm("llama", len(tokenizer))
    ids, mask = tokenize_prompts(tokenizer, TINY_PROMPTS[:2])
    rollout = sample(model, ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0), max_new_tokens=12,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=0, generator=torch.Generator().manual_seed(0))
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, logits_to_keep=0, **kw: forward(*a, **kw))
    with torch.no_grad():
        packed = sequence_logprobs(model, rollout, backend=CpuBackend())
        plain = sequence_logprobs(model, rollout, backend=PlainBackend())
    torch.testing.assert_close(packed, plain, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rewards_and_gradients_equal_full_sequences(shared_rows, attn):
    """[prefix, item 1, ..., item K] packed one row per prefix under a 4D mask, read at each item's end,
    for groups sharing more than the prompt, single items and an item that is a prefix of another."""
    model = classifier("llama", 50, attn_implementation=attn)
    ids, mask = right_pad(ROWS, PAD)
    group_index = torch.tensor([g + [-1] * (3 - len(g)) for g in GROUPS])
    full = PlainBackend().group_scores(model, ids, mask, group_index)
    expected = torch.autograd.grad(_weighted(full), list(model.parameters()))
    packed = CpuBackend().group_scores(model, ids, mask, group_index)
    torch.testing.assert_close(packed, full, atol=1e-5, rtol=0)
    for p, g in zip(torch.autograd.grad(_weighted(packed), list(model.parameters())), expected, strict=True):
        torch.testing.assert_close(p, g, atol=1e-5, rtol=1e-4)
