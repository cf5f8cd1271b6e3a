"""The RL stages' options reach the maths: GRPO's loss aggregation and advantage scaling, clip-higher, RLOO's
whitening default, the start-up checks (`rl._check`), the minibatch / micro-batch split and the plan."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from alignkit.config import SamplingConfig, format_help
from alignkit.errors import AlignkitError
from alignkit.losses.kl import FixedKLController
from alignkit.losses.rl_algorithms import ALGORITHMS
from alignkit.rollout.types import Rollout
from alignkit.trainers import rl, rl_setup
from alignkit.trainers.rl_config import (
    A2CConfig,
    GRPOConfig,
    PPOConfig,
    ReinforceConfig,
    RewardSourceConfig,
    RLOOConfig,
    RLOptimConfig,
)

CONFIGS = {"ppo": PPOConfig, "a2c": A2CConfig, "reinforce": ReinforceConfig, "rloo": RLOOConfig, "grpo": GRPOConfig}
GOLD = RewardSourceConfig(gold_world="sentiment")  # the reward check passes; nothing is loaded by `_check`


def config(name: str, **options):
    return CONFIGS[name](reward=GOLD, **options)


def doc_of(help_text: str, option: str) -> str:
    """The documentation line under `option` in `format_help`'s text."""
    lines = help_text.splitlines()
    return next(lines[i + 1] for i, line in enumerate(lines) if line.strip().startswith(option + " "))


# ---------------------------------------------------------------------------------------------
# Start-up checks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["rloo", "grpo"])
def test_a_group_of_one_is_a_config_error_naming_the_option(name):
    with pytest.raises(AlignkitError, match="option `samples_per_prompt`.*needs >= 2.*got 1"):
        rl_setup._check(config(name, samples_per_prompt=1))
    rl_setup._check(config(name, samples_per_prompt=2))


@pytest.mark.parametrize("name", ["ppo", "a2c", "reinforce"])
def test_one_sample_per_prompt_is_fine_without_a_group_baseline(name):
    rl_setup._check(config(name, samples_per_prompt=1))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_grad_accum_steps_is_refused_by_the_rl_stages(name):
    # It used to be accepted and ignored: GRPO with 1 and with 4 trained identical weights.
    cfg = config(name)
    cfg.optim.grad_accum_steps = 4
    with pytest.raises(AlignkitError, match=r"option `optim.grad_accum_steps` \(4\).*`minibatches`"):
        rl_setup._check(cfg)


def test_rl_help_says_what_the_batch_options_do():
    text = format_help(GRPOConfig)
    assert "per device x accum x devices" not in text  # the SFT loop's meaning, which RL never had
    assert "must be 1" in doc_of(text, "--optim.grad_accum_steps")
    assert "accumulated into one optimizer step" in text  # per_device_batch_size
    for option in ["loss_aggregation", "advantage_scaling", "cliprange_low", "cliprange_high"]:
        assert f"--{option}" in text
    assert "--loss_aggregation" not in format_help(RLOOConfig)  # only GRPO's loss has the option


@pytest.mark.parametrize(("name", "option", "value"), [("ppo", "cliprange_low", 1.0), ("rloo", "cliprange_high", -0.1),
                                                       ("grpo", "cliprange", -0.2)])
def test_clip_ranges_are_checked(name, option, value):
    with pytest.raises(AlignkitError, match=f"option `{option}`"):
        rl_setup._check(config(name, **{option: value}))


# ---------------------------------------------------------------------------------------------
# Defaults, with their sources
# ---------------------------------------------------------------------------------------------


def test_rloo_does_not_whiten_by_default_as_in_the_paper():
    cfg = config("rloo", samples_per_prompt=3)
    assert cfg.targets_options() == {"k": 3, "whiten": False}
    assert "Ahmadian" in doc_of(format_help(RLOOConfig), "--whiten_advantages")
    # Sequence rewards (1, 2, 6) of one prompt (score at the last token): leave-one-out (-3, -1.5, 4.5), as they are.
    rewards = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, 6.0]])
    mask = torch.tensor([[True, True], [True, False], [True, True]])
    advantages, _ = ALGORITHMS["rloo"].targets(rewards, None, None, mask, **cfg.targets_options())
    assert_close(advantages, torch.tensor([[-3.0, -3.0], [-1.5, 0.0], [4.5, 4.5]]))
    whitened, _ = ALGORITHMS["rloo"].targets(rewards, None, None, mask, k=3, whiten=True)
    assert_close(whitened[mask].mean(), torch.tensor(0.0), atol=1e-6, rtol=0)  # the option still whitens


