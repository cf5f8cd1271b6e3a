"""The `plain` backend: the Hugging Face forward with a KV cache, for any architecture and device.

Sampling runs the model's own forward one token at a time against a preallocated
`transformers.StaticCache` (one B×(P+R_max) attention mask, columns switched on as tokens are
written by the sampler). Log-probs and scores are one forward pass over the padded rows, asking
only for the logit columns that are read (`logits_to_keep`). Nothing here depends on the device,
the dtype or private internals, so it is the reference every other backend is tested against, and
the default on accelerators (CUDA, bf16).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import StaticCache

from alignkit.models.logits import labelled_logits
from alignkit.models.reward_model import reward_scores


def cache_argument(model: Any) -> str:
    """The forward's name for a KV cache: `cache` (transformers >= 5.2x), else `past_key_values`
    (the older name, which newer releases warn is deprecated)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


class PlainBackend:
    """Hugging Face forward passes, nothing else (see the module docstring)."""

    name = "plain"

    def describe(self) -> str:
        return "plain (Hugging Face forward, KV-cache decoding)"

    def prepare_process(self) -> None:
        return None

    def freeze(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.eval().requires_grad_(False)

    def decoder(self, model: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, key_mask: torch.Tensor,
                width: int) -> tuple[Any, Any]:
        cache = StaticCache(config=model.config, max_cache_len=width)
        shared = {"attention_mask": key_mask, cache_argument(model): cache, "use_cache": True}

        def prefill(positions: torch.Tensor) -> torch.Tensor:
            return model(input_ids=prompt_ids, position_ids=positions, logits_to_keep=1, **shared).logits[:, -1, :]

        def step(tokens: torch.Tensor, positions: torch.Tensor, column: int) -> torch.Tensor:
            return model(input_ids=tokens[:, None], position_ids=positions[:, None], **shared).logits[:, -1, :]

        return prefill, step

    def rollout_logits(self, model: Any, rollout: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        width_r = rollout.response_ids.shape[1]
        out = model(input_ids=rollout.full_ids(), attention_mask=rollout.full_mask().long(),
                    position_ids=rollout.position_ids(), use_cache=False, logits_to_keep=width_r + 1)
        logits = out.logits[:, -(width_r + 1) : -1, :]  # B×R×V (also when logits_to_keep is ignored)
        rows = torch.arange(rollout.batch_size, device=logits.device)[:, None].expand(-1, width_r)
        return logits, rows, torch.arange(width_r, device=logits.device)[None].expand_as(rows)

    def group_logits(self, model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return labelled_logits(model, batch["labels"], input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"])

    def group_scores(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     group_index: torch.Tensor | None) -> torch.Tensor:
        return reward_scores(model, input_ids, attention_mask)
