"""Scorers: anything that gives a reward to (prompt, response) pairs, used by PPO, best-of-N, labeling, eval.

    scorer(prompts, responses) -> rewards        Shapes: B strings each -> B float32 tensor

Implementations: `RewardModelScorer` (a saved reward model, optionally summing segment rewards,
Eq. 10.67-10.68), `alignkit.models.ensemble.EnsembleScorer` (Eq. 10.72) and `GoldScorer` (a world's
gold scorer on the text prompt + response). `load_scorer(spec)` builds any of them from a string:

    gold:sentiment          the gold scorer of the world passed in (`world=`, loaded at the edge)
    runs/reward/final       a reward model directory, or an ensemble directory (with ensemble.json)

Every scorer runs batched under `torch.inference_mode()` and keeps the model in eval mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from alignkit.accel import Backend, resolve
from alignkit.data.collate import right_pad, to_device
from alignkit.data.prompts import prompt_text
from alignkit.data.reward_groups import encode_scored
from alignkit.data.segments import parse_segmentation, segment_ids, segment_sequence
from alignkit.data.tokenize import special_prefix
from alignkit.errors import AlignkitError
from alignkit.models.ensemble import EnsembleScorer, read_ensemble_spec
from alignkit.models.reward_model import (
    CONFIG_BIAS,
    CONFIG_BIAS_FOLDED,
    CONFIG_SEGMENTS,
    hf_model,
    load_reward_model,
    score_head,
    with_stored_bias,
)
from alignkit.ops.masking import mask_positions


@runtime_checkable
class Scorer(Protocol):
    """Rewards of B (prompt, response) pairs: `scorer(prompts, responses)` -> B float32 tensor."""

    def __call__(self, prompts: list[Any], responses: list[Any]) -> torch.Tensor: ...


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
        segments: `none`, `sentences` or `chunks:N` (see `alignkit.data.segments`).
        backend: The acceleration backend that runs the model (default `alignkit.accel.resolve()`).
    """

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 32, max_length: int = 0,
                 segments: str = "none", backend: Backend | None = None):
        parse_segmentation(segments)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_length, self.segments = batch_size, max_length, segments
        self.backend = backend or resolve()

    @classmethod
    def from_path(cls, path: str | Path, **kwargs: Any) -> RewardModelScorer:
        """Load a saved reward model directory (segments: as trained, `reward_segments` in config.json),
        frozen for inference by the backend."""
        model, tokenizer = load_reward_model(str(path))
        kwargs["backend"] = kwargs.get("backend") or resolve()
        kwargs["backend"].freeze(model)
        kwargs.setdefault("segments", getattr(hf_model(model).config, CONFIG_SEGMENTS, None) or "none")
        return cls(model, tokenizer, **kwargs)

    def __call__(self, prompts: list[Any], responses: list[Any]) -> torch.Tensor:
        _check_batch(prompts, responses)
        if self.segments != "none":
            return self._segment_sums(prompts, responses)
        prefix = special_prefix(self.tokenizer)  # once per call, not per pair (two tokenizer calls)
        rows = [encode_scored(self.tokenizer, p, r, self.max_length, prefix)
                for p, r in zip(prompts, responses, strict=True)]
        device = next(self.model.parameters()).device
        out = []
        with torch.inference_mode():
            for i in range(0, len(rows), self.batch_size):
                ids, mask = right_pad(rows[i : i + self.batch_size], self.tokenizer.pad_token_id)
                batch = to_device({"input_ids": ids, "attention_mask": mask,
                                   "group_index": _prompt_groups(prompts[i : i + self.batch_size])}, device)
                scores = self.backend.group_scores(self.model, batch["input_ids"], batch["attention_mask"],
                                                   batch["group_index"])
                out.append(with_stored_bias(self.model, scores).cpu())
        return torch.cat(out) if out else torch.empty(0)

    def _segment_sums(self, prompts: list[Any], responses: list[str]) -> torch.Tensor:
        """sum_k r(x, y, y_k): the head read at the end of each segment in one pass (Eq. 10.67-10.68)."""
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
                hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=mask_positions(mask)).last_hidden_state
                per_token = head(hidden)[..., 0].float()  # B×T: r read at every position
                out += [per_token[b, ends].sum() + bias * len(ends) for b, (_, ends) in enumerate(chunk)]
        return torch.stack(out) if out else torch.empty(0)


def _prompt_groups(prompts: list[Any]) -> torch.Tensor:
    """G×K rows that share a prompt (-1: empty slot), in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(repr(prompt), []).append(i)
    width = max((len(g) for g in groups.values()), default=1)
    return torch.tensor([g + [-1] * (width - len(g)) for g in groups.values()], dtype=torch.long).view(-1, width)


class GoldScorer:
    """A world's gold scorer as a scorer: gold(prompt + separator + response), e.g. P(positive) in [0, 1].

    A conversation prompt (or response) is scored as its message contents, one per line (`prompt_text`).
    With `memo`, scores are remembered by text, so a text scored twice (labels, then evaluation) costs once.
    """

    def __init__(self, gold_fn: Any, separator: str = "", memo: bool = False):
        self.gold_fn, self.separator = gold_fn, separator
        self.memo: dict[str, float] | None = {} if memo else None

    def __call__(self, prompts: list[Any], responses: list[Any]) -> torch.Tensor:
        _check_batch(prompts, responses)
        if not prompts:
            return torch.empty(0)
        texts = [f"{prompt_text(p)}{self.separator}{prompt_text(r)}" for p, r in zip(prompts, responses, strict=True)]
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


def load_ensemble(path: str | Path, **kwargs: Any) -> EnsembleScorer:
    """An ensemble directory as a scorer; `kwargs` go to each member's `RewardModelScorer.from_path`."""
    path = Path(path)
    spec = read_ensemble_spec(path)
    members = [RewardModelScorer.from_path(path / name, **kwargs) for name in spec["members"]]
    return EnsembleScorer(members, weights=spec.get("weights"), combine=spec.get("combine", "mean"),
                          k=spec.get("k", 1.0))


def load_scorer(spec: str | Path, *, world: Any = None, **kwargs: Any) -> Scorer:
    """A scorer from `gold:<world>`, a reward model directory or an ensemble directory.

    `gold:<name>` is the gold scorer of `world` (an `alignkit.worlds.base.World` loaded by the caller,
    whose name must be <name>). Other keyword arguments go to `RewardModelScorer` / `EnsembleScorer`
    (e.g. `batch_size`, `segments`, `backend`).

    Raises:
        AlignkitError: A gold scorer of a world not passed in, or a path that is neither a reward
            model nor an ensemble.
    """
    spec = str(spec)
    if spec.startswith("gold:"):
        name = spec.split(":", 1)[1]
        if world is None or world.name != name:
            raise AlignkitError(f"scorer {spec!r}: the world {name!r} is not loaded for this stage; name it in the "
                                f"stage's `world` option (the CLI and the pipeline load it)")
        return GoldScorer(world.gold_scorer())
    path = Path(spec).expanduser()
    if (path / "ensemble.json").is_file():
        return load_ensemble(path, **kwargs)
    if (path / "config.json").is_file():
        return RewardModelScorer.from_path(path, **kwargs)
    raise AlignkitError(f"scorer {spec!r}: expected `gold:<world>`, a reward model directory (with config.json) "
                        "or an ensemble directory (with ensemble.json)")
