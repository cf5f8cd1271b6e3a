"""Setting up an RL stage (see `alignkit.trainers.rl`): checks, prompts, scorers, models and the run plan.

`setup(cfg, world)` loads what one run needs into an `RLContext`: the policy and its reference, the
value model for the algorithms with a critic, the reward scorer (and the gold scorer when a world is
named), training and held-out prompts, the KL controller and the score normaliser. `print_plan`
prints the rollout and update sizes before step 0.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from alignkit.accel import Backend, resolve
from alignkit.config import require_world
from alignkit.data.formats import print_report, validate_records
from alignkit.data.load import content_key, load_records, split_records
from alignkit.errors import AlignkitError
from alignkit.losses.kl import AdaptiveKLController, FixedKLController
from alignkit.losses.rl_algorithms import ALGORITHMS, Algorithm
from alignkit.models.load import load_causal_lm, load_tokenizer, remote_code_plan
from alignkit.models.value_head import AdapterDisabledReference, load_value_model
from alignkit.rollout.logprobs import response_values, sequence_logprobs
from alignkit.rollout.reward_mix import RewardMix, build_mix, describe
from alignkit.rollout.rewards import ScoreNormalizer
from alignkit.rollout.score import load_scorer
from alignkit.rollout.types import Rollout
from alignkit.trainers.loop import TrainLoop
from alignkit.trainers.rl_config import ActorCriticConfig, RLConfig

# ---------------------------------------------------------------------------------------------
# Models and state
# ---------------------------------------------------------------------------------------------


class ActorCritic(torch.nn.Module):
    """The trained models as one module (one optimizer, one checkpoint): policy and value model (or None)."""

    def __init__(self, policy: torch.nn.Module, value: torch.nn.Module | None,
                 value_lr: float | None = None, backend: Backend | None = None) -> None:
        super().__init__()
        self.policy, self.value, self.value_lr = policy, value, value_lr
        self.backend = backend or resolve()  # computes the policy's log-probs (alignkit.accel)

    def optimizer_groups(self, lr: float) -> list[dict[str, Any]]:
        """AdamW groups: the policy at `lr`, the value model at `value_lr` (default `lr`)."""
        groups = [{"params": [p for p in self.policy.parameters() if p.requires_grad]}]
        if self.value is not None:
            groups.append({"params": list(self.value.parameters()), "lr": self.value_lr or lr})
        return groups

    def forward(self, rollout: Rollout, temperature: float, with_entropy: bool = False) -> tuple:
        """(logprobs B×R, entropy B×R or None, values B×R or None) of the rollout's response tokens."""
        out = sequence_logprobs(self.policy, rollout, temperature=temperature, with_entropy=with_entropy,
                                backend=self.backend)
        logprobs, entropy = out if with_entropy else (out, None)
        return logprobs, entropy, self.values(rollout)

    def values(self, rollout: Rollout) -> torch.Tensor | None:
        """V B×R of the rollout's response tokens (None without a value model)."""
        return response_values(self.value, rollout) if self.value is not None else None


@dataclass
class RLContext:
    """What a step reads: config, algorithm, loop, models, scorers, prompts, KL controller, normaliser."""

    cfg: RLConfig
    algo: Algorithm
    loop: TrainLoop
    tokenizer: Any
    policy: torch.nn.Module
    ref: Any
    scorer: Any
    gold: Any
    prompts: list[str]
    eval_prompts: list[str]
    kl_ctl: AdaptiveKLController | FixedKLController
    normalizer: ScoreNormalizer
    summary: dict[str, Any] = field(default_factory=dict)
    data_counts: dict[str, int] = field(default_factory=dict)
    """`skipped_rows` and `duplicate_rows` of the prompt files (`_load_prompts`)."""
    columns: list[dict[str, Any]] = field(default_factory=list)
    """The other fields of each training prompt's record (what reward functions read), aligned with `prompts`."""
    eval_columns: list[dict[str, Any]] = field(default_factory=list)
    """The same for `eval_prompts`."""

    def sampling(self) -> dict[str, Any]:
        """Keyword arguments of `sample` (and `evaluate_policy`) from the config."""
        return self.cfg.sampling.kwargs()

    def state_dict(self) -> dict[str, Any]:
        """What changes during training besides the weights: beta, the normaliser, the first evaluation."""
        return {"kl_ctl": self.kl_ctl.state_dict(), "normalizer": self.normalizer.state_dict(),
                "summary": self.summary}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.kl_ctl.load_state_dict(state["kl_ctl"])
            self.normalizer.load_state_dict(state["normalizer"])
            self.summary = dict(state.get("summary", {}))


