"""Configs of the RL stages (`alignkit ppo | a2c | reinforce | rloo | grpo`, see `alignkit.trainers.rl`).

`RLConfig` holds what every algorithm reads (rollout, reward, KL, update schedule, evaluation). Each
stage's config adds only what its algorithm reads, so its `--help` lists nothing it ignores:

    stage      value_model, value_lr, value_coef  gamma  whiten_advantages  lam  cliprange_value  cliprange
    ppo        yes                                yes    yes                yes  yes              yes
    a2c        yes                                yes    yes                -    -                -
    reinforce  yes                                yes    yes                -    -                -
    rloo       -                                  -      yes                -    -                yes
    grpo       -                                  -      -                  -    -                yes

`target_approx_kl`, `cliprange_low` and `cliprange_high` (DAPO's clip-higher) go with `cliprange`. A2C (TD
error: GAE with lam = 0) and REINFORCE (reward-to-go: lam = 1) fix lambda; their losses have no ratio to
pi_old, hence no clip and no approximate KL to stop on, and their value loss is unclipped. RLOO sums the
KL-shaped rewards undiscounted; GRPO's group-relative advantages are not whitened again, and only GRPO has
`advantage_scaling` and `loss_aggregation` (the other losses are token means). The trainer reads the
algorithm's options through `targets_options`, `loss_options` and `approx_kl_limit`, and the value model's
only from an `ActorCriticConfig`.

Defaults follow each algorithm's paper, cited in the field's docstring (its `--help`); departures from it
are options.

Batch sizes: a step samples prompts_per_step x samples_per_prompt responses per device; each of `epochs`
passes splits them into `minibatches` minibatches (one optimizer step each), whose rows are run through
the model in micro-batches of `optim.per_device_batch_size` and accumulated. The accumulation count
follows from those three, so `optim.grad_accum_steps` must stay 1 here (`RLOptimConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from alignkit.config import DataConfig, ModelConfig, OptimConfig, RunConfig, SamplingConfig
from alignkit.rewards.config import RewardFunctionsConfig

Algo = Literal["ppo", "a2c", "reinforce", "rloo", "grpo"]


@dataclass
class RewardSourceConfig(RewardFunctionsConfig):
    """Where the reward comes from (a reward model, a gold scorer, reward functions) and how it is shaped."""

    LIMITS: ClassVar[dict[str, str]] = {"clip": "> 0", "batch_size": ">= 1"}  # and RewardFunctionsConfig's

    model: str | None = None
    """Reward model directory (or ensemble directory), scored by `alignkit.rollout.score.load_scorer`."""
    trust_remote_code: bool = False
    """Run the Python code shipped with `reward.model` when a value model is initialised from it (its own
    switch: `model.trust_remote_code` covers only the policy). The scorer never runs a reward model's code."""
    gold_world: str | None = None
    """Use this built world's gold scorer as the reward (e.g. `sentiment`), when there is no reward model."""
    normalize: Literal["initial", "running", "none"] = "initial"
    """Score normalisation: mean/std of the first batch (the initial policy), running mean/std, or none."""
    missing_eos_penalty: float | None = None
    """EOS trick: the (normalised) score of a response that does not end with EOS becomes this value."""
    clip: float | None = None
    """Clip normalised scores to [-clip, clip]."""
    batch_size: int = 64
    """Texts per reward-model forward pass."""


@dataclass
class KLConfig:
    """The KL penalty beta * (log pi - log pi_ref) and its coefficient beta."""

    LIMITS: ClassVar[dict[str, str]] = {"coef": ">= 0", "target": "> 0", "horizon": "> 0"}

    coef: float = 0.05
    """Initial beta."""
    adaptive: bool = True
    """Adapt beta towards `target` (Ziegler et al. 2019, Sec. 2.2); else beta stays fixed."""
    target: float = 6.0
    """Target KL(pi || pi_ref) per response, in nats, of the adaptive controller."""
    horizon: float = 10000.0
    """Controller horizon in samples: beta <- beta (1 + clip((KL - target) / target, +-0.2) * B / horizon)."""


