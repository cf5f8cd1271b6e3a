"""The LoRA reference (adapters disabled = the base weights, no copy) and the value model's optimizer group."""

from __future__ import annotations

import torch
from tests.conftest import build_tiny_llama

from alignkit.models.value_head import AdapterDisabledReference, ValueModel


def test_adapter_disabled_reference_is_the_base_model():
    from peft import LoraConfig, get_peft_model

    base = build_tiny_llama(300)
    ids = torch.tensor([[1, 40, 50, 60, 70]])
    with torch.no_grad():
        expected = base(ids).logits.clone()
    policy = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_()  # trained adapters: the policy now differs from the base
        ref = AdapterDisabledReference(policy)
        torch.testing.assert_close(ref(input_ids=ids).logits, expected)
        assert not torch.allclose(policy(input_ids=ids).logits, expected, atol=1e-3)
        torch.testing.assert_close(ref(input_ids=ids).logits, expected)  # adapters back on after the call
    assert ref.config is policy.config


def test_actor_critic_gives_the_value_model_its_own_learning_rate():
    from alignkit.trainers.rl_setup import ActorCritic

    lm = build_tiny_llama(300)
    value = ValueModel(build_tiny_llama(300).model, torch.nn.Linear(32, 1))
    groups = ActorCritic(lm, value, value_lr=1e-3).optimizer_groups(1e-5)
    assert "lr" not in groups[0] and groups[1]["lr"] == 1e-3
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(
        p.numel() for p in ActorCritic(lm, value).parameters())
    assert len(ActorCritic(lm, None).optimizer_groups(1e-5)) == 1