def _check(cfg: RLConfig) -> Algorithm:
    """The algorithm of `cfg`, after checking the options that depend on each other."""
    algo = ALGORITHMS[cfg.algorithm]
    if algo.critic != isinstance(cfg, ActorCriticConfig):  # the value model's options are on its config
        raise AlignkitError(f"algorithm {cfg.algorithm} needs its own stage config (`alignkit {cfg.algorithm}`), "
                            f"not {type(cfg).__name__}")
    r = cfg.reward
    if r.model is not None and r.gold_world is not None or not (r.model or r.gold_world or r.functions):
        raise AlignkitError("give the reward: one of `reward.model` (a reward model directory) and "
                            "`reward.gold_world` (a built world whose gold scorer is the reward), and/or "
                            "`reward.functions` (rewards as code)")
    if algo.grouped and cfg.samples_per_prompt < 2:  # a group of one has no baseline
        raise AlignkitError(f"option `samples_per_prompt`: algorithm {cfg.algorithm} needs >= 2 samples per "
                            f"prompt (its baseline is the other samples of the prompt's group), got "
                            f"{cfg.samples_per_prompt}")
    if min(cfg.prompts_per_step, cfg.samples_per_prompt, cfg.optim.per_device_batch_size) < 1:
        raise AlignkitError("options `prompts_per_step`, `samples_per_prompt` and `optim.per_device_batch_size` "
                            "must be >= 1")
    batch = cfg.prompts_per_step * cfg.samples_per_prompt
    if cfg.epochs < 1 or not 1 <= cfg.minibatches <= batch:
        raise AlignkitError("options: need `epochs` >= 1 and 1 <= `minibatches` <= prompts_per_step x "
                            f"samples_per_prompt = {batch}")
    if cfg.optim.max_steps < 1:
        raise AlignkitError("option `optim.max_steps` (the number of RL steps) must be >= 1")
    if cfg.optim.grad_accum_steps != 1:
        raise AlignkitError(
            f"option `optim.grad_accum_steps` ({cfg.optim.grad_accum_steps}) is not used by the RL stages: each "
            "of the `minibatches` minibatches of a rollout batch is one optimizer step, accumulated over "
            "micro-batches of `optim.per_device_batch_size`. Leave it at 1 and set `minibatches` (and "
            "`prompts_per_step` x `samples_per_prompt`) for the batch of an optimizer step")
    _check_clip(cfg)
    return algo


def _check_clip(cfg: RLConfig) -> None:
    """The ratio clip ranges, where the algorithm has them: 0 <= eps_low < 1 and eps_high >= 0."""
    for name in ("cliprange", "cliprange_low", "cliprange_high"):
        value = getattr(cfg, name, None)
        upper = 1.0 if name != "cliprange_high" else math.inf
        if value is not None and not 0.0 <= value < upper:
            raise AlignkitError(f"option `{name}` must be in [0, {upper:g}), got {value}")


def _load_prompts(cfg: RLConfig, world: Any) -> tuple[list[Any], list[Any], dict[str, int], tuple[list, list]]:
    """Training and held-out prompts, from `world` or `data.path` / `data.eval_path` ({prompt} records),
    the counts `skipped_rows` and `duplicate_rows` of the files read (for `summary.json`), and the other
    columns of each training and held-out record (dicts without `prompt`; reward functions read them).

    A prompt is a string or a conversation (a message list ending with a user turn), rendered with
    the chat template when sampled (`tokenize_prompts`). Prompts are checked before the split (errors
    name the file's row); skipped and repeated rows are warned of; copies of a prompt stay on one side.
    """
    counts = {"skipped_rows": 0, "duplicate_rows": 0}
    if world is not None:
        train, held = world.prompts("train")[: cfg.data.limit], world.prompts("heldout")
        return train, held, counts, ([{}] * len(train), [{}] * len(held))
    if not cfg.data.path:
        raise AlignkitError("give prompts: `world` (e.g. sentiment) or `data.path` (records with a `prompt`: "
                            "a string or a message list)")

    def records(source: str, limit: int | None = None) -> list[dict[str, Any]]:
        rows = load_records(source, on_bad_rows=cfg.data.on_bad_rows)[:limit]
        report = validate_records(rows, "prompt", source, cfg.data.on_bad_rows)
        print_report(report, source, cfg.algorithm)
        counts["skipped_rows"] += report.n_skipped
        counts["duplicate_rows"] += report.n_duplicates
        return report.records

    train = records(cfg.data.path, cfg.data.limit)
    if cfg.data.eval_path:
        held = records(cfg.data.eval_path)
    else:
        train, held = split_records(train, cfg.data.eval_fraction, cfg.run.seed,
                                    key=lambda record: content_key(record["prompt"]))

    def columns(part: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in record.items() if k != "prompt"} for record in part]

    return [r["prompt"] for r in train], [r["prompt"] for r in held], counts, (columns(train), columns(held))


