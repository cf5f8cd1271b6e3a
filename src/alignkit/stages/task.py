"""`alignkit task`: write a generated task's data files (today: `arithmetic`) into a run directory.

The arithmetic task (`alignkit.tasks.arithmetic`) is a verifiable-reward task for "rewards as code":
SFT solutions (`sft_train.jsonl`, `sft_heldout.jsonl`: `{prompt, completion}`) and RL / evaluation
prompts with reference answers (`prompts_train.jsonl`, `prompts_heldout.jsonl`: `{prompt, answer}`),
scored by the built-in reward `answer_match(extract=full)`. Same settings, same files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from alignkit.config import RunConfig
from alignkit.errors import AlignkitError
from alignkit.tasks import arithmetic
from alignkit.trainers.rundir import prepare_run_dir, resolve_output_dir, write_json_atomic


@dataclass
class TaskConfig:
    """A generated task: its files go to `run.output_dir` (only `run.output_dir` and `run.seed` are used)."""

    LIMITS: ClassVar[dict[str, str]] = {"n_train": ">= 0", "n_heldout": ">= 0", "n_sft": ">= 0",
                                        "n_sft_heldout": ">= 0", "max_operand": ">= 0", "mul_max": ">= 0"}

    run: RunConfig = field(default_factory=lambda: RunConfig(report_to=[]))
    task: Literal["arithmetic"] = "arithmetic"
    """The task: `arithmetic` (integer `+ - *` expressions, digits separated by spaces: `2 3 + 5 8 =` -> ` 8 1`)."""
    n_train: int = 2000
    """RL training prompts with answers (`prompts_train.jsonl`)."""
    n_heldout: int = 500
    """Held-out prompts with answers for evaluation (`prompts_heldout.jsonl`)."""
    n_sft: int = 20000
    """SFT solutions (`sft_train.jsonl`); may repeat a problem when the problem space is small."""
    n_sft_heldout: int = 500
    """Held-out SFT solutions (`sft_heldout.jsonl`)."""
    difficulty: Literal[1, 2, 3] = 2
    """Operand ranges: 1: `+ -` up to 20, `*` up to 9; 2: up to 99 and 12; 3: up to 999 and 30."""
    max_operand: int = 0
    """Largest operand of `+` and `-` (0: from `difficulty`)."""
    mul_max: int = 0
    """Largest operand of `*` (0: from `difficulty`)."""
    weights: list[float] = field(default_factory=lambda: [arithmetic.DEFAULT_WEIGHTS[k] for k in arithmetic.KINDS])
    """Relative frequency of `add, sub, mul, add_sub` (a + b - c), in that order; 0 drops one."""
    allow_negative: bool = False
    """Allow negative results (otherwise every result is >= 0)."""


def run(cfg: TaskConfig) -> dict[str, Any]:
    """Write the task's files into the run directory; return the summary (counts, settings, files)."""
    if len(cfg.weights) != len(arithmetic.KINDS):
        raise AlignkitError(f"option `weights`: expected {len(arithmetic.KINDS)} values (for "
                            f"{', '.join(arithmetic.KINDS)}), got {len(cfg.weights)}")
    t0 = time.perf_counter()
    out_dir = resolve_output_dir("task", cfg.run.output_dir)
    prepare_run_dir(out_dir, cfg, resume=False)
    try:
        info = arithmetic.write_task(
            out_dir, n_train=cfg.n_train, n_sft=cfg.n_sft, n_heldout=cfg.n_heldout, n_sft_heldout=cfg.n_sft_heldout,
            seed=cfg.run.seed, difficulty=cfg.difficulty, max_operand=cfg.max_operand or None,
            mul_max=cfg.mul_max or None, weights=dict(zip(arithmetic.KINDS, cfg.weights, strict=True)),
            allow_negative=cfg.allow_negative)
    except ValueError as err:
        raise AlignkitError(f"alignkit task {cfg.task}: {err}") from None
    counts = ", ".join(f"{name} {n}" for name, n in info["counts"].items())
    print(f"[task {cfg.task}] wrote {counts} to {out_dir}/ (reward: `answer_match(extract=full)` on `answer`)",
          flush=True)
    summary = {"stage": "task", "task": cfg.task, "output_dir": str(out_dir), **info,
               "files": {name: str(out_dir / f"{name}.jsonl") for name in info["counts"]},
               "wall_time_s": time.perf_counter() - t0}
    write_json_atomic(out_dir / "summary.json", summary)
    return summary
