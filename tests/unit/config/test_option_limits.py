"""Option values are checked against their limits when a config is resolved, before any model loads."""

from __future__ import annotations

import subprocess
import sys

import pytest

from alignkit.config import check_options, resolve_config
from alignkit.errors import AlignkitError
from alignkit.trainers.sft import SFTConfig

BAD = [
    (["--optim.max_grad_norm", "-1"], "optim.max_grad_norm", ">= 0"),  # would flip the gradients
    (["--optim.grad_accum_steps", "0"], "optim.grad_accum_steps", ">= 1"),
    (["--optim.grad_accum_steps", "-2"], "optim.grad_accum_steps", ">= 1"),
    (["--optim.max_steps", "-5"], "optim.max_steps", ">= 0"),
    (["--optim.max_steps", "0", "--optim.epochs", "0"], "optim", "nothing would be trained"),
    (["--data.limit", "-5"], "data.limit", ">= 1"),
    (["--run.keep_last", "0"], "run.keep_last", ">= 1"),
    (["--model.lora_r", "-4"], "model.lora_r", ">= 0"),
    (["--optim.warmup_steps", "-1"], "optim.warmup_steps", ">= 0"),
    (["--run.save_every", "-1"], "run.save_every", ">= 0"),
    (["--run.log_every", "0"], "run.log_every", ">= 1"),
    (["--optim.per_device_batch_size", "0"], "optim.per_device_batch_size", ">= 1"),
    (["--optim.per_device_batch_size", "-1"], "optim.per_device_batch_size", ">= 1"),
    (["--optim.lr", "-1e-3"], "optim.lr", "> 0"),
    (["--optim.lr", "nan"], "optim.lr", "finite"),
    (["--optim.adam_beta1", "1.5"], "optim.adam_beta1", "[0, 1)"),
    (["--data.eval_fraction", "1"], "data.eval_fraction", "[0, 1)"),
    (["--optim.adam_eps", "0"], "optim.adam_eps", "> 0"),
]


@pytest.mark.parametrize(("argv", "key", "expected"), BAD)
def test_out_of_range_values_are_errors_naming_the_option(argv, key, expected):
    with pytest.raises(AlignkitError, match=None) as info:
        resolve_config(SFTConfig, None, argv)
    message = str(info.value)
    assert f"`{key}`" in message and expected in message


