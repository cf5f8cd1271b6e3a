"""The `cpu` backend: alignkit's CPU machinery behind the `Backend` interface, `plain` where it does not apply.

What it adds, and for which models (docs/performance.md has what each buys):
- sampling: `FastDecoder`, a lean decoder run by TorchScript's interpreter (Llama, Mistral, Qwen2
  causal LMs on the CPU, plain `nn.Linear` projections; `decoder.py`, `decode_layers.py`);
- frozen models (reference, scorers, evaluated checkpoints): linear layers multiplied by oneDNN
  with weights reordered once (float32 on the CPU; `onednn.py`);
- rows that repeat a prompt (k samples per prompt, preference and reward groups): one shared row
  per prompt under a 4D mask when the FLOP estimate pays (Llama-family models, sdpa or eager
  attention; `shared_prompts.py`);
- reward scores: the last decoder layer run at the read token only (Llama, Mistral, Qwen2
  classifiers outside DDP/FSDP; `last_token.py`);
- glibc keeps freed memory between steps (`allocator.py`).

Each falls back to the `plain` backend's path when its model or device is not covered, so the
results are those of `plain` to float rounding (tests/unit/accel). Three switches, read from the
environment once when the backend is made and shown in the run plan: `ALIGNKIT_TORCHSCRIPT=0`,
`ALIGNKIT_ONEDNN=0`, `ALIGNKIT_MALLOC_KEEP=0`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from alignkit.accel.cpu.allocator import keep_freed_memory
from alignkit.accel.cpu.decoder import FastDecoder
from alignkit.accel.cpu.last_token import last_token_scores, supports_last_token
from alignkit.accel.cpu.onednn import reorder_frozen_linears
from alignkit.accel.cpu.shared_prompts import (
    accepts_4d_masks,
    distinct_rows,
    mask_for_attention,
    shared_prefix_layout,
    shared_prompt_layout,
    shared_prompt_logits,
    shared_prompt_rows,
    sharing_pays,
)
from alignkit.accel.plain import PlainBackend
from alignkit.models.reward_model import hf_model, last_token_index, refuse_inner_pads
from alignkit.ops.masking import mask_positions


def _enabled(variable: str) -> bool:
    return os.environ.get(variable, "1") != "0"


def _config(model: Any) -> Any:
    """The Hugging Face config behind a policy, a DDP wrapper or a DPO `Reference` (None if none)."""
    return getattr(getattr(model, "module", model), "config", None)


def _rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """The token ids of right-padded rows, as lists."""
    lengths = attention_mask.sum(dim=1).tolist()
    return [row[:n] for row, n in zip(input_ids.tolist(), lengths, strict=True)]


def _groups(group_index: torch.Tensor) -> list[list[int]]:
    return [[i for i in row if i >= 0] for row in group_index.tolist()]


@dataclass(frozen=True)
class CpuBackend:
    """The CPU machinery (see the module docstring); each switch on by default."""

    torchscript: bool = True
    """Run the decoder's steps through TorchScript's interpreter (else the same function as Python)."""
    onednn: bool = True
    """Reorder the weights of frozen models and of the decoder for oneDNN (float32 on the CPU)."""
    malloc_keep: bool = True
    """Keep freed memory in the heap between training steps (glibc)."""

    name = "cpu"

    @classmethod
    def from_environment(cls) -> CpuBackend:
        return cls(torchscript=_enabled("ALIGNKIT_TORCHSCRIPT"), onednn=_enabled("ALIGNKIT_ONEDNN"),
                   malloc_keep=_enabled("ALIGNKIT_MALLOC_KEEP"))

    @property
    def plain(self) -> PlainBackend:
        return PlainBackend()

    def describe(self) -> str:
        switches = (("TorchScript decode", self.torchscript), ("oneDNN weights", self.onednn),
                    ("glibc keeps freed memory", self.malloc_keep))
        off = [name for name, on in switches if not on]
        parts = ["lean decoder", "prompt-shared rows", "one-token reward read"] + [n for n, on in switches if on]
        return f"cpu ({', '.join(parts)})" + (f"; off: {', '.join(off)}" if off else "")

    def prepare_process(self) -> None:
        if self.malloc_keep:
            keep_freed_memory()

    def freeze(self, model: torch.nn.Module) -> torch.nn.Module:
        model.eval().requires_grad_(False)
        if self.onednn:
            reorder_frozen_linears(model)
        return model

    def decoder(self, model: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, key_mask: torch.Tensor,
                width: int) -> tuple[Any, Any]:
        decoder = FastDecoder.build(model, prompt_ids.shape[0], width, reorder=self.onednn, script=self.torchscript)
        if decoder is None:
            return self.plain.decoder(model, prompt_ids, prompt_mask, key_mask, width)
        # A live row attends to its real prompt tokens and to every response column so far; the columns
        # after a row's end hold its own pad tokens, which only that row reads, and its outputs are
        # discarded. So the prompts' padding is the whole mask: built once, as the additive bias the
        # attention would make of a bool mask at every layer; None when no prompt is padded.
        bias = None
        if not bool(prompt_mask.all()):
            bias = torch.zeros(key_mask.shape, dtype=decoder.dtype, device=key_mask.device)  # B×W
            bias[:, : prompt_mask.shape[1]].masked_fill_(~prompt_mask, float("-inf"))

        def prefill(positions: torch.Tensor) -> torch.Tensor:
            return decoder.prefill(prompt_ids, positions, prompt_mask)

        def step(tokens: torch.Tensor, positions: torch.Tensor, column: int) -> torch.Tensor:
            return decoder.step(tokens, positions, bias, column)

        return prefill, step

    def rollout_logits(self, model: Any, rollout: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows that repeat a prompt share one row per prompt when that pays; else `plain`'s pass."""
        config = getattr(model, "config", None)  # not through DDP: its wrapper has no `dtype` either
        if accepts_4d_masks(config):
            _, _, inverse = distinct_rows(rollout.prompt_ids, rollout.prompt_mask)
            counts = torch.bincount(inverse)
            width_p, width_r = rollout.prompt_length, rollout.response_ids.shape[1]
            if len(counts) < rollout.batch_size and sharing_pays(config, rollout.batch_size, len(counts), width_p,
                                                                  width_r, int(counts.max())):
                pad = getattr(config, "pad_token_id", None)
                layout = shared_prompt_layout(rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids,
                                              rollout.response_mask, 0 if pad is None else pad)
                logits = shared_prompt_logits(model, layout, config, model.dtype)
                return logits, layout["group"], layout["take"]
        return self.plain.rollout_logits(model, rollout)

    def group_logits(self, model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Each group's responses after its prompt in one shared row when that pays; else `plain`'s pass."""
        config = _config(model)
        index = batch.get("group_index")
        if accepts_4d_masks(config) and index is not None and index.shape[1] > 1:
            pad = getattr(config, "pad_token_id", None) or 0
            labels = _rows(batch["labels"], batch["attention_mask"])
            shared = shared_prefix_layout(_rows(batch["input_ids"], batch["attention_mask"]), _groups(index), pad,
                                          labels=labels)
            rows = shared_prompt_rows(shared, pad, config)
            if rows is not None:
                dtype = getattr(model, "module", model).dtype
                layout = {key: rows[key].to(batch["input_ids"].device)
                          for key in ("input_ids", "attention_mask", "position_ids", "keep")}
                logits = shared_prompt_logits(model, layout, config, dtype)
                labels = shared["suffix_labels"].to(logits.device)
                return logits[rows["group"].to(logits.device), rows["take"].to(logits.device)], labels
        return self.plain.group_logits(model, batch)

    def group_scores(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     group_index: torch.Tensor | None) -> torch.Tensor:
        """Groups by prompt in shared rows (one row each) when that pays, the last layer at the read token only."""
        if not supports_last_token(model):
            return self.plain.group_scores(model, input_ids, attention_mask, group_index)
        config = hf_model(model).config
        mask = attention_mask.long()
        refuse_inner_pads(input_ids, mask, config.pad_token_id)
        if group_index is not None and group_index.shape[1] > 1 and accepts_4d_masks(config):
            pad = config.pad_token_id if config.pad_token_id is not None else 0
            shared = shared_prefix_layout(_rows(input_ids, mask), _groups(group_index), pad)
            rows = shared_prompt_rows(shared, pad, config)
            if rows is not None:
                rows = {k: v.to(input_ids.device) for k, v in rows.items()}
                ends = shared["suffix_mask"].sum(dim=1).to(input_ids.device) - 1  # N: each item's last token
                read_col = rows["columns"].gather(1, ends[:, None]).squeeze(1)
                bool_mask = rows["attention_mask"]
                return last_token_scores(model, rows["input_ids"], mask_for_attention(bool_mask, config, model.dtype),
                                         rows["position_ids"], read_col, rows=rows["group"][:, 0],
                                         keys_mask=bool_mask).float()
        return last_token_scores(model, input_ids, mask, mask_positions(mask), last_token_index(mask)).float()
