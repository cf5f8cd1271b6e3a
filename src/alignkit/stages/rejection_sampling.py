"""`alignkit rejection-sampling`: rounds of best-of-N sampling followed by SFT on the winners.

Rejection sampling fine-tuning (Xiao & Zhu, Sec. 10.4.5; Nakano et al. 2021; Touvron et al. 2023,
Sec. 3.2.3): in round r the latest policy samples N responses to `prompts_per_round` fresh training
prompts, a scorer keeps the best of each (`alignkit best-of-n`), and the policy is fine-tuned on
those winners (`alignkit sft`); the result is the policy of round r + 1. The stages run through
their public `run` functions, each in its own run directory:

    <output_dir>/round-R/best_of_n/    samples, winners (best.jsonl) and the reward curve
    <output_dir>/round-R/sft/          the fine-tuned policy (final/)
    <output_dir>/final/                the last round's policy
    <output_dir>/summary.json          per round: mean winner score, SFT loss, held-out gold and KL

With `world` set, the policy is evaluated before round 0 and after every round on `eval_prompts`
held-out prompts (gold reward, KL to the initial policy, length; `alignkit.rollout.evaluate`).
A finished round (with `round-R/round.json`) is reused, so an interrupted run continues.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from alignkit.accel import resolve
from alignkit.config import DataConfig, ModelConfig, OptimConfig, RunConfig, SamplingConfig, require_world
from alignkit.errors import AlignkitError
from alignkit.models.load import load_causal_lm, load_tokenizer
from alignkit.rewards.config import RewardFunctionsConfig
from alignkit.rollout.evaluate import evaluate_policy
from alignkit.rollout.score import load_scorer
from alignkit.stages import best_of_n
from alignkit.stages.best_of_n import BestOfNConfig
from alignkit.trainers import sft
from alignkit.trainers.rundir import prepare_run_dir, resolve_output_dir, write_json_atomic
from alignkit.trainers.sft import SFTConfig


@dataclass
class RejectionSamplingConfig:
    """Rejection sampling: R rounds of best-of-N winners (by a scorer) -> SFT, each from the latest policy."""

    LIMITS: ClassVar[dict[str, str]] = {"rounds": ">= 1", "n": ">= 2", "prompts_per_round": ">= 1",
                                        "batch_size": ">= 1", "eval_prompts": ">= 0"}

    run: RunConfig = field(default_factory=lambda: RunConfig(report_to=[]))
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(eval_fraction=0.05, max_length=128))
    """SFT data options (`max_length`, `eval_fraction` of the winners held out); `path` is set per round."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5, warmup_steps=5))
    """SFT optimizer of every round."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """How the N candidates (and the evaluation samples) are sampled."""
    rounds: int = 2
    """Rounds of sampling + fine-tuning."""
    n: int = 8
    """Samples per prompt; the best by `scorer` is kept."""
    reward: RewardFunctionsConfig = field(default_factory=RewardFunctionsConfig)
    """Reward functions (rewards as code) that pick the best, alone or weighted with `scorer`."""
    scorer: str = ""
    """Scorer that picks the best: a reward model or ensemble directory, or `gold:<world>`; default `gold:<world>`
    (none when `reward.functions` is set: give it here to weight it with the functions)."""
    world: str = ""
    """A built world: training prompts (unless `prompts_path`), held-out prompts and gold scorer for evaluation."""
    prompts_path: str = ""
    """File of `{prompt}` records to sample from; default: the world's train prompts."""
    prompts_per_round: int = 512
    """Prompts per round (round R uses prompts R·k .. (R+1)·k - 1, so every round sees fresh prompts)."""
    batch_size: int = 128
    """Sequences per generation batch."""
    eval_prompts: int = 128
    """Held-out prompts of `world` for the per-round evaluation (0: none)."""


def best_of_n_config(cfg: RejectionSamplingConfig, policy: str, round_index: int, out: Path) -> Any:
    """The best-of-N config of round `round_index`: `prompts_per_round` fresh training prompts."""
    return BestOfNConfig(
        run=RunConfig(output_dir=str(out / "best_of_n"), seed=cfg.run.seed + round_index, report_to=[],
                      progress=cfg.run.progress),
        model=dataclasses.replace(cfg.model, name_or_path=policy, lora_r=0), scorer=cfg.scorer,
        reward=dataclasses.replace(cfg.reward),
        world=cfg.world, gold=bool(cfg.world), prompts_path=cfg.prompts_path, split="train",
        prompt_offset=round_index * cfg.prompts_per_round, max_prompts=cfg.prompts_per_round, n=cfg.n,
        sampling=dataclasses.replace(cfg.sampling), batch_size=cfg.batch_size,
    )


def sft_config(cfg: RejectionSamplingConfig, policy: str, winners: str, round_index: int, out: Path) -> Any:
    """The SFT config of round `round_index`: fine-tune `policy` on the winners file."""
    run = dataclasses.replace(cfg.run, output_dir=str(out / "sft"), seed=cfg.run.seed + round_index,
                              resume=False, save_every=0)
    data = dataclasses.replace(cfg.data, path=winners, eval_path=None)
    return SFTConfig(run=run, model=dataclasses.replace(cfg.model, name_or_path=policy), data=data,
                     optim=dataclasses.replace(cfg.optim), n_samples=0, sampling=dataclasses.replace(cfg.sampling))


