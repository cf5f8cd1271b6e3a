"""Collators: right padding, packing (same loss as unpacked on a real tiny Llama), left padding for generation."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import build_tiny_llama, build_tiny_tokenizer

from alignkit.data.collate import block_causal_mask, collate_packed, collate_padded, left_pad, pack_rows
from alignkit.data.tokenize import encode_example, encode_prompt
from alignkit.losses.sft import IGNORE_INDEX, causal_lm_loss_sum

RECORDS = [
    {"prompt": "The quick", "completion": " brown fox jumps over the lazy dog."},
    {"prompt": "I loved this movie,", "completion": " it was wonderful!"},
    {"messages": [{"role": "user", "content": "how are you?"}, {"role": "assistant", "content": "Fine."},
                  {"role": "user", "content": "The film?"}, {"role": "assistant", "content": "Terrible."}]},
    {"prompt": "Terrible", "completion": " film."},
    {"prompt": [{"role": "user", "content": "The plot?"}],
     "completion": [{"role": "assistant", "content": "It was fine but the ending felt rushed."}]},
]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def examples(tok):
    return [encode_example(tok, r) for r in RECORDS]


def test_padded_batch_shapes_masks_and_terms(tok, examples):
    batch = collate_padded(examples, tok.pad_token_id)
    width = max(len(ex["input_ids"]) for ex in examples)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (5, width)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == ex["input_ids"]
        assert batch["labels"][i, :n].tolist() == ex["labels"]
        assert batch["attention_mask"][i].sum() == n
    assert batch["n_terms"] == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def test_pack_rows_respects_capacity_and_keeps_every_example():
    lengths = [5, 9, 3, 7, 2, 8, 1, 12]
    rows = pack_rows(lengths, capacity=10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 or len(row) == 1 for row in rows)
    assert len(rows) < len(lengths)


def test_block_causal_mask_equals_plain_loop():
    segments = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 1, 1, 1, 2, 2]])
    mask = block_causal_mask(segments)
    assert mask.shape == (2, 1, 6, 6)
    for b in range(2):
        for q in range(6):
            for k in range(6):
                allowed = segments[b, q] == segments[b, k] and k <= q
                assert (mask[b, 0, q, k] == 0) == allowed


def test_packed_labels_do_not_cross_examples(tok, examples):
    batch = collate_packed(examples, tok.pad_token_id, capacity=128)
    assert batch["input_ids"].size(0) < len(examples)
    starts = batch["position_ids"] == 0
    assert (batch["labels"][starts] == IGNORE_INDEX).all()  # no example predicts the next one's first token
    assert batch["n_terms"] == int((batch["labels"] != IGNORE_INDEX).sum())
    assert batch["n_terms"] == collate_padded(examples, tok.pad_token_id)["n_terms"]


def _logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 position_ids=batch.get("position_ids")).logits


def _trained_logprobs(logits, labels):
    """Log-probabilities of the trained next tokens, in order (float64)."""
    logp = logits[:, :-1].double().log_softmax(-1)
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX
    return logp.gather(-1, target.clamp(min=0)[..., None])[..., 0][keep]


def test_packed_loss_equals_unpacked_loss(tok, examples):
    model = build_tiny_llama(len(tok), seed=0).eval()
    padded = collate_padded(examples, tok.pad_token_id)
    packed = collate_packed(examples, tok.pad_token_id, capacity=128)
    assert packed["input_ids"].size(0) < padded["input_ids"].size(0)  # really packed
    assert padded["n_terms"] == packed["n_terms"]
    with torch.no_grad():
        loss_padded, _ = causal_lm_loss_sum(_logits(model, padded), padded["labels"])
        loss_packed, _ = causal_lm_loss_sum(_logits(model, packed), packed["labels"])
    n = padded["n_terms"]
    assert (loss_packed / n).item() == pytest.approx((loss_padded / n).item(), abs=1e-5)
    # exact in float64: every trained token gets the same log-probability (the order of examples differs)
    model = model.double()
    packed64 = collate_packed(examples, tok.pad_token_id, capacity=128, dtype=torch.float64)
    with torch.no_grad():
        a = _trained_logprobs(_logits(model, padded), padded["labels"])
        b = _trained_logprobs(_logits(model, packed64), packed64["labels"])
    torch.testing.assert_close(b.sort().values, a.sort().values, rtol=0, atol=1e-10)


def test_left_pad_positions_and_generation_matches_unpadded(tok):
    prompts = [encode_prompt(tok, "The quick"), encode_prompt(tok, [{"role": "user", "content": "how are you?"}])]
    batch = left_pad(prompts, tok.pad_token_id)
    for i, ids in enumerate(prompts):
        n = len(ids)
        assert batch["input_ids"][i, -n:].tolist() == ids and batch["attention_mask"][i].sum() == n
        assert batch["position_ids"][i, -n:].tolist() == list(range(n))
    model = build_tiny_llama(len(tok), seed=1).eval()
    kwargs = dict(do_sample=False, max_new_tokens=6, pad_token_id=tok.pad_token_id, eos_token_id=None)
    with torch.no_grad():
        together = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
        for i, ids in enumerate(prompts):
            alone = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                   **kwargs)
            assert together[i, -6:].tolist() == alone[0, -6:].tolist()
