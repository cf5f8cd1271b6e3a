"""The SFT loss: masked positions get no gradient; one pass over a conversation = sum of per-turn losses;
exact gradient accumulation with real SFT batches through TrainLoop."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import build_tiny_llama, build_tiny_tokenizer

from alignkit.config import resolve_config
from alignkit.data.collate import collate_padded
from alignkit.data.tokenize import encode_example, encode_prompt, encode_text
from alignkit.losses.sft import IGNORE_INDEX, causal_lm_loss_sum
from alignkit.trainers.loop import TrainLoop
from alignkit.trainers.sft import SFTConfig, sft_loss

CONVERSATION = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "how are you?"},
    {"role": "assistant", "content": "I am fine, thank you."},
    {"role": "user", "content": "The movie?"},
    {"role": "assistant", "content": "It was wonderful and the actors were great!"},
    {"role": "user", "content": "The ending?"},
    {"role": "assistant", "content": "It felt rushed."},
]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def test_masked_positions_get_zero_gradient(tok):
    ex = encode_example(tok, {"messages": CONVERSATION})
    batch = collate_padded([ex, encode_example(tok, {"prompt": "The quick", "completion": " brown fox."})],
                           tok.pad_token_id)
    logits = torch.randn(*batch["input_ids"].shape, 300, requires_grad=True)
    loss, metrics = causal_lm_loss_sum(logits, batch["labels"])
    loss.backward()
    predicts_trained = torch.zeros_like(batch["labels"], dtype=torch.bool)
    predicts_trained[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX  # position t predicts token t+1
    per_position = logits.grad.abs().sum(-1)  # B x T
    assert (per_position[~predicts_trained] == 0).all()
    assert (per_position[predicts_trained] > 0).all()
    assert int(metrics["n_terms"]) == batch["n_terms"]


def test_one_pass_conversation_loss_equals_sum_of_per_turn_losses(tok):
    """Eq. 10.6 (one forward pass, user/system tokens masked) == Eq. 10.5 (K separate conditionals)."""
    model = build_tiny_llama(len(tok), seed=0).eval()
    ex = encode_example(tok, {"messages": CONVERSATION})
    with torch.no_grad():
        one_pass, _ = causal_lm_loss_sum(model(torch.tensor([ex["input_ids"]])).logits, torch.tensor([ex["labels"]]))
        per_turn = []
        for k, message in enumerate(CONVERSATION):
            if message["role"] != "assistant":
                continue
            history = encode_prompt(tok, CONVERSATION[:k])  # x^1, y^1, ..., x^k
            response = encode_text(tok, message["content"]) + [tok.eos_token_id]  # y^k and its EOS
            ids = torch.tensor([history + response])
            labels = torch.tensor([[IGNORE_INDEX] * len(history) + response])
            loss_k, _ = causal_lm_loss_sum(model(ids).logits, labels)  # -log Pr(y^k | x^1, ..., x^k)
            per_turn.append(loss_k)
    assert len(per_turn) == 3
    assert one_pass.item() == pytest.approx(sum(per_turn).item(), abs=1e-5)


def _records() -> list[dict]:
    texts = ["The quick brown fox jumps over the lazy dog.", "Terrible film.", "I loved this movie, it was great!",
             "The plot was fine but the ending felt rushed.", "What a story.", "Fine.",
             "User: how are you? Assistant: I am fine, thank you.", "I hated every minute of it."]
    return [{"prompt": t[:4], "completion": t[4:]} for t in texts]


def _one_step(tmp_path, examples, micro: int, accum: int, pad_id: int, vocab: int):
    cfg = resolve_config(SFTConfig, None, [
        "--output-dir", str(tmp_path / f"r{micro}x{accum}"), "--optim.per_device_batch_size", str(micro),
        "--optim.grad_accum_steps", str(accum), "--optim.max_steps", "1", "--optim.max_grad_norm", "0",
        "--run.report_to", "[]", "--run.progress", "false"])
    model = build_tiny_llama(vocab, seed=0)
    loop = TrainLoop("test", cfg, model)
    loop.resume()
    grads = {}

    def capture(*args, **kwargs):
        grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters()})

    loop.optimizer.optimizer.step = capture
    micro_batches = [collate_padded(examples[a * micro:(a + 1) * micro], pad_id) for a in range(accum)]
    metrics = loop.update(micro_batches, sft_loss)
    loop.close()
    return metrics["loss/total"], grads


def test_accumulation_1x8_equals_8x1_with_unequal_lengths(tmp_path, tok):
    examples = [encode_example(tok, r) for r in _records()]
    assert len({len(ex["input_ids"]) for ex in examples}) > 4  # unequal lengths
    loss_a, grads_a = _one_step(tmp_path, examples, 8, 1, tok.pad_token_id, len(tok))
    loss_b, grads_b = _one_step(tmp_path, examples, 1, 8, tok.pad_token_id, len(tok))
    assert loss_b == pytest.approx(loss_a, abs=1e-6)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, atol=1e-6, rtol=0, msg=name)
