"""The sampler (`sample`), its log-probs against the training forward pass, and `tokenize_prompts`."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import TINY_PROMPTS as PROMPTS
from tests.conftest import build_tiny_llama, build_tiny_tokenizer

from alignkit.rollout.generate import sample, stop_token_ids, tokenize_prompts
from alignkit.rollout.logprobs import sequence_logprobs
from alignkit.rollout.rewards import score_index
from alignkit.rollout.sampling import filter_logits
from alignkit.rollout.types import Rollout


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_tiny_llama(len(tokenizer)).eval()


def _sample(model, tokenizer, ids, mask, seed=0, **kwargs) -> Rollout:
    kwargs.setdefault("max_new_tokens", 12)
    return sample(
        model,
        ids,
        mask,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )


@pytest.fixture()
def eos_heavy_model(tokenizer):
    """The tiny model with its EOS logit raised, so that EOS is sampled within a few tokens."""
    m = build_tiny_llama(len(tokenizer), tie_word_embeddings=False).eval()
    with torch.no_grad():
        m.lm_head.weight[tokenizer.eos_token_id] *= 0  # EOS logit = 0 ...
        bias = torch.zeros(len(tokenizer))
        bias[tokenizer.eos_token_id] = 5.0  # ... then +5 through a bias: p(EOS) ~ 1/3 per step
        m.lm_head.bias = torch.nn.Parameter(bias)
    return m


def test_tokenize_prompts_left_pads_with_one_bos(tokenizer, prompts):
    ids, mask = prompts
    bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
    assert ids.shape == mask.shape and mask.dtype == torch.bool
    for row, row_mask in zip(ids, mask, strict=True):
        first = int((~row_mask).sum())  # left padding: real tokens are a suffix
        assert row_mask[first:].all() and not row_mask[:first].any()
        assert (row[:first] == pad).all()
        assert row[first] == bos and (row == bos).sum() == 1
    assert mask.all(dim=1).any() and not mask.all(dim=1).all()  # lengths differ: padding is exercised


def test_tokenize_prompts_chat_has_one_bos(tokenizer):
    # A template that writes its own BOS must not produce two.
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = tokenizer.bos_token + tokenizer.chat_template
    ids, mask = tokenize_prompts(tokenizer, ["hi", "how are you?"], chat=True)
    for row, row_mask in zip(ids, mask, strict=True):
        assert (row[row_mask] == tokenizer.bos_token_id).sum() == 1
        assert row[row_mask][0] == tokenizer.bos_token_id
    assert "<|im_start|>assistant" in tokenizer.decode(ids[0][mask[0]])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_training_logprobs_equal_sampler_logprobs(model, tokenizer, prompts, eos_heavy_model, temperature):
    for m in (model, eos_heavy_model):  # long responses, and short ones with pads after EOS
        rollout = _sample(m, tokenizer, *prompts, temperature=temperature)
        recomputed = sequence_logprobs(m, rollout, temperature=temperature)
        assert recomputed.shape == rollout.logprobs.shape
        assert (recomputed - rollout.logprobs).abs().max() < 1e-5


def test_batched_logprobs_equal_unbatched(model, tokenizer, prompts):
    batched = _sample(model, tokenizer, *prompts, temperature=0.7)
    recomputed = sequence_logprobs(model, batched, temperature=0.7)
    for i in range(len(PROMPTS)):
        keep = batched.prompt_mask[i]
        single = Rollout(
            prompt_ids=batched.prompt_ids[i : i + 1, keep],
            prompt_mask=batched.prompt_mask[i : i + 1, keep],
            response_ids=batched.response_ids[i : i + 1],
            response_mask=batched.response_mask[i : i + 1],
            logprobs=batched.logprobs[i : i + 1],
            ends_with_eos=batched.ends_with_eos[i : i + 1],
            lengths=batched.lengths[i : i + 1],
        )
        alone = sequence_logprobs(model, single, temperature=0.7)[0]
        assert (alone - batched.logprobs[i]).abs().max() < 1e-5
        assert (alone - recomputed[i]).abs().max() < 1e-5


def test_eos_then_pads_and_last_index(eos_heavy_model, tokenizer, prompts):
    rollout = _sample(eos_heavy_model, tokenizer, *prompts, max_new_tokens=20)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert rollout.ends_with_eos.any()
    last = rollout.response_last_index()
    for i in range(rollout.batch_size):
        ids, mask = rollout.response_ids[i], rollout.response_mask[i]
        n = int(rollout.lengths[i])
        assert mask[:n].all() and not mask[n:].any()
        assert (ids[n:] == pad).all() and (rollout.logprobs[i, n:] == 0).all()
        assert mask[last[i]] and ids[last[i]] != pad
        if rollout.ends_with_eos[i]:
            first_eos = int((ids == eos).nonzero()[0])
            assert last[i] == first_eos == n - 1
        else:
            assert n == rollout.response_ids.shape[1] and (ids != eos).all()
    assert (rollout.full_ids()[torch.arange(rollout.batch_size), rollout.full_last_index()] != pad).all()


def test_stops_when_every_row_has_eos(eos_heavy_model, tokenizer, prompts):
    rollout = _sample(eos_heavy_model, tokenizer, *prompts, max_new_tokens=200)
    assert rollout.ends_with_eos.all()
    assert rollout.response_ids.shape[1] == int(rollout.lengths.max()) < 200


def test_min_new_tokens_prevents_early_eos(eos_heavy_model, tokenizer, prompts):
    free = _sample(eos_heavy_model, tokenizer, *prompts, max_new_tokens=20)
    assert (free.lengths < 6).any()  # the biased model does stop early on its own
    held = _sample(eos_heavy_model, tokenizer, *prompts, max_new_tokens=20, min_new_tokens=6)
    assert (held.lengths >= 6).all()
    assert not (held.response_ids[:, :5] == tokenizer.eos_token_id).any()
    # The recorded log-probs stay those of the unfiltered policy.
    recomputed = sequence_logprobs(eos_heavy_model, held)
    assert (recomputed - held.logprobs).abs().max() < 1e-5


def test_same_seed_same_tokens(model, tokenizer, prompts):
    a = _sample(model, tokenizer, *prompts, seed=3, top_p=0.9)
    b = _sample(model, tokenizer, *prompts, seed=3, top_p=0.9)
    c = _sample(model, tokenizer, *prompts, seed=4, top_p=0.9)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.response_ids, c.response_ids)


def test_top_k_1_equals_greedy_generate(model, tokenizer, prompts):
    ids, mask = prompts
    rollout = _sample(model, tokenizer, ids, mask, top_k=1, max_new_tokens=10)
    with torch.inference_mode():
        greedy = model.generate(
            input_ids=ids,
            attention_mask=mask.long(),
            do_sample=False,
            max_new_tokens=10,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )[:, ids.shape[1] :]
    width = min(greedy.shape[1], rollout.response_ids.shape[1])
    assert torch.equal(rollout.response_ids[:, :width], greedy[:, :width])


def test_filter_logits_matches_plain_definition():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, True, True, True, False]]
    probs = logits.softmax(-1)[0].tolist()  # ranked: 4 (.53), 0 (.20), 1 (.07) ...
    kept = ~torch.isinf(filter_logits(logits, top_p=0.7))[0]
    assert probs[4] < 0.7 <= probs[4] + probs[0]
    assert kept.tolist() == [True, False, False, False, True]
    assert (~torch.isinf(filter_logits(logits, top_p=0.01))).sum() == 1  # the top token always stays


def test_sample_restores_training_mode(tokenizer, prompts):
    m = build_tiny_llama(len(tokenizer)).train()
    _sample(m, tokenizer, *prompts, max_new_tokens=2)
    assert m.training


def test_rollout_helpers(model, tokenizer, prompts):
    rollout = _sample(model, tokenizer, *prompts, max_new_tokens=5)
    full, mask, pos = rollout.full_ids(), rollout.full_mask(), rollout.position_ids()
    assert full.shape == mask.shape == pos.shape == (4, rollout.prompt_length + 5)
    for i in range(4):
        assert pos[i][mask[i]].tolist() == list(range(int(mask[i].sum())))
    assert len(rollout.texts(tokenizer)) == 4
    assert rollout.prompt_texts(tokenizer)[0] == PROMPTS[0]
    both = Rollout.concat(
        [rollout.select([0]), rollout.select(slice(1, 4))], pad_token_id=tokenizer.pad_token_id
    )
    assert torch.equal(both.full_ids(), full) and torch.equal(both.logprobs, rollout.logprobs)


def test_right_padded_prompts_are_refused(model, tokenizer, prompts):
    ids, mask = prompts
    with pytest.raises(ValueError, match="left-padded"):
        _sample(model, tokenizer, ids.flip(1), mask.flip(1), max_new_tokens=2)


def test_entropy_matches_plain_definition(model, tokenizer, prompts):
    rollout = _sample(model, tokenizer, *prompts, max_new_tokens=4)
    logprobs, entropy = sequence_logprobs(model, rollout, temperature=0.7, with_entropy=True)
    logits = (
        model(
            input_ids=rollout.full_ids(),
            attention_mask=rollout.full_mask().long(),
            position_ids=rollout.position_ids(),
        ).logits[:, rollout.prompt_length - 1 : -1]
        / 0.7
    )
    logp = logits.log_softmax(-1)
    expected = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(entropy[rollout.response_mask], expected[rollout.response_mask])
    assert torch.equal(logprobs, sequence_logprobs(model, rollout, temperature=0.7))
    logprobs.sum().backward()  # the training pass carries gradients (rollout tensors are not inference tensors)


def test_batched_greedy_sampling_equals_one_prompt_at_a_time(model, tokenizer, prompts):
    ids, mask = prompts
    batched = _sample(model, tokenizer, ids, mask, top_k=1, max_new_tokens=8, temperature=0.7)
    for i in range(len(PROMPTS)):
        keep = mask[i]
        alone = _sample(
            model,
            tokenizer,
            ids[i : i + 1, keep],
            mask[i : i + 1, keep],
            top_k=1,
            max_new_tokens=8,
            temperature=0.7,
        )
        n = int(alone.lengths[0])
        assert torch.equal(alone.response_ids[0, :n], batched.response_ids[i, :n])
        assert (alone.logprobs[0, :n] - batched.logprobs[i, :n]).abs().max() < 1e-5


def test_concat_of_different_widths_keeps_logprobs(model, tokenizer, prompts):
    ids, mask = prompts
    short = _sample(model, tokenizer, ids[1:2, -3:], mask[1:2, -3:], max_new_tokens=3)
    long = _sample(model, tokenizer, ids, mask, max_new_tokens=7, seed=1)
    both = Rollout.concat([short, long], pad_token_id=tokenizer.pad_token_id)
    assert both.full_ids().shape == (5, ids.shape[1] + 7)
    recomputed = sequence_logprobs(model, both)
    assert (recomputed - both.logprobs).abs().max() < 1e-5
    assert both.texts(tokenizer)[1:] == long.texts(tokenizer)


def test_sampling_stops_at_any_end_token_of_the_generation_config(tokenizer, prompts):
    """A chat model ending turns with a second token (`<|im_end|>`-like) listed in its generation config."""
    turn_end = tokenizer.convert_tokens_to_ids("e")  # stands in for an end-of-turn token
    m = build_tiny_llama(len(tokenizer), tie_word_embeddings=False).eval()
    with torch.no_grad():
        m.lm_head.weight[turn_end] *= 0
        bias = torch.zeros(len(tokenizer))
        bias[turn_end] = 5.0  # the end-of-turn token is likely, the tokenizer's EOS is not
        m.lm_head.bias = torch.nn.Parameter(bias)
    m.generation_config.eos_token_id = [tokenizer.eos_token_id, turn_end]
    stops = stop_token_ids(tokenizer, m)
    assert stops == [tokenizer.eos_token_id, turn_end]
    rollout = sample(m, *prompts, max_new_tokens=30, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
                     generator=torch.Generator().manual_seed(0))
    assert rollout.ends_with_eos.all() and rollout.response_ids.shape[1] < 30
    index = score_index(rollout.response_ids, rollout.response_mask)
    for i in range(rollout.batch_size):
        ids = rollout.response_ids[i]
        first = int((ids == turn_end).nonzero()[0])
        assert index[i] == first == int(rollout.lengths[i]) - 1  # reward and KL end at the first end token
        assert (ids[first + 1 :] == tokenizer.pad_token_id).all()
    # the tokenizer's EOS alone would not have stopped these rows
    alone = sample(m, *prompts, max_new_tokens=30, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(0))
    assert not alone.ends_with_eos.all()


def test_stop_token_ids_of_a_model_without_a_list():
    tok = build_tiny_tokenizer()
    assert stop_token_ids(tok) == [tok.eos_token_id]
    m = build_tiny_llama(len(tok))
    m.generation_config.eos_token_id = tok.eos_token_id
    assert stop_token_ids(tok, m) == [tok.eos_token_id]