def _load_scorers(cfg: RLConfig, backend: Backend, world: Any) -> tuple[Any, Any]:
    """(reward scorer, gold scorer or None). The gold scorer is the reward when `reward.gold_world` is set.

    With `reward.functions` (or `reward.weights`) the reward is a `RewardMix`: the reward model or gold
    scorer (if any) and the functions, weighted (the user's code is imported here).
    """
    r = cfg.reward
    gold_world = r.gold_world or cfg.world
    gold = load_scorer(f"gold:{gold_world}", world=world) if gold_world else None
    base = gold if r.gold_world else (load_scorer(r.model, batch_size=r.batch_size, backend=backend)
                                      if r.model else None)
    if not r.functions and not r.weights:
        return base, gold
    mix = build_mix(base, "gold" if r.gold_world else "reward_model", r.load_functions(), r.weights,
                    r.runner(), r.normalize_components)
    if r.normalize_components == "group" and cfg.samples_per_prompt < 2:
        raise AlignkitError("option `reward.normalize_components group` needs `samples_per_prompt` >= 2 "
                            "(a group of one sample has no spread)")
    return mix, gold


def _load_models(cfg: RLConfig, tokenizer: Any, backend: Backend) -> tuple[torch.nn.Module, Any, Any]:
    """(policy, reference, value model or None), all with dropout off; the reference frozen by the backend.

    Only the algorithms with a critic (`ActorCriticConfig`: PPO, A2C, REINFORCE) get a value model.
    """
    policy = load_causal_lm(cfg.model, tokenizer).eval()
    if cfg.model.lora_r > 0:
        ref = AdapterDisabledReference(policy)  # no second copy of the base weights
    else:
        ref = backend.freeze(load_causal_lm(dataclasses.replace(cfg.model, lora_r=0), tokenizer))
    value = None
    if isinstance(cfg, ActorCriticConfig):
        init = cfg.value_model if cfg.value_model != "auto" else ("reward" if cfg.reward.model else "policy")
        if init == "reward" and not cfg.reward.model:
            raise AlignkitError("`value_model reward` needs `reward.model`; use --value_model policy")
        source = cfg.reward.model if init == "reward" else cfg.model.name_or_path
        # trust is per model path: the reward model's own switch, the policy's for a copy of the policy
        trust = cfg.reward.trust_remote_code if init == "reward" else cfg.model.trust_remote_code
        value = load_value_model(source, init, tokenizer, dataclasses.replace(cfg.model, trust_remote_code=trust))
    return policy, ref, value


def setup(cfg: RLConfig, world: Any = None) -> RLContext:
    """Load prompts, scorers and models; build the loop, the KL controller and the normaliser."""
    algo = _check(cfg)
    tokenizer = load_tokenizer(cfg.model, padding_side="left")
    world = require_world(cfg, world)
    prompts, eval_prompts, counts, (columns, eval_columns) = _load_prompts(cfg, world if cfg.world else None)
    if not prompts:
        raise AlignkitError("no training prompts")
    backend = resolve(cfg.run.accel)  # the loop's too (same device choice as its accelerator)
    scorer, gold = _load_scorers(cfg, backend, world)
    policy, ref, value = _load_models(cfg, tokenizer, backend)
    model = ActorCritic(policy, value, cfg.value_lr if isinstance(cfg, ActorCriticConfig) else None, backend)
    loop = TrainLoop(cfg.algorithm, cfg, model, total_steps=cfg.optim.max_steps)
    k = cfg.kl
    kl_ctl = (AdaptiveKLController(k.coef, target=k.target, horizon=k.horizon) if k.adaptive
              else FixedKLController(k.coef))
    return RLContext(cfg=cfg, algo=algo, loop=loop, tokenizer=tokenizer, policy=policy, ref=ref,
                     scorer=scorer, gold=gold, prompts=prompts, eval_prompts=eval_prompts[: cfg.eval_prompts],
                     kl_ctl=kl_ctl, normalizer=ScoreNormalizer(cfg.reward.normalize), data_counts=counts,
                     columns=columns, eval_columns=eval_columns[: cfg.eval_prompts])


