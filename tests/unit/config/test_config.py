"""Config parsing: YAML + command line, dotted keys, types, unknown-key errors, help text."""

from dataclasses import dataclass, field, fields

import pytest
import yaml

from alignkit.config import (
    DataConfig,
    OptimConfig,
    RunConfig,
    field_docs,
    format_help,
    parse_overrides,
    resolve_config,
)
from alignkit.errors import AlignkitError
from alignkit.trainers.rundir import config_yaml


@dataclass
class StageConfig:
    """A stage for the tests."""

    run: RunConfig = field(default_factory=RunConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    beta: float = 0.1
    """KL coefficient."""
    steps: list[int] = field(default_factory=lambda: [1, 2])
    """Some steps."""


def write(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_yaml_then_command_line_wins(tmp_path):
    path = write(tmp_path, {"beta": 0.5, "optim": {"lr": 3e-4, "max_steps": 7}})
    cfg = resolve_config(StageConfig, path, ["--optim.lr", "1e-5", "--beta=0.25"])
    assert cfg.optim.lr == 1e-5  # command line beats YAML
    assert cfg.optim.max_steps == 7  # YAML beats default
    assert cfg.beta == 0.25
    assert cfg.run.seed == 0  # default


def test_types_are_coerced_and_checked():
    cfg = resolve_config(StageConfig, None, ["--run.resume", "--steps", "3,4,5", "--run.output-dir", "x",
                                             "--data.limit", "none", "--run.on_nonfinite", "skip"])
    assert cfg.run.resume is True and cfg.steps == [3, 4, 5] and cfg.run.output_dir == "x"
    assert cfg.data.limit is None and cfg.run.on_nonfinite == "skip"
    assert resolve_config(StageConfig, None, ["--steps", "[6, 7]"]).steps == [6, 7]  # YAML flow style
    assert resolve_config(StageConfig, None, ["--steps", "[]"]).steps == []
    with pytest.raises(AlignkitError, match=r"`steps`: cannot read '\[1, 2' as a list"):
        resolve_config(StageConfig, None, ["--steps", "[1, 2"])
    with pytest.raises(AlignkitError, match=r"`optim.max_steps`: expected int, got 'ten'"):
        resolve_config(StageConfig, None, ["--optim.max_steps", "ten"])
    with pytest.raises(AlignkitError, match=r"`run.on_nonfinite`: 'skp' is not one of .*did you mean 'skip'"):
        resolve_config(StageConfig, None, ["--run.on_nonfinite", "skp"])


def test_leaf_name_shortcut_when_unambiguous():
    cfg = resolve_config(StageConfig, None, ["--output-dir", "out", "--resume", "--lr", "0.5"])
    assert cfg.run.output_dir == "out" and cfg.run.resume and cfg.optim.lr == 0.5


def test_unknown_key_in_yaml_names_key_and_suggests(tmp_path):
    path = write(tmp_path, {"optim": {"lrr": 1e-3}})
    with pytest.raises(AlignkitError) as err:
        resolve_config(StageConfig, path)
    assert "unknown option `optim.lrr`" in str(err.value)
    assert "optim.lr" in str(err.value) and str(path) in str(err.value)


def test_unknown_key_on_command_line_suggests():
    with pytest.raises(AlignkitError, match=r"unknown option `--optim.lrr`.*--optim.lr"):
        parse_overrides(StageConfig, ["--optim.lrr", "1"])
    with pytest.raises(AlignkitError, match=r"unknown option `--bta`.*--beta"):
        parse_overrides(StageConfig, ["--bta", "1"])
    with pytest.raises(AlignkitError, match="needs a value"):
        parse_overrides(StageConfig, ["--beta"])


def test_each_suggestion_for_an_unknown_option_is_named_once():
    from alignkit.trainers.dpo import DPOConfig

    with pytest.raises(AlignkitError) as err:
        parse_overrides(DPOConfig, ["--loss_type", "cdpo"])  # `loss` is a key and its own leaf name
    hints = str(err.value).split("did you mean ")[1].split("?")[0].split(", ")
    assert "--loss" in hints and len(hints) == len(set(hints)), hints


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(AlignkitError, match="nope.yaml does not exist"):
        resolve_config(StageConfig, tmp_path / "nope.yaml")


def test_a_yaml_syntax_error_is_one_line_naming_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [1, 2\n  x: 3\n")
    with pytest.raises(AlignkitError) as info:
        resolve_config(StageConfig, bad)
    message = str(info.value)
    assert message == (f"config file {bad} is not valid YAML: line 3, column 4: expected ',' or ']', but got ':' "
                       "(while parsing a flow sequence)")
    assert "\n" not in message and "<unicode string>" not in message


def test_help_lists_every_field_with_default_and_doc():
    text = format_help(StageConfig)
    assert "--beta float (default: 0.1)" in text and "KL coefficient." in text
    assert "--optim.lr float (default: 0.0001; > 0)" in text
    assert field_docs(OptimConfig)["lr"] == "Peak learning rate of AdamW."
    for f in fields(RunConfig):
        assert f"--run.{f.name} " in text
    assert "LIMITS" not in text


@dataclass
class CustomDefaults:
    """A stage whose parts have their own defaults."""

    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=50))


def test_a_stage_s_part_defaults_survive_partial_settings(tmp_path):
    cfg = resolve_config(CustomDefaults, write(tmp_path, {"optim": {"max_steps": 5}}), ["--optim.epochs", "2"])
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.max_steps, cfg.optim.epochs) == (1e-3, 50, 5, 2.0)
    assert "--optim.lr float (default: 0.001; > 0)" in format_help(CustomDefaults)


def test_saved_config_round_trips(tmp_path):
    cfg = resolve_config(StageConfig, None, ["--beta", "0.3", "--optim.lr", "2e-5"])
    (tmp_path / "config.yaml").write_text(config_yaml(cfg))  # as run dirs save it
    assert resolve_config(StageConfig, tmp_path / "config.yaml") == cfg
