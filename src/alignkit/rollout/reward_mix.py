"""Several rewards at once: a reward model or gold scorer and reward functions, weighted and summed.

    r(x, y) = sum_c w_c * v_c(x, y)          over the components c that apply to (x, y)

Components are a scorer (`alignkit.rollout.score`: a reward model, an ensemble, a world's gold) and
reward functions (`alignkit.rewards.functions`: built-ins or the user's code), in that order; weights
default to 1. A function's None ("not applicable") drops that component from the row's sum; a row
no component applies to is an error. With `normalize_components` each component is first
standardised, (v - mean) / (std + eps), within each prompt's group of samples (`group`, as GDPO
normalises each reward separately before summing) or over the batch (`batch`), so a component's
scale does not decide its weight. The combination comes before the RL stage's own score
normalisation (`alignkit.rollout.rewards.shape_scores`). Each component's raw mean is returned for
the logs (`reward/<name>`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from alignkit.data.load import content_key
from alignkit.errors import AlignkitError
from alignkit.rewards.config import RewardFunctionsConfig
from alignkit.rewards.functions import FunctionRunner, RewardFunction, unique_names
from alignkit.rollout.score import load_scorer

Normalization = Literal["none", "group", "batch"]


@dataclass
class Component:
    """One reward of a mix: a scorer `(prompts, responses) -> Tensor` or a reward function, and its weight."""

    name: str
    weight: float
    scorer: Any = None
    function: RewardFunction | None = None


def standardize(values: torch.Tensor, group_size: int | None, eps: float = 1e-6) -> torch.Tensor:
    """(v - mean) / (std + eps) over each group of `group_size` consecutive rows (None: the whole batch).

    NaN entries (a component that does not apply) are left out of the mean and std and stay NaN; a
    group whose applicable values are all equal becomes 0 there. Population std (as GRPO's groups).

    Shapes:
        values: B float (NaN allowed). returns: B float.
    """
    size = group_size or values.numel()
    if size <= 0 or values.numel() % size:
        raise ValueError(f"{values.numel()} rows do not split into groups of {size}")
    grouped = values.view(-1, size)
    present = ~torch.isnan(grouped)
    count = present.sum(dim=1, keepdim=True).clamp(min=1)
    filled = torch.where(present, grouped, 0.0)
    mean = filled.sum(dim=1, keepdim=True) / count
    var = (torch.where(present, grouped - mean, 0.0) ** 2).sum(dim=1, keepdim=True) / count
    std = var.sqrt()
    out = torch.where(std > 0, (grouped - mean) / (std + eps), 0.0)  # no spread: no signal, not 0/0
    return torch.where(present, out, float("nan")).view(-1)


class RewardMix:
    """A weighted sum of reward components (see the module docstring); a scorer itself.

    Args:
        components: The components, in order (a scorer first, if any).
        runner: How reward functions are called (workers, timeout, error value).
        normalize_components: `none`, `group` (per prompt group of `group_size` rows) or `batch`.
    """

    def __init__(self, components: Sequence[Component], runner: FunctionRunner | None = None,
                 normalize_components: Normalization = "none") -> None:
        if not components:
            raise AlignkitError("no reward: give a reward model, a gold world or reward functions")
        if normalize_components not in ("none", "group", "batch"):
            raise AlignkitError(f"option `reward.normalize_components`: {normalize_components!r} is not one of "
                                "none, group, batch")
        for c in components:
            if not math.isfinite(c.weight):
                raise AlignkitError(f"reward weight of `{c.name}` must be a finite number, got {c.weight}")
        self.components = list(components)
        self.runner = runner or FunctionRunner()
        self.normalize_components = normalize_components
        self.runner.check([c.function for c in self.components if c.function is not None])

    @property
    def functions(self) -> list[RewardFunction]:
        return [c.function for c in self.components if c.function is not None]

    def __call__(self, prompts: list[Any], responses: list[str], **kwargs: Any) -> torch.Tensor:
        return self.score(prompts, responses, **kwargs)[0]

    def score(self, prompts: list[Any], responses: list[str], *, columns: dict[str, list[Any]] | None = None,
              completion_ids: list[list[int]] | None = None, indices: Sequence[int] | None = None,
              group_size: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """(combined reward B, metrics): `reward/<name>` (raw mean where it applies) per component, and
        `reward/<name>_errors` (rows scored `error_value`) / `reward/<name>_applicable` where not all.

        `columns`: the prompt records' other fields, one list each aligned with the responses;
        `indices`: each row's prompt index (named in errors); `group_size`: rows per prompt group.
        """
        n = len(responses)
        indices = list(indices) if indices is not None else list(range(n))
        metrics: dict[str, float] = {}
        parts = []
        for c in self.components:
            values, errors = self._values(c, prompts, responses, columns or {}, completion_ids, indices)
            present = ~torch.isnan(values)
            metrics[f"reward/{c.name}"] = float(values[present].mean()) if present.any() else float("nan")
            if errors:
                metrics[f"reward/{c.name}_errors"] = float(errors)
            if not present.all():
                metrics[f"reward/{c.name}_applicable"] = float(present.float().mean())
            if self.normalize_components != "none":
                values = standardize(values, group_size if self.normalize_components == "group" else None)
            parts.append(c.weight * values)
        stacked = torch.stack(parts)  # C×B
        none_apply = torch.isnan(stacked).all(dim=0)
        if none_apply.any():
            row = int(none_apply.nonzero()[0])
            raise AlignkitError(f"no reward applies to the completion of prompt index {indices[row]}: every reward "
                                f"function returned None for it ({[c.name for c in self.components]})")
        return torch.nansum(stacked, dim=0), metrics

    def _values(self, c: Component, prompts: list[Any], responses: list[str], columns: dict[str, list[Any]],
                completion_ids: list[list[int]] | None, indices: list[int]) -> tuple[torch.Tensor, int]:
        if c.function is None:
            return torch.as_tensor(c.scorer(prompts, responses), dtype=torch.float32).reshape(-1).cpu(), 0
        values, errors = self.runner.call(c.function, prompts, responses, columns, completion_ids, indices)
        return torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float32), errors

    def close(self) -> None:
        self.runner.close()


def row_columns(per_prompt: Sequence[dict[str, Any]], indices: Sequence[int]) -> dict[str, list[Any]]:
    """The columns of the rows' prompt records as one list per column (None where a record lacks it).

    `per_prompt[i]`: the other fields of prompt i's record; `indices`: each row's prompt index.
    """
    names = list(dict.fromkeys(name for i in dict.fromkeys(indices) for name in per_prompt[i]))
    return {name: [per_prompt[i].get(name) for i in indices] for name in names}


def build_mix(scorer: Any, scorer_name: str, functions: Sequence[RewardFunction], weights: Sequence[float],
              runner: FunctionRunner | None = None, normalize_components: Normalization = "none") -> RewardMix:
    """A `RewardMix` of an optional scorer (named `scorer_name`) and `functions`, with `weights`.

    `weights`: one per component, the scorer's first (empty: all 1).
    """
    names = unique_names(([scorer_name] if scorer is not None else []) + [f.name for f in functions])
    count = len(names)
    if weights and len(weights) != count:
        listed = ", ".join(names)
        raise AlignkitError(f"option `reward.weights`: {len(weights)} weight(s) for {count} reward component(s) "
                            f"({listed}); give one per component, the reward model or gold first")
    weights = list(weights) or [1.0] * count
    components = []
    if scorer is not None:
        components.append(Component(names[0], weights[0], scorer=scorer))
    offset = len(components)
    components += [Component(names[offset + i], weights[offset + i], function=f) for i, f in enumerate(functions)]
    return RewardMix(components, runner, normalize_components)


def stage_reward(spec: str, functions: RewardFunctionsConfig, *, world: Any = None, backend: Any = None,
                 batch_size: int | None = None) -> tuple[Any, str]:
    """The reward of a stage that scores samples (best-of-n, rejection sampling, eval, label), and its plan line.

    `spec` is the stage's `scorer` (a reward model or ensemble directory, or `gold:<world>`; "" for none);
    with `functions.functions` (or weights) the reward is a `RewardMix` of that scorer and the functions.
    """
    kwargs = {"backend": backend, **({"batch_size": batch_size} if batch_size else {})}
    scorer = load_scorer(spec, world=world, **kwargs) if spec else None
    if not functions.functions and not functions.weights:
        if scorer is None:
            raise AlignkitError("no reward: set `scorer` (a reward model directory or gold:<world>) or "
                                "`reward.functions`")
        return scorer, spec
    name = "gold" if spec.startswith("gold:") else "reward_model"
    mix = build_mix(scorer, name, functions.load_functions(), functions.weights, functions.runner(),
                    functions.normalize_components)
    return mix, describe(mix, {name: spec})


def describe(mix: RewardMix, scorer_specs: dict[str, str]) -> str:
    """`w x name (source) + ...`: the mix's components, their weights and where each function's code comes from."""
    parts = [f"{c.weight:g} x {c.name} ({c.function.source if c.function is not None else scorer_specs.get(c.name, '')})"
             for c in mix.components]
    how = mix.normalize_components
    return " + ".join(parts) + (f", each standardised per {how}" if how != "none" else "")


def score_flat(scorer: Any, prompts: list[Any], responses: list[str], *, columns: Sequence[dict[str, Any]] | None = None,
               indices: Sequence[int] | None = None, completion_ids: list[list[int]] | None = None,
               group_size: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Scores of (prompt, response) rows by any scorer, with a `RewardMix` given the rows' columns.

    `columns[i]`: the other fields of prompt i's record; `indices`: each row's prompt index (default
    the row's own); returns (B scores, the mix's component metrics or {}).
    """
    if not isinstance(scorer, RewardMix):
        return torch.as_tensor(scorer(prompts, responses), dtype=torch.float32).reshape(-1), {}
    indices = list(indices) if indices is not None else list(range(len(prompts)))
    table = row_columns(columns, indices) if columns is not None else {}
    return scorer.score(prompts, responses, columns=table, completion_ids=completion_ids, indices=indices,
                        group_size=group_size)


class PromptColumnsScorer:
    """A `RewardMix` as a plain `(prompts, responses)` scorer whose functions still get their columns,
    looked up by prompt content (for stages whose scoring calls carry no record: the labelers).

    `prompts` / `columns`: every prompt the stage may score and its record's other fields; a prompt
    seen twice keeps its first record's columns.
    """

    def __init__(self, mix: RewardMix, prompts: Sequence[Any], columns: Sequence[dict[str, Any]]) -> None:
        self.mix = mix
        self.by_prompt: dict[str, dict[str, Any]] = {}
        for prompt, cols in zip(prompts, columns, strict=True):
            self.by_prompt.setdefault(content_key(prompt), cols)

    def __call__(self, prompts: list[Any], responses: list[str]) -> torch.Tensor:
        cols = [self.by_prompt.get(content_key(p), {}) for p in prompts]
        return score_flat(self.mix, prompts, responses, columns=cols)[0]
