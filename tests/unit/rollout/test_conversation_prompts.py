"""Conversational prompt-only data (`prompt` as a message list): sampled through the chat template, scored
by reward models as a conversation, by gold scorers as text."""

from __future__ import annotations

import torch
from tests.conftest import build_tiny_tokenizer

from alignkit.data.reward_groups import encode_scored
from alignkit.rollout.generate import tokenize_prompts
from alignkit.rollout.score import GoldScorer, load_scorer

CONVERSATION = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "how are you?"},
                {"role": "assistant", "content": "I am fine."}, {"role": "user", "content": "The movie?"}]


def _rows(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [row[m].tolist() for row, m in zip(ids, mask, strict=True)]


def test_message_prompts_are_rendered_with_the_generation_prompt_and_one_bos():
    tok = build_tiny_tokenizer()
    tok.chat_template = tok.bos_token + tok.chat_template  # a template that writes its own BOS too
    prompts = [[{"role": "user", "content": "hi"}], CONVERSATION, "I loved"]
    ids, mask = tokenize_prompts(tok, prompts)
    rows = _rows(ids, mask)
    for prompt, row in zip(prompts[:2], rows, strict=False):
        text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        assert row == tok(text, add_special_tokens=False)["input_ids"]  # the template's BOS, and only it
        assert row.count(tok.bos_token_id) == 1 and row[0] == tok.bos_token_id
        assert tok.decode(row).endswith("<|im_start|>assistant\n")
    assert rows[2] == tok("I loved")["input_ids"]  # a string prompt stays plain text without `chat`
    # `chat=True` wraps string prompts only; a conversation is rendered the same way with or without it
    chat_ids, chat_mask = tokenize_prompts(tok, prompts, chat=True)
    assert _rows(chat_ids, chat_mask)[:2] == rows[:2]
    assert _rows(chat_ids, chat_mask)[2] == _rows(*tokenize_prompts(tok, ["I loved"], chat=True))[0]


def test_reward_model_scores_a_conversation_prompt_with_its_chat_template(reward_dir):
    scorer = load_scorer(reward_dir)
    prompts = [CONVERSATION, CONVERSATION, [{"role": "user", "content": "hi"}]]
    responses = ["It was wonderful!", "Terrible.", "Hello"]
    scores = scorer(prompts, responses)
    assert scores.shape == (3,) and torch.isfinite(scores).all() and scores[0] != scores[1]
    # the same as the response given as an assistant turn: prompt + response rendered as one conversation
    as_turns = [[{"role": "assistant", "content": r}] for r in responses]
    assert torch.equal(scorer(prompts, as_turns), scores)
    ids = encode_scored(scorer.tokenizer, CONVERSATION, responses[0])
    rendered = scorer.tokenizer.apply_chat_template(CONVERSATION + [{"role": "assistant", "content": responses[0]}],
                                                    tokenize=False)
    assert scorer.tokenizer.decode(ids).startswith("<|bos|>" + rendered.split(responses[0])[0])


def test_gold_scorer_reads_a_conversation_prompt_as_text():
    seen = []
    gold = GoldScorer(lambda texts: seen.extend(texts) or [float(len(t)) for t in texts], separator=" ")
    out = gold([CONVERSATION, "Plain"], ["Nice.", "Text"])
    assert seen == ["Be kind.\nhow are you?\nI am fine.\nThe movie? Nice.", "Plain Text"]
    assert out.tolist() == [float(len(t)) for t in seen]
