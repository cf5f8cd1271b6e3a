"""Stages that do not train with the loop (label, best-of-N, rejection sampling, eval, task), and the table of all stages.

`STAGES` maps each CLI stage to its module, config class and one-line description; every module has
`run(config)`. The CLI and the pipeline read it.
"""

from __future__ import annotations

# stage -> (module, config class, one-line description). Modules are imported only when used,
# so `alignkit --help` is fast.
STAGES: dict[str, tuple[str, str, str]] = {
    "pretrain": ("alignkit.trainers.pretrain", "PretrainConfig", "causal LM training on raw text {text}"),
    "sft": ("alignkit.trainers.sft", "SFTConfig", "supervised fine-tuning on {prompt, completion} or {messages}"),
    "label": ("alignkit.stages.label", "LabelConfig", "sample K responses per prompt and label them (pairs, "
              "choices, rankings, ratings)"),
    "reward": ("alignkit.trainers.reward", "RewardConfig", "train a (normalised) reward model or ensemble on feedback"),
    "ppo": ("alignkit.trainers.rl", "PPOConfig", "PPO from a reward model or gold scorer, KL to the reference"),
    "rloo": ("alignkit.trainers.rl", "RLOOConfig", "REINFORCE leave-one-out (k samples per prompt, no critic)"),
    "grpo": ("alignkit.trainers.rl", "GRPOConfig", "GRPO (group-normalised advantages, k3 KL in the loss)"),
    "reinforce": ("alignkit.trainers.rl", "ReinforceConfig", "REINFORCE with a learned baseline"),
    "a2c": ("alignkit.trainers.rl", "A2CConfig", "advantage actor-critic (TD advantages)"),
    "dpo": ("alignkit.trainers.dpo", "DPOConfig", "DPO family (sigmoid, ipo, cdpo, simpo, orpo, kto, plackett_luce), "
            "offline or online"),
    "best-of-n": ("alignkit.stages.best_of_n", "BestOfNConfig", "sample N per prompt, keep the best by a scorer; "
                  "reward and KL per N"),
    "rejection-sampling": ("alignkit.stages.rejection_sampling", "RejectionSamplingConfig",
                           "rounds of best-of-N winners -> SFT"),
    "eval": ("alignkit.stages.eval", "EvalConfig", "policies on held-out prompts: gold +- CI, proxy, exact KL, win rate, "
             "diversity, length"),
    "report": ("alignkit.report", "ReportConfig", "HTML report (reward-KL frontier, over-optimisation, samples) "
               "+ summary.json"),
    "task": ("alignkit.stages.task", "TaskConfig", "write a generated task's data (arithmetic: SFT solutions, "
             "prompts with answers)"),
    "pipeline": ("alignkit.pipeline", "PipelineConfig", "chain the stages with caching (`--only`, `--from`)"),
}
