"""Options of the reward functions of a stage (`--reward.functions`, `--reward.weights`, ...)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from alignkit.rewards.functions import FunctionRunner, RewardFunction, from_callable, load_function


@dataclass
class RewardFunctionsConfig:
    """Rewards as code: reward functions, their weights and how they are called."""

    LIMITS: ClassVar[dict[str, str]] = {"workers": ">= 0", "timeout_s": ">= 0"}

    functions: list[str] = field(default_factory=list)
    """Reward functions, comma-separated: built-ins (`answer_match`, `format_match(pattern="...")`,
    `length_penalty(max_length=N)`, `repetition_penalty`), `module:function` or `path/to/file.py:function`
    (your own code: imported only when named here, and listed in the plan before step 0). Settings in
    parentheses are keyword arguments. A function gets (prompts, completions, **columns of the prompt
    records) and returns one float per completion (None: does not apply)."""
    weights: list[float] = field(default_factory=list)
    """One weight per reward component: the reward model (or gold scorer) first if there is one, then each
    function in order; empty: all 1. The reward is the weighted sum, before the score normalisation."""
    normalize_components: Literal["none", "group", "batch"] = "none"
    """Standardise each component before the weighted sum: within each prompt's group of samples (`group`,
    GDPO-style), over the batch (`batch`), or not (`none`)."""
    workers: int = 0
    """Worker processes that call the reward functions (0: in this process); for slow functions."""
    timeout_s: float = 0.0
    """Seconds one reward-function call may take (0: no limit); needs `workers` >= 1 for sync functions."""
    error_value: float | None = None
    """Score of a completion whose reward function raised or timed out (counted as `reward/<name>_errors`);
    unset: the step fails, naming the function and the prompt index."""

    def load_functions(self) -> list[RewardFunction]:
        """The functions named in `functions`, loaded (user code is imported here). From Python, an
        item may also be the callable itself (with workers, it must be picklable: a module-level function)."""
        return [from_callable(spec) if callable(spec) else load_function(spec.strip())
                for spec in self.functions if callable(spec) or spec.strip()]

    def runner(self) -> FunctionRunner:
        return FunctionRunner(self.workers, self.timeout_s, self.error_value)