def minibatch_sizes(batch: int, minibatches: int) -> list[int]:
    """Rows of each of the `minibatches` minibatches of a batch of `batch` rows: near-equal, larger first
    (as `torch.tensor_split`, which `update_epochs` uses)."""
    size, extra = divmod(batch, minibatches)
    return [size + (i < extra) for i in range(minibatches)]


def _size_range(sizes: list[int]) -> str:
    return str(sizes[0]) if min(sizes) == max(sizes) else f"{min(sizes)}-{max(sizes)}"


def _remote_code(cfg: RLConfig) -> str:
    """Which models may run their repository's code (the policy and its reference; a value model's source)."""
    value_from_reward = isinstance(cfg, ActorCriticConfig) and cfg.reward.model and cfg.value_model != "policy"
    return remote_code_plan({"policy": (cfg.model.name_or_path, cfg.model.trust_remote_code),
                             "value model": (cfg.reward.model if value_from_reward else "", cfg.reward.trust_remote_code)})


def _reward_plan(ctx: RLContext) -> str:
    """The reward's components and weights, and where each function's code comes from."""
    r = ctx.cfg.reward
    if not isinstance(getattr(ctx, "scorer", None), RewardMix):
        return r.model or f"gold:{r.gold_world}"
    return describe(ctx.scorer, {"reward_model": r.model or "", "gold": f"gold:{r.gold_world}"})


def print_plan(ctx: RLContext) -> None:
    """Print rollout and update sizes, steps, data and models before step 0."""
    c, loop = ctx.cfg, ctx.loop
    batch = c.prompts_per_step * c.samples_per_prompt
    sizes = minibatch_sizes(batch, c.minibatches)
    lines = [
        f"[{c.algorithm}] run dir: {loop.out_dir}",
        f"  rollout: {c.prompts_per_step} prompts x {c.samples_per_prompt} samples x {loop.world} device(s)"
        " = "
        f"{batch * loop.world} responses per step, <= {c.sampling.max_new_tokens} new tokens each",
        f"  update: {c.epochs} epoch(s) x {c.minibatches} minibatch(es) = {c.epochs * c.minibatches} optimizer "
        "steps per step",
        f"  optimizer step: {_size_range(sizes)} responses per device x {loop.world} device(s) = "
        f"{_size_range([s * loop.world for s in sizes])} responses, accumulated over "
        f"{_size_range([math.ceil(s / c.optim.per_device_batch_size) for s in sizes])} micro-batch(es) of "
        f"<= {c.optim.per_device_batch_size} (optim.per_device_batch_size)",
        f"  data: {len(ctx.prompts)} training prompts, {loop.total_steps} steps = "
        f"{loop.total_steps * c.prompts_per_step * loop.world / len(ctx.prompts):.2f} epochs; "
        f"{len(ctx.eval_prompts)} held-out prompts per evaluation",
        f"  models: policy {c.model.name_or_path}{f' (LoRA r={c.model.lora_r})' if c.model.lora_r else ''}, "
        f"reference {'= policy without adapters' if c.model.lora_r else 'a frozen copy'}, "
        f"value model {'yes' if ctx.algo.critic else 'none'}; reward {_reward_plan(ctx)}",
        f"  remote code: {_remote_code(c)}",
        f"  KL: beta {ctx.kl_ctl.value:g} "
        f"({f'adaptive, target {c.kl.target:g} nats' if c.kl.adaptive else 'fixed'})",
        "  algorithm options: " + ", ".join(f"{k}={v}" for k, v in {**c.targets_options(), **c.loss_options()}.items()
                                            if k not in ("k", "max_len")),
    ]
    loop.accelerator.print("\n".join(lines))