def test_grpo_defaults_are_the_papers():
    cfg = config("grpo", sampling=SamplingConfig(max_new_tokens=7))
    assert cfg.targets_options() == {"k": 4, "scale": "group"}
    assert cfg.loss_options() == {"cliprange": 0.2, "cliprange_low": None, "cliprange_high": None,
                                  "aggregation": "sequence", "max_len": 7}


@pytest.mark.parametrize(
    ("scaling", "expected"),
    [
        ("group", [-1.0, 0.0, 1.0, -1.0, 0.0, 1.0]),  # stds 1 and 2 (eps 1e-4 aside)
        ("batch", [-0.383482, 0.0, 0.383482, -0.766965, 0.0, 0.766965]),  # std of all six, 2.607681
        ("none", [-1.0, 0.0, 1.0, -2.0, 0.0, 2.0]),  # Dr. GRPO: centred only
    ],
)
def test_grpo_advantage_scaling_option_reaches_the_estimator(scaling, expected):
    cfg = config("grpo", samples_per_prompt=3, advantage_scaling=scaling)
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 6.0, 8.0])  # groups (1, 2, 3) and (4, 6, 8)
    mask = torch.tensor([[True, False]] * 6)
    advantages, _ = ALGORITHMS["grpo"].targets(torch.zeros(6, 2), None, scores, mask, batch_scores=scores,
                                               **cfg.targets_options())
    assert_close(advantages[:, 0], torch.tensor(expected), atol=3e-4, rtol=0)
    assert (advantages[:, 1] == 0).all()


@pytest.mark.parametrize("name", ["ppo", "rloo", "grpo"])
def test_clip_higher_reaches_every_clipped_loss(name):
    # The asymmetric-clip batch of test_policy_losses: eps_low 0.1, eps_high 0.3 -> -0.5375 (symmetric 0.2: -0.5125).
    old = torch.full((1, 4), -1.0)
    logprobs = old + torch.log(torch.tensor([[1.4, 1.25, 0.85, 0.5]]))
    zeros = torch.zeros(1, 4)
    batch = {"old_logprobs": old, "ref_logprobs": logprobs, "advantages": torch.tensor([[1.0, 1.0, -1.0, 1.0]]),
             "response_mask": torch.ones(1, 4, dtype=torch.bool), "old_values": zeros, "returns": zeros}
    extra = {"loss_aggregation": "token"} if name == "grpo" else {}
    for options, expected in [({"cliprange_low": 0.1, "cliprange_high": 0.3}, -0.5375), ({}, -0.5125)]:
        cfg = config(name, **options, **extra)
        loss, _ = ALGORITHMS[name].loss(logprobs, zeros, batch, kl_coef=0.0, **cfg.loss_options())
        assert_close(loss, torch.tensor(expected), msg=f"{name} {options}")


# ---------------------------------------------------------------------------------------------
# The update: minibatches, micro-batches and the loss aggregation, through `update_epochs`
# ---------------------------------------------------------------------------------------------

# Four responses (T = 3). On-policy with kl_coef 0 the per-token GRPO loss is -A:
#   row 0: A = (2)        sum -2, mean -2
#   row 1: A = (1, 2, 6)  sum -9, mean -3
#   row 2: A = (4, 0)     sum -4, mean -2
#   row 3: A = (-3, -3, 0) sum 6, mean  2
ADVANTAGES = torch.tensor([[2.0, 0, 0], [1, 2, 6], [4, 0, 0], [-3, -3, 0]])
MASK = torch.tensor([[True, False, False], [True, True, True], [True, True, False], [True, True, True]])
BY_HAND = {
    "token": -9 / 9,  # token sum -9 over 9 tokens (DAPO)
    "sequence": (-2 - 3 - 2 + 2) / 4,  # mean of the response means = -1.25 (GRPO, Eq. 3)
    "fixed_length": -9 / (4 * 4),  # -9 over 4 responses x max_new_tokens 4 = -0.5625 (Dr. GRPO)
}


class StubLoop:
    """`TrainLoop.update`'s protocol on one process: sum the micro-batches' loss sums, divide once by their terms."""

    def __init__(self) -> None:
        self.accelerator = SimpleNamespace(process_index=0)
        self.model = lambda rollout, temperature: (rollout.logprobs, None, None)
        self.minibatch_rows: list[list[int]] = []
        self.losses: list[float] = []
        self.advanced = 0

    def update(self, parts, loss_fn, advance=True):
        sums = [loss_fn(self.model, part)[0] for part in parts]
        self.minibatch_rows.append([part["rollout"].batch_size for part in parts])
        self.losses.append(float(sum(sums) / sum(part["n_terms"] for part in parts)))
        return {"loss/total": self.losses[-1]}

    def advance(self):
        self.advanced += 1


