"""alignkit side of the benchmark: one stage, one process, in alignkit's own venv.

    .venv/bin/python bench/alignkit_side.py --stage sft [--steps 24]

Runs `alignkit.trainers.<stage>.run(config)` in-process on the shared tiny model and data in
bench/.work/ (built by run.py), with the same sizes as the TRL side. Every optimizer step is timed
by wrapping `TrainLoop.end_step` (the clock starts at `TrainLoop.resume`, just before the loop), the
work is counted by `common.Probe`, and one `BENCH_RESULT {json}` line is printed. A stage whose
module does not exist yet prints a result with `"available": false` instead of failing.

The config of each stage is built through `alignkit.config.resolve_config` from command-line style
overrides, so a renamed option fails with alignkit's own message naming the key.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import BATCH, NEW_TOKENS, PATHS, RL_GENERATIONS, RL_PROMPTS, SEED  # noqa: E402

KL_COEF = 0.05  # as trl_side.KL_COEF

# stage -> (module, config class, data file, stage-specific overrides).
def _rl(prompts: int, generations: int, extra: list[str]) -> list[str]:
    """The RL stages' options: reward model, fixed KL coefficient, one epoch, no evaluation."""
    return ["--reward.model", str(PATHS.reward_model), "--kl.coef", str(KL_COEF), "--kl.adaptive", "false",
            "--prompts_per_step", str(prompts), "--samples_per_prompt", str(generations),
            "--sampling.max_new_tokens", str(NEW_TOKENS), "--epochs", "1", "--minibatches", "1", "--eval_prompts", "0",
            *extra]


STAGE_SPECS: dict[str, tuple[str, str, Path, list[str]]] = {
    "sft": ("alignkit.trainers.sft", "SFTConfig", PATHS.sft_data, ["--n_samples", "0"]),
    "reward": ("alignkit.trainers.reward", "RewardConfig", PATHS.pref_data, ["--normalize", "false"]),
    "dpo": ("alignkit.trainers.dpo", "DPOConfig", PATHS.pref_data, ["--beta", "0.1"]),
    "ppo": ("alignkit.trainers.rl", "PPOConfig", PATHS.prompt_data, _rl(BATCH, 1, [])),
    "rloo": ("alignkit.trainers.rl", "RLOOConfig", PATHS.prompt_data, _rl(RL_PROMPTS, RL_GENERATIONS, [])),
    "grpo": ("alignkit.trainers.rl", "GRPOConfig", PATHS.prompt_data, _rl(RL_PROMPTS, RL_GENERATIONS, [])),
}


def stage_argv(stage: str, steps: int, out_dir: str, accel: str = "auto") -> list[str]:
    _, _, data, extra = STAGE_SPECS[stage]
    model = PATHS.reward_model if stage == "reward" else PATHS.base_model
    return [
        "--model.name_or_path", str(model), "--model.dtype", "float32",
        "--data.path", str(data), "--data.max_length", "128",
        "--optim.per_device_batch_size", str(BATCH), "--optim.grad_accum_steps", "1",
        "--optim.max_steps", str(steps), "--optim.lr", "1e-5", "--optim.scheduler", "constant",
        "--optim.warmup_steps", "0",
        "--run.output_dir", out_dir, "--run.seed", str(SEED), "--run.log_every", "10",
        "--run.eval_every", "0", "--run.progress", "false", "--run.report_to", "[]", "--run.accel", accel,
        *extra,
    ]


def stage_available(stage: str) -> bool:
    return importlib.util.find_spec(STAGE_SPECS[stage][0]) is not None


def instrument(timer_box: list) -> None:
    """Start the clock at `TrainLoop.resume` and mark it at every `TrainLoop.end_step`."""
    from alignkit.trainers.loop import TrainLoop

    resume, end_step = TrainLoop.resume, TrainLoop.end_step

    def timed_resume(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = resume(self, *args, **kwargs)
        timer_box.append(common.StepTimer(timer_box[0]))
        return out

    def timed_end_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        timer_box[-1].mark()
        return end_step(self, *args, **kwargs)

    TrainLoop.resume, TrainLoop.end_step = timed_resume, timed_end_step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", required=True, choices=sorted(STAGE_SPECS))
    parser.add_argument("--steps", type=int, default=common.STEPS)
    parser.add_argument("--accel", default="auto", choices=["auto", "cpu", "plain"], help="`--run.accel`")
    args = parser.parse_args(argv)
    if not stage_available(args.stage):
        common.emit({"side": "alignkit", "stage": args.stage, "available": False,
                     "reason": "alignkit stage not available yet"})
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    common.set_threads()
    import transformers

    from alignkit.config import resolve_config

    transformers.logging.set_verbosity_error()
    module_name, cls_name, _, _ = STAGE_SPECS[args.stage]
    module = importlib.import_module(module_name)
    probe = common.install_probe()
    timer_box: list = [probe]
    instrument(timer_box)
    with tempfile.TemporaryDirectory(prefix=f"alignkit-{args.stage}-") as out:
        try:
            cfg = resolve_config(getattr(module, cls_name), None, stage_argv(args.stage, args.steps, out, args.accel))
            module.run(cfg)
        except Exception as err:  # reported by the driver; the benchmark goes on with other stages
            traceback.print_exc()
            common.emit({"side": "alignkit", "stage": args.stage, "available": True,
                         "error": f"{type(err).__name__}: {err}"})
            return
    if len(timer_box) < 2:
        common.emit({"side": "alignkit", "stage": args.stage, "available": True,
                     "error": "no TrainLoop.resume call seen: cannot time the steps"})
        return
    timer = timer_box[-1]
    work = timer.summary()["work_per_step"]
    common.emit(common.result_line(
        "alignkit", args.stage, timer,
        train_tokens_per_step=work.get("tokens/train", 0.0),
        generated_tokens_per_step=work.get("tokens/generated", 0.0),
        extra={"available": True, "versions": {"transformers": transformers.__version__}},
    ))


if __name__ == "__main__":
    main()