def test_limits_hold_for_yaml_too(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: -0.1\n")
    with pytest.raises(AlignkitError, match=r"option `optim.lr`: expected a value > 0, got -0.1"):
        resolve_config(SFTConfig, path, [])


def test_in_range_values_and_unset_options_pass():
    cfg = resolve_config(SFTConfig, None, ["--optim.max_grad_norm", "0", "--data.limit", "null",
                                           "--optim.adam_beta1", "0", "--optim.epochs", "0", "--optim.max_steps", "3"])
    assert cfg.optim.max_grad_norm == 0 and cfg.data.limit is None
    check_options(SFTConfig())  # the defaults pass


def test_min_new_tokens_above_max_is_an_error():
    from alignkit.trainers.dpo import DPOConfig

    with pytest.raises(AlignkitError, match="`min_new_tokens` \\(30\\) exceeds `max_new_tokens` \\(24\\)"):
        resolve_config(DPOConfig, None, ["--sampling.min_new_tokens", "30"])


def test_the_cli_prints_one_line_and_exits_2_before_loading_a_model(tmp_path):
    res = subprocess.run([sys.executable, "-m", "alignkit.cli", "sft", "--model.name_or_path", str(tmp_path / "none"),
                          "--data.path", str(tmp_path / "none.jsonl"), "--optim.lr", "-1e-3"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "option `optim.lr`: expected a value > 0, got -0.001" in res.stderr


def test_help_shows_each_limit():
    from alignkit.config import format_help

    text = format_help(SFTConfig)
    assert "--optim.lr float (default: 0.0001; > 0)" in text
    assert "--optim.adam_beta1 float (default: 0.9; [0, 1))" in text


def test_a_binary_config_file_is_one_error_naming_it(tmp_path):
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(AlignkitError, match=r"bin.yaml is not UTF-8 text \(byte 0xff at offset 0\)"):
        resolve_config(SFTConfig, path, [])


# The stages' own options (issue 19: values that crashed after the models loaded, or were silently taken).
def _stage(module: str, name: str) -> type:
    import importlib

    return getattr(importlib.import_module(module), name)


PPO = ("alignkit.trainers.rl_config", "PPOConfig")
GRPO = ("alignkit.trainers.rl_config", "GRPOConfig")
A2C = ("alignkit.trainers.rl_config", "A2CConfig")
PRETRAIN = ("alignkit.trainers.pretrain", "PretrainConfig")
BEST_OF_N = ("alignkit.stages.best_of_n", "BestOfNConfig")
STAGE_BAD = [
    (PPO, ["--kl.target", "-1"], "kl.target", "> 0"),  # a traceback from the KL controller
    (PPO, ["--kl.horizon", "0"], "kl.horizon", "> 0"),
    (PPO, ["--eval_batch_size", "0"], "eval_batch_size", ">= 1"),  # range() arg 3 must not be zero
    (PPO, ["--reward.batch_size", "0"], "reward.batch_size", ">= 1"),
    (BEST_OF_N, ["--batch_size", "0"], "batch_size", ">= 1"),
    (PRETRAIN, ["--block_size", "0"], "block_size", ">= 2"),  # ZeroDivisionError
    (PRETRAIN, ["--block_size", "-3"], "block_size", ">= 2"),
    (PPO, ["--value_coef", "-1"], "value_coef", ">= 0"),  # would flip the value loss
    (A2C, ["--value_coef", "-1"], "value_coef", ">= 0"),
    (PPO, ["--kl.coef", "-1"], "kl.coef", ">= 0"),  # a KL bonus instead of a penalty
    (GRPO, ["--kl.coef", "-0.5"], "kl.coef", ">= 0"),
    (PPO, ["--lam", "-1"], "lam", "[0, 1]"),
    (PPO, ["--lam", "1.5"], "lam", "[0, 1]"),
    (PPO, ["--gamma", "1.5"], "gamma", "[0, 1]"),
    (PPO, ["--n_samples", "-1"], "n_samples", ">= 0"),
    (PPO, ["--eval_prompts", "-1"], "eval_prompts", ">= 0"),  # quietly meant 0
    (GRPO, ["--epochs", "0"], "epochs", ">= 1"),
    (PPO, ["--optim.max_steps", "0"], "optim.max_steps", ">= 1"),  # the RL steps
    (PRETRAIN, ["--eval_blocks", "-1"], "eval_blocks", ">= 0"),
    (BEST_OF_N, ["--max_prompts", "-4"], "max_prompts", ">= 0"),  # quietly meant all of them
    (BEST_OF_N, ["--n", "0"], "n", ">= 1"),
    (("alignkit.trainers.dpo", "DPOConfig"), ["--beta", "0"], "beta", "> 0"),
    (("alignkit.trainers.dpo", "DPOConfig"), ["--label_smoothing", "0.7"], "label_smoothing", "[0, 0.5)"),
    (("alignkit.trainers.reward", "RewardConfig"), ["--members", "0"], "members", ">= 1"),
    (("alignkit.trainers.sft", "SFTConfig"), ["--n_samples", "-2"], "n_samples", ">= 0"),
    (("alignkit.stages.rejection_sampling", "RejectionSamplingConfig"), ["--n", "1"], "n", ">= 2"),
    (("alignkit.stages.eval", "EvalConfig"), ["--n_prompts", "0"], "n_prompts", ">= 1"),
    (("alignkit.stages.label", "LabelConfig"), ["--tau", "-1"], "tau", ">= 0"),
]


@pytest.mark.parametrize(("stage", "argv", "key", "expected"), STAGE_BAD,
                         ids=[f"{stage[1]}{argv[0]}={argv[1]}" for stage, argv, _, _ in STAGE_BAD])
def test_out_of_range_stage_options_are_one_error_at_start_up(stage, argv, key, expected):
    with pytest.raises(AlignkitError) as info:
        resolve_config(_stage(*stage), None, argv)
    message, _, got = str(info.value).rpartition(", got ")
    assert message == f"option `{key}`: expected a value {expected}" and float(got) == float(argv[1])


@pytest.mark.parametrize(("stage", "argv"), [
    (PPO, ["--n_samples", "0", "--eval_prompts", "0", "--kl.coef", "0", "--lam", "1", "--gamma", "0"]),
    (BEST_OF_N, ["--max_prompts", "0"]),  # 0: all prompts
    (PRETRAIN, ["--eval_blocks", "0", "--block_size", "2"]),
])
def test_zeros_that_mean_none_or_all_and_the_bounds_pass(stage, argv):
    resolve_config(_stage(*stage), None, argv)


def test_help_shows_the_stage_limits_and_those_of_the_classes_a_part_extends():
    from alignkit.config import format_help

    text = format_help(_stage(*PPO))
    for line in ["--kl.target float (default: 6.0; > 0)", "--lam float (default: 0.95; [0, 1])",
                 "--value_coef float (default: 0.5; >= 0)", "--eval_batch_size int (default: 64; >= 1)",
                 "--reward.batch_size int (default: 64; >= 1)", "--reward.workers int (default: 0; >= 0)",
                 "--optim.max_steps int (default: 100; >= 1)", "--optim.lr float (default: 3e-05; > 0)"]:
        assert line in text, line
    assert "--block_size int (default: 128; >= 2)" in format_help(_stage(*PRETRAIN))


def test_pretrain_with_no_eval_blocks_reports_no_held_out_loss(tmp_path, tiny_llama_dir):
    import json

    from tests.conftest import TINY_TEXTS

    from alignkit.trainers import pretrain

    corpus = tmp_path / "text.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{t} number {i}."}) + "\n" for i in range(10) for t in TINY_TEXTS))
    cfg = resolve_config(pretrain.PretrainConfig, None, [
        "--model.name_or_path", str(tiny_llama_dir), "--data.path", str(corpus), "--data.eval_fraction", "0.2",
        "--output-dir", str(tmp_path / "run"), "--block_size", "16", "--optim.max_steps", "1", "--eval_blocks", "0",
        "--run.report_to", "[]", "--run.progress", "false"])
    summary = pretrain.run(cfg)
    assert "eval/loss" not in summary and "eval/perplexity" not in summary  # was a loss of 0.0, perplexity 1.0