@dataclass
class RLOptimConfig(OptimConfig):
    """Optimizer, schedule and micro-batch size of an RL stage (the `optim` part; see the module docstring)."""

    LIMITS: ClassVar[dict[str, str]] = {"max_steps": ">= 1"}  # and OptimConfig's

    warmup_steps: int = 0
    """Linear warm-up from 0 over this many RL steps (the schedule moves once per rollout batch)."""
    per_device_batch_size: int = 8
    """Responses per forward pass on each device (micro-batch): each minibatch's micro-batches are accumulated
    into one optimizer step (global batch per optimizer step = the minibatch x devices)."""
    grad_accum_steps: int = 1
    """Not used by the RL stages and must be 1: the accumulation count follows from the minibatch size
    (prompts_per_step x samples_per_prompt / `minibatches`) and `per_device_batch_size`."""
    epochs: float = 1.0
    """Not used by the RL stages (`max_steps` counts the RL steps; `epochs` at the top level is PPO's K)."""
    max_steps: int = 0
    """RL steps to run (rollout batches; each makes `epochs` x `minibatches` optimizer steps); >= 1."""


@dataclass
class RLConfig:
    """RL from a reward with a KL penalty: what PPO, A2C, REINFORCE, RLOO and GRPO all read (one loop).

    Not a stage config itself: each stage's (`PPOConfig`, ...) fixes `algorithm` and adds its options.
    """

    LIMITS: ClassVar[dict[str, str]] = {
        "prompts_per_step": ">= 1", "samples_per_prompt": ">= 1", "epochs": ">= 1", "minibatches": ">= 1",
        "eval_prompts": ">= 0", "eval_batch_size": ">= 1", "n_samples": ">= 0"}

    run: RunConfig = field(default_factory=lambda: RunConfig(log_every=1))
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: RLOptimConfig = field(default_factory=lambda: RLOptimConfig(
        lr=3e-5, scheduler="constant", max_steps=100, per_device_batch_size=64, max_grad_norm=1.0))
    reward: RewardSourceConfig = field(default_factory=RewardSourceConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    algorithm: Algo = field(kw_only=True)
    """Policy-gradient algorithm (see `alignkit.losses.rl_algorithms`); each stage fixes its own."""
    world: str | None = None
    """Take train/held-out prompts from this built world (e.g. `sentiment`) instead of `data.path`; its
    gold scorer is logged as `reward/gold`."""
    chat: bool = False
    """Wrap each prompt as a user message in the tokenizer's chat template."""
    prompts_per_step: int = 16
    """Prompts sampled per step (per device)."""
    samples_per_prompt: int = 4
    """Responses per prompt (k; >= 2 for rloo and grpo). Rollout batch = prompts_per_step x k."""
    recompute_logprobs: bool = False
    """Recompute log pi_old (and the entropy) with a policy forward pass after sampling, instead of
    using the sampler's own: they are the same distribution and agree to float rounding (the largest
    difference is logged every step as `rollout/logprob_parity_max_abs`), so this only costs time. Policies
    in bf16/fp16 always recompute: there the cached decode and the full forward round differently."""
    epochs: int = 4
    """Passes over each rollout batch (K of PPO)."""
    minibatches: int = 4
    """Minibatches (optimizer steps) per pass, of near-equal size; each is accumulated over micro-batches of
    `optim.per_device_batch_size`."""
    eval_prompts: int = 256
    """Held-out prompts per evaluation (0: no evaluation)."""
    eval_batch_size: int = 64
    """Prompts per evaluation generation batch."""
    n_samples: int = 16
    """Evaluation samples written to `samples/step-N.jsonl` (0: none; the file is still written, empty)."""

    def targets_options(self) -> dict[str, Any]:
        """Keyword arguments of the algorithm's advantage estimator (`Algorithm.targets`)."""
        raise NotImplementedError(f"{type(self).__name__} is not a stage config")

    def loss_options(self) -> dict[str, Any]:
        """Keyword arguments of the algorithm's loss (`Algorithm.loss`), besides the current beta."""
        raise NotImplementedError(f"{type(self).__name__} is not a stage config")

    def approx_kl_limit(self) -> float | None:
        """Stop a step's epochs when an epoch's mean approx KL to pi_old exceeds this (None: never)."""
        raise NotImplementedError(f"{type(self).__name__} is not a stage config")


@dataclass
class ActorCriticConfig(RLConfig):
    """The options of the algorithms with a value model (critic): PPO, A2C and REINFORCE with a baseline."""

    LIMITS: ClassVar[dict[str, str]] = {"value_lr": "> 0", "value_coef": ">= 0", "gamma": "[0, 1]"}

    value_model: Literal["auto", "reward", "policy"] = "auto"
    """Initialise the value model from the reward model or the policy (auto: the reward model if any)."""
    value_lr: float | None = None
    """Learning rate of the value model (default: `optim.lr`); a value head that starts at 0 needs more."""
    value_coef: float = 0.5
    """Weight of the value loss."""
    gamma: float = 1.0
    """Discount of the per-token rewards."""
    whiten_advantages: bool = True
    """Normalise advantages to mean 0, variance 1 over each rollout batch."""


@dataclass
class PPOConfig(ActorCriticConfig):
    """PPO (clipped surrogate, GAE, value model, K epochs of minibatch updates)."""

    LIMITS: ClassVar[dict[str, str]] = {"lam": "[0, 1]", "cliprange_value": "> 0", "target_approx_kl": "> 0"}

    algorithm: Literal["ppo"] = "ppo"
    """The policy-gradient algorithm of this stage (see `alignkit.losses.rl_algorithms`)."""
    lam: float = 0.95
    """GAE lambda."""
    cliprange: float = 0.2
    """Ratio clip epsilon of the surrogate (0.2: Schulman et al. 2017, Sec. 6.1)."""
    cliprange_low: float | None = None
    """Lower ratio clip: the ratio is clipped to [1 - cliprange_low, 1 + cliprange_high] (None: `cliprange`)."""
    cliprange_high: float | None = None
    """Upper ratio clip (None: `cliprange`); above `cliprange_low` it is DAPO's clip-higher (Yu et al. 2025,
    Sec. 3.1: 0.28 with 0.2)."""
    cliprange_value: float | None = 0.2
    """Value clip around the old values (None: unclipped MSE)."""
    target_approx_kl: float | None = None
    """Stop the epochs of a step early when an epoch's mean approx KL(pi_old || pi) exceeds this."""

    def targets_options(self) -> dict[str, Any]:
        return {"gamma": self.gamma, "lam": self.lam, "whiten": self.whiten_advantages}

    def loss_options(self) -> dict[str, Any]:
        return {"cliprange": self.cliprange, "cliprange_low": self.cliprange_low,
                "cliprange_high": self.cliprange_high, "cliprange_value": self.cliprange_value,
                "value_coef": self.value_coef}

    def approx_kl_limit(self) -> float | None:
        return self.target_approx_kl


@dataclass
class A2CConfig(ActorCriticConfig):
    """Advantage actor-critic (TD advantages), one update per rollout batch."""

    algorithm: Literal["a2c"] = "a2c"
    """The policy-gradient algorithm of this stage (see `alignkit.losses.rl_algorithms`)."""
    epochs: int = 1
    """Passes over each rollout batch."""
    minibatches: int = 1
    """Minibatches (optimizer steps) per pass."""

    def targets_options(self) -> dict[str, Any]:
        return {"gamma": self.gamma, "whiten": self.whiten_advantages}  # TD error: lambda is 0

    def loss_options(self) -> dict[str, Any]:
        return {"value_coef": self.value_coef}

    def approx_kl_limit(self) -> float | None:
        return None  # no ratio to pi_old in the loss: no approx KL is measured


@dataclass
class ReinforceConfig(ActorCriticConfig):
    """REINFORCE with a learned baseline, one update per rollout batch."""

    algorithm: Literal["reinforce"] = "reinforce"
    """The policy-gradient algorithm of this stage (see `alignkit.losses.rl_algorithms`)."""
    epochs: int = 1
    """Passes over each rollout batch."""
    minibatches: int = 1
    """Minibatches (optimizer steps) per pass."""

    def targets_options(self) -> dict[str, Any]:
        return {"gamma": self.gamma, "whiten": self.whiten_advantages}  # reward-to-go: lambda is 1

    def loss_options(self) -> dict[str, Any]:
        return {"value_coef": self.value_coef}

    def approx_kl_limit(self) -> float | None:
        return None  # no ratio to pi_old in the loss: no approx KL is measured


@dataclass
class RLOOConfig(RLConfig):
    """REINFORCE leave-one-out (k samples per prompt, no critic), one update per rollout batch."""

    LIMITS: ClassVar[dict[str, str]] = {"target_approx_kl": "> 0"}

    algorithm: Literal["rloo"] = "rloo"
    """The policy-gradient algorithm of this stage (see `alignkit.losses.rl_algorithms`)."""
    epochs: int = 1
    """Passes over each rollout batch."""
    minibatches: int = 1
    """Minibatches (optimizer steps) per pass."""
    cliprange: float = 0.2
    """Ratio clip epsilon of the surrogate (acts only when a batch is reused for several updates; 0.2 as in PPO,
    Schulman et al. 2017, Sec. 6.1)."""
    cliprange_low: float | None = None
    """Lower ratio clip: the ratio is clipped to [1 - cliprange_low, 1 + cliprange_high] (None: `cliprange`)."""
    cliprange_high: float | None = None
    """Upper ratio clip (None: `cliprange`); above `cliprange_low` it is DAPO's clip-higher (Yu et al. 2025,
    Sec. 3.1: 0.28 with 0.2)."""
    target_approx_kl: float | None = None
    """Stop the epochs of a step early when an epoch's mean approx KL(pi_old || pi) exceeds this."""
    whiten_advantages: bool = False
    """Normalise the leave-one-out advantages to mean 0, variance 1 over each rollout batch's response tokens (a
    departure: Ahmadian et al. 2024, Eq. 8, use the leave-one-out advantages as they are, the default)."""

    def targets_options(self) -> dict[str, Any]:
        return {"k": self.samples_per_prompt, "whiten": self.whiten_advantages}

    def loss_options(self) -> dict[str, Any]:
        return {"cliprange": self.cliprange, "cliprange_low": self.cliprange_low,
                "cliprange_high": self.cliprange_high}

    def approx_kl_limit(self) -> float | None:
        return self.target_approx_kl


@dataclass
class GRPOConfig(RLConfig):
    """GRPO (group-normalised advantages, clip, k3 KL in the loss, no critic)."""

    LIMITS: ClassVar[dict[str, str]] = {"target_approx_kl": "> 0"}

    algorithm: Literal["grpo"] = "grpo"
    """The policy-gradient algorithm of this stage (see `alignkit.losses.rl_algorithms`)."""
    epochs: int = 1
    """Passes over each rollout batch."""
    minibatches: int = 1
    """Minibatches (optimizer steps) per pass."""
    cliprange: float = 0.2
    """Ratio clip epsilon of the surrogate (Shao et al. 2024, Eq. 3, take PPO's clip; 0.2: Schulman et al.
    2017, Sec. 6.1)."""
    cliprange_low: float | None = None
    """Lower ratio clip: the ratio is clipped to [1 - cliprange_low, 1 + cliprange_high] (None: `cliprange`)."""
    cliprange_high: float | None = None
    """Upper ratio clip (None: `cliprange`); above `cliprange_low` it is DAPO's clip-higher (Yu et al. 2025,
    Sec. 3.1: 0.28 with 0.2)."""
    target_approx_kl: float | None = None
    """Stop the epochs of a step early when an epoch's mean approx KL(pi_old || pi) exceeds this."""
    advantage_scaling: Literal["group", "batch", "none"] = "group"
    """Divide each group-centred score by its group's std (GRPO: Shao et al. 2024, Sec. 4.1.2, the default),
    by the std of the whole batch's scores (all devices), or not at all (Dr. GRPO: Liu et al. 2025)."""
    loss_aggregation: Literal["sequence", "token", "fixed_length"] = "sequence"
    """How the per-token losses are averaged: each response's token mean, then the mean over responses (GRPO:
    Shao et al. 2024, Eq. 3, the default); the token mean over the batch (DAPO: Yu et al. 2025, Sec. 3.3); or
    the token sum / (responses x `sampling.max_new_tokens`) (Dr. GRPO: Liu et al. 2025)."""

    def targets_options(self) -> dict[str, Any]:
        # Centred (and scaled) per group already: not whitened again.
        return {"k": self.samples_per_prompt, "scale": self.advantage_scaling}

    def loss_options(self) -> dict[str, Any]:
        return {"cliprange": self.cliprange, "cliprange_low": self.cliprange_low,
                "cliprange_high": self.cliprange_high, "aggregation": self.loss_aggregation,
                "max_len": self.sampling.max_new_tokens}

    def approx_kl_limit(self) -> float | None:
        return self.target_approx_kl
