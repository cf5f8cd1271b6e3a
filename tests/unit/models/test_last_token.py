"""`last_token_scores`: the last layer at the read token only gives the full forward's rewards and gradients."""

from __future__ import annotations

import pytest
import torch

from alignkit.models.last_token import last_token_scores, supports_last_token
from alignkit.models.reward_model import last_token_index, reward_scores

COMMON = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, vocab_size=50,
              max_position_embeddings=128, pad_token_id=0, num_labels=1)


def _classifier(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama-gqa-bias":
        from transformers import LlamaConfig, LlamaForSequenceClassification

        return LlamaForSequenceClassification(LlamaConfig(**COMMON, num_key_value_heads=2, attention_bias=True,
                                                          mlp_bias=True))
    if kind == "qwen2":
        from transformers import Qwen2Config, Qwen2ForSequenceClassification

        return Qwen2ForSequenceClassification(Qwen2Config(**COMMON, num_key_value_heads=2))
    if kind == "mistral":
        from transformers import MistralConfig, MistralForSequenceClassification

        return MistralForSequenceClassification(MistralConfig(**COMMON, num_key_value_heads=4, sliding_window=None))
    raise ValueError(kind)


def _batch(left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    lengths = [9, 5, 12, 1]
    ids = torch.zeros(len(lengths), 12, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        cols = slice(12 - n, 12) if left else slice(0, n)
        ids[b, cols], mask[b, cols] = torch.randint(3, 50, (n,)), 1
    return ids, mask


def _full_scores(model, ids, mask):
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, 0]


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
@pytest.mark.parametrize("kind", ["llama-gqa-bias", "qwen2", "mistral"])
def test_last_token_scores_and_gradients_equal_the_full_forward(kind, left):
    model = _classifier(kind)
    model.score.weight.data.normal_()  # a random head, not near zero
    assert supports_last_token(model)
    ids, mask = _batch(left)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    fast = last_token_scores(model, ids, mask, positions, last_token_index(mask))
    fast_grads = torch.autograd.grad(fast.square().sum(), list(model.parameters()), allow_unused=True)
    full = _full_scores(model, ids, mask)
    full_grads = torch.autograd.grad(full.square().sum(), list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    for (name, _), g_fast, g_full in zip(model.named_parameters(), fast_grads, full_grads, strict=True):
        if g_full is None:
            assert g_fast is None or g_fast.abs().max() == 0, name
        else:
            torch.testing.assert_close(g_fast, g_full, atol=1e-5, rtol=1e-4, msg=name)
    # reward_scores takes this path and the forward afterwards is unaffected (the hook is gone)
    torch.testing.assert_close(reward_scores(model, ids, mask), full.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_full_scores(model, ids, mask), full)


def test_other_models_take_the_full_forward():
    from transformers import (
        GPT2Config,
        GPT2ForSequenceClassification,
        MistralConfig,
        MistralForSequenceClassification,
    )

    gpt2 = GPT2ForSequenceClassification(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, num_labels=1))
    assert not supports_last_token(gpt2)
    windowed = MistralForSequenceClassification(MistralConfig(**COMMON, num_key_value_heads=4, sliding_window=4))
    assert not supports_last_token(windowed)
    assert not supports_last_token(torch.nn.parallel.DistributedDataParallel.__new__(
        torch.nn.parallel.DistributedDataParallel))


def test_peft_wrapped_classifier_uses_its_adapters():
    from peft import LoraConfig, get_peft_model

    model = _classifier("llama-gqa-bias")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                  task_type="SEQ_CLS", init_lora_weights=False))
    assert supports_last_token(peft_model)
    ids, mask = _batch(False)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    fast = last_token_scores(peft_model, ids, mask, positions, last_token_index(mask))
    torch.testing.assert_close(fast, _full_scores(peft_model, ids, mask), atol=1e-5, rtol=1e-5)


def test_reward_scores_takes_the_one_token_path_unless_accelerate_wraps_the_forward(monkeypatch):
    import alignkit.models.reward_model as reward_model

    taken = []  # whether each reward_scores call got its scores from the one-token path

    def spy(*args):
        scores = last_token_scores(*args)
        taken.append(scores is not None)
        return scores

    monkeypatch.setattr(reward_model, "last_token_scores", spy)
    model = _classifier("llama-gqa-bias")
    ids, mask = _batch(True)
    reward_scores(model, ids, mask)
    assert taken == [True]
    model._original_forward = model.forward  # what accelerate's mixed-precision wrapper leaves
    assert not supports_last_token(model)
    reward_scores(model, ids, mask)
    assert taken == [True, False]
