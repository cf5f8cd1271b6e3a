"""`last_token_scores`: the last layer at the read token only gives the full forward's rewards and gradients."""

from __future__ import annotations

import pytest
import torch
from tests.unit.accel.conftest import classifier

from alignkit.accel.cpu import CpuBackend
from alignkit.accel.cpu.last_token import last_token_scores, supports_last_token
from alignkit.models.reward_model import last_token_index

KINDS = ("llama", "qwen2", "mistral")  # llama: grouped-query attention, attention and MLP biases
VOCAB = 50


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
@pytest.mark.parametrize("kind", KINDS)
def test_last_token_scores_and_gradients_equal_the_full_forward(kind, left):
    model = classifier(kind, VOCAB)
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
    # the CPU backend's scores take this path; the forward afterwards is unaffected (the hook is gone)
    torch.testing.assert_close(CpuBackend().group_scores(model, ids, mask, None), full.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_full_scores(model, ids, mask), full)


def test_other_models_take_the_full_forward():
    assert not supports_last_token(classifier("gpt2", VOCAB))
    assert not supports_last_token(classifier("qwen3", VOCAB))
    assert not supports_last_token(classifier("mistral", VOCAB, sliding_window=4))
    assert not supports_last_token(torch.nn.parallel.DistributedDataParallel.__new__(
        torch.nn.parallel.DistributedDataParallel))


def test_peft_wrapped_classifier_uses_its_adapters():
    from peft import LoraConfig, get_peft_model

    model = classifier("llama", VOCAB)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                  task_type="SEQ_CLS", init_lora_weights=False))
    assert supports_last_token(peft_model)
    ids, mask = _batch(False)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    fast = last_token_scores(peft_model, ids, mask, positions, last_token_index(mask))
    torch.testing.assert_close(fast, _full_scores(peft_model, ids, mask), atol=1e-5, rtol=1e-5)


def test_a_forward_wrapped_by_accelerate_takes_the_full_forward():
    model = classifier("llama", VOCAB)
    ids, mask = _batch(True)
    expected = _full_scores(model, ids, mask)
    model._original_forward = model.forward  # what accelerate's mixed-precision wrapper leaves
    assert not supports_last_token(model)
    torch.testing.assert_close(CpuBackend().group_scores(model, ids, mask, None), expected, atol=1e-5, rtol=1e-5)