def _update(cfg, rows: int = 4):
    logprobs = torch.full((rows, 3), -1.0)
    mask = MASK.repeat(rows // 4 or 1, 1)[:rows]
    rollout = Rollout(prompt_ids=torch.ones(rows, 1, dtype=torch.long), prompt_mask=torch.ones(rows, 1, dtype=torch.bool),
                      response_ids=torch.ones(rows, 3, dtype=torch.long), response_mask=mask,
                      logprobs=torch.where(mask, logprobs, 0.0), ends_with_eos=torch.ones(rows, dtype=torch.bool),
                      lengths=mask.sum(1))
    exp = {"old_logprobs": rollout.logprobs, "ref_logprobs": rollout.logprobs, "response_mask": mask,
           "advantages": ADVANTAGES.repeat(rows // 4 or 1, 1)[:rows], "returns": torch.zeros(rows, 3),
           "old_values": torch.zeros(rows, 3), "entropy": torch.zeros(rows, 3), "scores": torch.zeros(rows)}
    loop = StubLoop()
    ctx = SimpleNamespace(cfg=cfg, loop=loop, algo=ALGORITHMS[cfg.algorithm])
    metrics = rl.update_epochs(ctx, rollout, exp, step=0, kl_coef=0.0)
    return loop, metrics


@pytest.mark.parametrize("aggregation", list(BY_HAND))
@pytest.mark.parametrize("micro", [1, 2, 3, 4])
def test_grpo_aggregation_by_hand_whatever_the_micro_batches(aggregation, micro):
    cfg = config("grpo", loss_aggregation=aggregation, minibatches=1, prompts_per_step=2, samples_per_prompt=2,
                 sampling=SamplingConfig(max_new_tokens=4), optim=RLOptimConfig(per_device_batch_size=micro, max_steps=1))
    loop, _ = _update(cfg)
    assert loop.minibatch_rows == [[micro] * (4 // micro) + ([4 % micro] if 4 % micro else [])]
    assert loop.losses == [pytest.approx(BY_HAND[aggregation], abs=1e-6)]


def test_minibatches_are_as_many_as_asked_and_the_plan_says_so():
    # 8 responses in 5 minibatches: 2, 2, 2, 1, 1 (a ceil-sized split would make 4 of 2), each one optimizer step.
    cfg = config("grpo", minibatches=5, epochs=2, prompts_per_step=4, samples_per_prompt=2,
                 optim=RLOptimConfig(per_device_batch_size=1, max_steps=3))
    loop, metrics = _update(cfg, rows=8)
    assert [sum(rows) for rows in loop.minibatch_rows] == [2, 2, 2, 1, 1] * 2
    assert [len(rows) for rows in loop.minibatch_rows] == [2, 2, 2, 1, 1] * 2  # micro-batches of 1, accumulated
    assert loop.advanced == 1 and metrics["policy/epochs"] == 2
    assert rl_setup.minibatch_sizes(8, 5) == [2, 2, 2, 1, 1]

    printed: list[str] = []
    ctx = SimpleNamespace(cfg=cfg, algo=ALGORITHMS["grpo"], prompts=["p"] * 10, eval_prompts=[],
                          kl_ctl=FixedKLController(0.05), scorer=None,
                          loop=SimpleNamespace(out_dir="runs/x", world=2, total_steps=3,
                                               accelerator=SimpleNamespace(print=printed.append)))
    rl.print_plan(ctx)
    plan = printed[0]
    assert "4 prompts x 2 samples x 2 device(s) = 16 responses per step" in plan
    assert "2 epoch(s) x 5 minibatch(es) = 10 optimizer steps per step" in plan
    assert ("optimizer step: 1-2 responses per device x 2 device(s) = 2-4 responses, accumulated over 1-2 "
            "micro-batch(es) of <= 1 (optim.per_device_batch_size)") in plan
    assert "aggregation=sequence" in plan and "scale=group" in plan


def test_the_plan_of_an_even_split():
    cfg = config("ppo", minibatches=2, prompts_per_step=16, samples_per_prompt=4,
                 optim=RLOptimConfig(per_device_batch_size=8, max_steps=3))
    printed: list[str] = []
    ctx = SimpleNamespace(cfg=cfg, algo=ALGORITHMS["ppo"], prompts=["p"] * 64, eval_prompts=[],
                          kl_ctl=FixedKLController(0.05),
                          loop=SimpleNamespace(out_dir="runs/x", world=1, total_steps=3,
                                               accelerator=SimpleNamespace(print=printed.append)))
    rl.print_plan(ctx)
    assert ("optimizer step: 32 responses per device x 1 device(s) = 32 responses, accumulated over 4 "
            "micro-batch(es) of <= 8") in printed[0]
