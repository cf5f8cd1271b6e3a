"""The value model V(s_t) of PPO/A2C and the reference policy pi_ref, built from Hugging Face models.

`ValueModel` = a transformer backbone + a scalar head applied at every position (Xiao & Zhu,
Sec. 10.3.3: the value model is usually initialised from the reward model);
`alignkit.rollout.logprobs.response_values` reads it at every response token of a rollout.

`AdapterDisabledReference` is the reference policy of a LoRA policy: the same module with its
adapters switched off, so the frozen weights are not held twice.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from alignkit.config import ModelConfig
from alignkit.errors import AlignkitError
from alignkit.models.load import load_causal_lm, load_sequence_classifier


class ValueModel(torch.nn.Module):
    """Backbone (a `*Model`, no LM head) + linear head: one scalar value per position.

    Args:
        backbone: A Hugging Face base model returning `last_hidden_state` (B×T×H).
        head: A `Linear(H, 1)`; e.g. a reward model's score head.
    """

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Linear) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> torch.Tensor:
        """Values at every position. Shapes: inputs B×T -> B×T float."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state  # B×T×H
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1)


def load_value_model(source: str, init: str, tokenizer: Any, base: ModelConfig) -> ValueModel:
    """Load a value model from a reward model (`init="reward"`) or a causal LM (`init="policy"`).

    From a reward model (a sequence classifier with one label) the backbone and its score head are
    kept, so V starts as the reward model's score of every prefix. From a causal LM the LM head is
    dropped and a zero-initialised `Linear(H, 1)` is added (V starts at 0). Dropout is switched off.

    Args:
        source: Model directory or hub id.
        init: ``reward`` or ``policy``.
        tokenizer: The policy's tokenizer (embeddings are resized to it).
        base: Model options to copy (`dtype`, `revision`, `trust_remote_code`, ...); LoRA is not used.

    Raises:
        AlignkitError: If the reward model has no linear score head with one output.
    """
    cfg = dataclasses.replace(base, name_or_path=source, tokenizer=None, lora_r=0)
    if init == "reward":
        model = load_sequence_classifier(cfg, num_labels=1, tokenizer=tokenizer)
        head = getattr(model, "score", None) or getattr(model, "classifier", None)
        if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
            raise AlignkitError(f"reward model {source}: expected a linear score head with one output to "
                                "initialise the value model from; use --value_model policy")
    else:
        model = load_causal_lm(cfg, tokenizer)
        head = torch.nn.Linear(model.config.hidden_size, 1, dtype=next(model.parameters()).dtype)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
    return ValueModel(model.base_model, head).eval()


class AdapterDisabledReference:
    """The reference policy of a peft LoRA policy: its forward runs with the adapters disabled, in eval mode.

    Not a module (its parameters are the policy's; it must not be registered twice). Call it like
    the model, under `torch.no_grad()`; the policy's training mode is restored after each call.
    """

    def __init__(self, policy: torch.nn.Module) -> None:
        if not hasattr(policy, "disable_adapter"):
            raise AlignkitError("a reference without adapters needs a peft (LoRA) policy")
        self.policy = policy

    @property
    def config(self) -> Any:
        return self.policy.config

    @property
    def dtype(self) -> torch.dtype:
        return self.policy.dtype

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        was_training = self.policy.training
        self.policy.eval()
        try:
            with self.policy.disable_adapter():
                return self.policy(*args, **kwargs)
        finally:
            self.policy.train(was_training)
