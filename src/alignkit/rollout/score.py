"""Scorers: anything that gives a reward to (prompt, response) pairs, used by PPO, best-of-N, labeling, eval.

    scorer(prompts, responses) -> rewards        Shapes: B strings each -> B float32 tensor

Implementations: `RewardModelScorer` (a saved reward model, optionally summing segment rewards,
Eq. 10.67-10.68), `alignkit.models.ensemble.EnsembleScorer` (Eq. 10.72) and `GoldScorer` (a world's
gold scorer on the text prompt + response). `load_scorer(spec)` builds any of them from a string:

    gold:sentiment          the gold scorer of a built world
    runs/reward/final       a reward model directory, or an ensemble directory (with ensemble.json)

Every scorer runs batched under `torch.inference_mode()` and keeps the model in eval mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from alignkit.data.tokenize import encode_example, special_prefix, truncate_example
from alignkit.errors import AlignkitError
from alignkit.ops.packed_linear import frozen


@runtime_checkable
class Scorer(Protocol):
    """Rewards of B (prompt, response) pairs: `scorer(prompts, responses)` -> B float32 tensor."""

    def __call__(self, prompts: list[Any], responses: list[Any]) -> torch.Tensor: ...


def encode_scored(tokenizer: Any, prompt: Any, response: Any, max_length: int = 0,
                  prefix: list[int] | None = None) -> list[int]:
    """ids of [x, y, EOS] for scoring: prompt and response tokenized apart (strict prefix), one BOS.

    A string response to a conversation prompt (message list) becomes one assistant turn. Longer than
    `max_length` (> 0): the oldest prompt tokens are cut, keeping the BOS. `prefix`: the tokenizer's
    `special_prefix`, when the caller encodes many pairs (working it out takes two tokenizer calls).
    """
    if isinstance(prompt, list) and isinstance(response, str):
        response = [{"role": "assistant", "content": response}]
    prefix = special_prefix(tokenizer) if prefix is None else prefix
    example = encode_example(tokenizer, {"prompt": prompt, "completion": response}, prefix=prefix)
    if max_length > 0:
        fitted, _ = truncate_example(example, max_length=max_length, policy="left", keep_prefix=len(prefix))
        example = fitted or {"input_ids": example["input_ids"][-max_length:]}
    return example["input_ids"]


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and 0/1 mask (from the lengths). Shapes: B×T each."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def _check_batch(prompts: list[Any], responses: list[Any]) -> None:
    if isinstance(prompts, str) or isinstance(responses, str):
        raise TypeError("a scorer takes lists of prompts and responses, not single strings")
    if len(prompts) != len(responses):
        raise AlignkitError(f"{len(prompts)} prompts but {len(responses)} responses to score")


class RewardModelScorer:
    """A reward model as a scorer; with `segments` the sum of in-context segment rewards (Eq. 10.68).

    Args:
        model, tokenizer: A reward model and its tokenizer (see `load_reward_model`).
        batch_size: Sequences per forward pass.
        max_length: Longest sequence (0: no limit); longer ones lose the oldest prompt tokens.
        segments: `none`, `sentences` or `chunks:N` (see `alignkit.models.segments`).
    """

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 32, max_length: int = 0,
                 segments: str = "none"):
        from alignkit.models.segments import parse_segmentation

        parse_segmentation(segments)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_length, self.segments = batch_size, max_length, segments

    @classmethod
    def from_path(cls, path: str | Path, **kwargs: Any) -> RewardModelScorer:
        """Load a saved reward model directory (segments: as trained, `reward_segments` in config.json)."""
        from alignkit.models.reward_model import CONFIG_SEGMENTS, hf_model, load_reward_model

        model, tokenizer = load_reward_model(str(path))
        frozen(model)  # a scorer only runs inference: packed linear layers
        kwargs.setdefault("segments", getattr(hf_model(model).config, CONFIG_SEGMENTS, None) or "none")
        return cls(model, tokenizer, **kwargs)

    def __call__(self, prompts: list[Any], responses: list[Any]) -> torch.Tensor:
        _check_batch(prompts, responses)
        if self.segments != "none":
            return self._segment_sums(prompts, responses)
        from alignkit.data.collate import to_device
        from alignkit.models.reward_model import packed_scores, reward_scores

        prefix = special_prefix(self.tokenizer)  # once per call, not per pair: ~1.4 ms of a bench GRPO step
        rows = [encode_scored(self.tokenizer, p, r, self.max_length, prefix)
                for p, r in zip(prompts, responses, strict=True)]
        device = next(self.model.parameters()).device
        out = []
        with torch.inference_mode():
            for i in range(0, len(rows), self.batch_size):
                ids, mask = right_pad(rows[i : i + self.batch_size], self.tokenizer.pad_token_id)
                packed = self._packed(rows[i : i + self.batch_size], prompts[i : i + self.batch_size])
                if packed is not None:  # responses to one prompt packed into one row (k samples per prompt)
                    batch = to_device({"input_ids": ids, "attention_mask": mask, **packed}, device)
                    out.append(packed_scores(self.model, batch, apply_bias=True).cpu())
                else:
                    out.append(reward_scores(self.model, ids.to(device), mask.to(device), apply_bias=True).cpu())
        return torch.cat(out) if out else torch.empty(0)

    def _packed(self, rows: list[list[int]], prompts: list[Any]) -> dict | None:
        """`packed_groups` of rows grouped by equal prompt, or None (nothing repeated, model or FLOPs)."""
        from alignkit.models.reward_model import hf_model, supports_packing
        from alignkit.ops.prefix import shared_prefix_layout
        from alignkit.trainers.reward_data import packed_groups

        groups: dict[str, list[int]] = {}
        for i, prompt in enumerate(prompts):
            groups.setdefault(repr(prompt), []).append(i)
        if len(groups) == len(rows) or not supports_packing(self.model):
            return None
        pad = self.tokenizer.pad_token_id
        return packed_groups(shared_prefix_layout(rows, list(groups.values()), pad), pad, hf_model(self.model).config)

    def _segment_sums(self, prompts: list[Any], responses: list[str]) -> torch.Tensor:
        """sum_k r(x, y, y_k): the head read at the end of each segment in one pass (Eq. 10.67-10.68)."""
        from alignkit.models.reward_model import CONFIG_BIAS, CONFIG_BIAS_FOLDED, hf_model, score_head
        from alignkit.models.segments import segment_ids, segment_sequence

        hf = hf_model(self.model)
        bias = 0.0 if getattr(hf.config, CONFIG_BIAS_FOLDED, True) else float(getattr(hf.config, CONFIG_BIAS, 0.0))
        backbone, head = getattr(hf, hf.base_model_prefix), score_head(self.model)
        seqs = [segment_sequence(self.tokenizer, p, segment_ids(self.tokenizer, r, self.segments))
                for p, r in zip(prompts, responses, strict=True)]
        out = []
        with torch.inference_mode():
            for i in range(0, len(seqs), self.batch_size):
                chunk = seqs[i : i + self.batch_size]
                ids, mask = right_pad([ids for ids, _ in chunk], self.tokenizer.pad_token_id)
                positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
                hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
                per_token = head(hidden)[..., 0].float()  # B×T: r read at every position
                out += [per_token[b, ends].sum() + bias * len(ends) for b, (_, ends) in enumerate(chunk)]
        return torch.stack(out) if out else torch.empty(0)


class GoldScorer:
    """A world's gold scorer as a scorer: gold(prompt + separator + response), e.g. P(positive) in [0, 1].

    With `memo`, scores are remembered by text, so a text scored twice (labels, then evaluation) costs once.
    """

    def __init__(self, gold_fn: Any, separator: str = "", memo: bool = False):
        self.gold_fn, self.separator = gold_fn, separator
        self.memo: dict[str, float] | None = {} if memo else None

    def __call__(self, prompts: list[Any], responses: list[Any]) -> torch.Tensor:
        _check_batch(prompts, responses)
        if not prompts:
            return torch.empty(0)
        texts = [f"{p}{self.separator}{r}" for p, r in zip(prompts, responses, strict=True)]
        known = self.memo if self.memo is not None else {}
        todo = list(dict.fromkeys(t for t in texts if t not in known))
        if todo:
            with torch.inference_mode():
                scores = torch.as_tensor(self.gold_fn(todo), dtype=torch.float32).reshape(-1)
            known.update(zip(todo, scores.tolist(), strict=True))
        out = torch.tensor([known[t] for t in texts], dtype=torch.float32)
        if self.memo is None:
            known.clear()
        return out


def load_scorer(spec: str | Path, **kwargs: Any) -> Scorer:
    """A scorer from `gold:<world>`, a reward model directory or an ensemble directory.

    Keyword arguments go to `RewardModelScorer` / `EnsembleScorer` (e.g. `batch_size`, `segments`).

    Raises:
        AlignkitError: Unknown world, or a path that is neither a reward model nor an ensemble.
    """
    spec = str(spec)
    if spec.startswith("gold:"):
        from alignkit.worlds.base import get_world

        return GoldScorer(get_world(spec.split(":", 1)[1]).gold_scorer())
    path = Path(spec).expanduser()
    if (path / "ensemble.json").is_file():
        from alignkit.models.ensemble import EnsembleScorer

        return EnsembleScorer.from_path(path, **kwargs)
    if (path / "config.json").is_file():
        return RewardModelScorer.from_path(path, **kwargs)
    raise AlignkitError(f"scorer {spec!r}: expected `gold:<world>`, a reward model directory (with config.json) "
                        "or an ensemble directory (with ensemble.json)")