def _evaluate(cfg: RejectionSamplingConfig, policy_dir: str, ref: Any, tokenizer: Any, world: Any) -> dict[str, float]:
    """Gold reward, KL to the initial policy, length and distinct-n of `policy_dir` on held-out prompts."""
    if not (cfg.world and cfg.eval_prompts > 0):
        return {}
    prompts = world.prompts("heldout")[: cfg.eval_prompts]
    policy = load_causal_lm(dataclasses.replace(cfg.model, name_or_path=policy_dir, lora_r=0), tokenizer).eval()
    sampling = cfg.sampling.kwargs()
    metrics, _ = evaluate_policy(policy, ref, tokenizer, prompts, gold=load_scorer(f"gold:{cfg.world}", world=world),
                                 sampling=sampling, seed=cfg.run.seed, backend=resolve(cfg.run.accel))
    return metrics


def _round(cfg: RejectionSamplingConfig, policy: str, r: int, root: Path, world: Any) -> dict[str, Any]:
    """Run (or reuse) round `r`: best-of-N from `policy`, then SFT on the winners."""
    out = root / f"round-{r}"
    if (out / "round.json").is_file():
        print(f"[rejection-sampling] round {r}: reusing {out}", flush=True)
        return json.loads((out / "round.json").read_text())
    bon = best_of_n.run(best_of_n_config(cfg, policy, r, out), world=world)
    if bon["winners"] < 2:
        raise AlignkitError(f"round {r}: only {bon['winners']} non-empty winners to fine-tune on")
    trained = sft.run(sft_config(cfg, policy, bon["best_file"], r, out))
    result = {"round": r, "policy_in": policy, "policy_out": trained["final_dir"], "winners": bon["winners"],
              "winner_score": bon[f"n{cfg.n}/reward/model"], "sample_score": bon["n1/reward/model"],
              "sft_first_eval_loss": trained.get("first_eval_loss"), "sft_last_eval_loss": trained.get("last_eval_loss")}
    for key in ("reward/gold",):
        if f"n{cfg.n}/{key}" in bon:
            result.update({"winner_gold": bon[f"n{cfg.n}/{key}"], "sample_gold": bon[f"n1/{key}"]})
    (out / "round.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def run(cfg: RejectionSamplingConfig, world: Any = None) -> dict[str, Any]:
    """Run the rounds; copy the last policy to `final/`; return the summary (also `summary.json`).

    `world`: the loaded world of option `world` (prompts, gold scorer).
    """
    world = require_world(cfg, world)
    if cfg.rounds < 1 or cfg.n < 2:
        raise AlignkitError(f"options `rounds` and `n`: expected >= 1 and >= 2, got {cfg.rounds} and {cfg.n}")
    if not cfg.model.name_or_path:
        raise AlignkitError("option `model.name_or_path` is required: the initial policy (e.g. the SFT model)")
    t0 = time.perf_counter()
    root = resolve_output_dir("rejection-sampling", cfg.run.output_dir)
    prepare_run_dir(root, cfg, resume=True)  # rounds are reused, not checkpoints
    print(f"[rejection-sampling] run dir: {root}\n  {cfg.rounds} rounds x {cfg.prompts_per_round} prompts x N={cfg.n} "
          f"samples; SFT on the winners: {cfg.optim.per_device_batch_size} x {cfg.optim.grad_accum_steps} per step, "
          f"{cfg.optim.max_steps or str(cfg.optim.epochs) + ' epochs'}", flush=True)
    tokenizer = load_tokenizer(cfg.model)
    ref = None
    if cfg.world and cfg.eval_prompts > 0:
        ref = resolve(cfg.run.accel).freeze(load_causal_lm(dataclasses.replace(cfg.model, lora_r=0), tokenizer))
    torch.manual_seed(cfg.run.seed)
    evals = [_evaluate(cfg, cfg.model.name_or_path, ref, tokenizer, world)]
    policy, rounds = cfg.model.name_or_path, []
    for r in range(cfg.rounds):
        rounds.append(_round(cfg, policy, r, root, world))
        policy = rounds[-1]["policy_out"]
        evals.append(_evaluate(cfg, policy, ref, tokenizer, world))
        print(f"[rejection-sampling] round {r}: {json.dumps(rounds[-1] | evals[-1])}", flush=True)
    if (root / "final").exists():
        shutil.rmtree(root / "final")
    shutil.copytree(policy, root / "final")
    summary = {"stage": "rejection-sampling", "output_dir": str(root), "final_dir": str(root / "final"),
               "rounds": [r | {f"after/{k}": v for k, v in e.items()} for r, e in zip(rounds, evals[1:], strict=True)],
               "initial": evals[0], "final": evals[-1], "wall_time_s": time.perf_counter() - t0}
    write_json_atomic(root / "summary.json", summary)
    return summary
