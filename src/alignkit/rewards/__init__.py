"""Rewards as code: reward functions (the user's and built-ins), loaded by name and called in batches.

`functions` loads and calls them (`load_function`, `FunctionRunner`), `builtins` holds the built-ins
(answer match, format, length and repetition penalties), `config` the options a stage exposes
(`RewardFunctionsConfig`). Combining them with a reward model is `alignkit.rollout.reward_mix`.
"""
