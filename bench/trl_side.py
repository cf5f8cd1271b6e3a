"""TRL side of the benchmark: one stage, one process, inside a TRL venv (see setup_peers.sh).

    bench/.venv-trl116/bin/python bench/trl_side.py --stage sft [--steps 24]
    bench/.venv-trl112/bin/python bench/trl_side.py --stage ppo

Trains TRL's trainer for the stage on the shared tiny model and data in bench/.work/ (built by
run.py), times every optimizer step with a TrainerCallback (on_step_end), counts forward/backward
passes and tokens with `common.Probe`, and prints one `BENCH_RESULT {json}` line.

TRL configs differ from TrainingArguments in defaults that matter here: TRL turns on gradient
checkpointing and bf16 by default; both are turned off (the benchmark is fp32, no checkpointing).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import BATCH, NEW_TOKENS, PATHS, RL_GENERATIONS, SEED  # noqa: E402

KL_COEF = 0.05  # KL-to-reference coefficient of every RL stage (so every RL stage runs a reference model)


def _common_args(steps: int, out_dir: str) -> dict[str, Any]:
    return dict(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1, learning_rate=1e-5, lr_scheduler_type="constant",
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, seed=SEED,
        logging_steps=10, save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0,
    )


def _dataset(path: Path, rename: dict[str, str] | None = None) -> Any:
    from datasets import Dataset

    rows = common.load_rows(path)
    if rename:
        rows = [{rename.get(k, k): v for k, v in row.items()} for row in rows]
    return Dataset.from_list(rows)


def _tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(PATHS.tokenizer)


def _policy() -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(PATHS.base_model, dtype="float32")


def _scorer() -> Any:
    """The tiny reward model (same trunk as the policy, scalar head)."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(PATHS.reward_model, num_labels=1, dtype="float32")


def build_sft(steps: int, out: str) -> Any:
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**_common_args(steps, out), max_length=None, packing=False, completion_only_loss=True)
    return SFTTrainer(model=_policy(), args=args, processing_class=_tokenizer(),
                      train_dataset=_dataset(PATHS.sft_data))


def build_reward(steps: int, out: str) -> Any:
    from trl import RewardConfig, RewardTrainer

    args = RewardConfig(**_common_args(steps, out), max_length=None)
    return RewardTrainer(model=_scorer(), args=args, processing_class=_tokenizer(),
                         train_dataset=_dataset(PATHS.pref_data))


def build_dpo(steps: int, out: str) -> Any:
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**_common_args(steps, out), max_length=None, beta=0.1, precompute_ref_log_probs=False)
    return DPOTrainer(model=_policy(), ref_model=None, args=args, processing_class=_tokenizer(),
                      train_dataset=_dataset(PATHS.pref_data))


def _online_args() -> dict[str, Any]:
    # per_device_train_batch_size = 8 completions = 2 prompts x 4 generations, one optimizer step
    # per generation round (steps_per_generation = accumulation = 1), one pass (num_iterations = 1).
    return dict(num_generations=RL_GENERATIONS, max_completion_length=NEW_TOKENS, beta=KL_COEF,
                num_iterations=1, temperature=1.0, top_p=1.0, top_k=0, log_completions=False)


def build_grpo(steps: int, out: str) -> Any:
    from trl import GRPOConfig, GRPOTrainer

    tok = _tokenizer()
    args = GRPOConfig(**_common_args(steps, out), **_online_args())
    return GRPOTrainer(model=_policy(), reward_funcs=_scorer(), args=args, processing_class=tok,
                       reward_processing_classes=tok, train_dataset=_dataset(PATHS.prompt_data))


def build_rloo(steps: int, out: str) -> Any:
    from trl import RLOOConfig, RLOOTrainer

    tok = _tokenizer()
    args = RLOOConfig(**_common_args(steps, out), **_online_args())
    return RLOOTrainer(model=_policy(), reward_funcs=_scorer(), args=args, processing_class=tok,
                       reward_processing_classes=tok, train_dataset=_dataset(PATHS.prompt_data))


def build_ppo(steps: int, out: str) -> Any:
    """TRL 1.12's PPOTrainer: policy, frozen reference, value model and reward model.

    Its batch: `per_device_train_batch_size` (8) rollouts per update round, one PPO epoch, one
    minibatch; `total_episodes` = steps x 8. PPO has no multiple generations per prompt: 8 prompts.
    """
    try:
        from trl import PPOConfig, PPOTrainer
    except ImportError:
        from trl.experimental.ppo import PPOConfig, PPOTrainer  # where later releases moved it

    tok = _tokenizer()
    kwargs = _common_args(steps, out)
    kwargs.pop("max_steps")
    args = PPOConfig(
        **kwargs, total_episodes=steps * BATCH, num_ppo_epochs=1, num_mini_batches=1,
        local_rollout_forward_batch_size=BATCH, response_length=NEW_TOKENS, temperature=1.0,
        kl_coef=KL_COEF, stop_token="eos", missing_eos_penalty=None, num_sample_generations=0,
    )
    prompts = _dataset(PATHS.prompt_data)
    prompts = prompts.map(lambda row: {"input_ids": tok(row["prompt"])["input_ids"]},
                          remove_columns=prompts.column_names)
    return PPOTrainer(args=args, processing_class=tok, model=_policy(), ref_model=_policy(),
                      reward_model=_scorer(), value_model=_scorer(), train_dataset=prompts)


BUILDERS = {"sft": build_sft, "reward": build_reward, "dpo": build_dpo, "grpo": build_grpo,
            "rloo": build_rloo, "ppo": build_ppo}


def timer_callback(timer_box: list) -> Any:
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Marks the time (and the probe's counters) at the end of every optimizer step."""

        def on_train_begin(self, args, state, control, **kwargs):
            timer_box.append(common.StepTimer(timer_box[0]))

        def on_step_end(self, args, state, control, **kwargs):
            timer_box[-1].mark()

    return StepClock()


def run_ppo(trainer: Any, timer_box: list) -> None:
    """TRL's PPOTrainer.train is its own loop: time it by wrapping the optimizer's step."""
    timer_box.append(common.StepTimer(timer_box[0]))
    optimizer = trainer.optimizer
    original = optimizer.step

    def step(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        timer_box[-1].mark()
        return out

    optimizer.step = step
    trainer.train()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", required=True, choices=sorted(BUILDERS))
    parser.add_argument("--steps", type=int, default=common.STEPS)
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    common.set_threads()
    import transformers
    import trl

    transformers.logging.set_verbosity_error()
    probe = common.install_probe()
    timer_box: list = [probe]
    with tempfile.TemporaryDirectory(prefix=f"trl-{args.stage}-") as out:
        trainer = BUILDERS[args.stage](args.steps, out)
        if args.stage == "ppo":
            run_ppo(trainer, timer_box)
        else:
            trainer.add_callback(timer_callback(timer_box))
            trainer.train()
    timer = timer_box[-1]
    work = timer.summary()["work_per_step"]
    common.emit(common.result_line(
        "trl", args.stage, timer,
        train_tokens_per_step=work.get("tokens/train", 0.0),
        generated_tokens_per_step=work.get("tokens/generated", 0.0),
        extra={"versions": {"trl": trl.__version__, "transformers": transformers.__version__},
               "optimizer": type(trainer.optimizer).__name__},
    ))


if __name__ == "__main__":
    main()
