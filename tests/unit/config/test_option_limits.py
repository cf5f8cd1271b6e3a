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
