"""Pipeline caching: unchanged -> skipped; an option change re-runs that step and downstream only; --only/--from."""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from alignkit import cli
from alignkit.config import RunConfig
from alignkit.errors import AlignkitError
from alignkit.pipeline import PipelineConfig, expand_steps
from alignkit.pipeline import run as run_pipeline

CALLS: list[str] = []


@dataclass
class FakeConfig:
    """A stage that copies its input file and adds its value."""

    run: RunConfig = field(default_factory=RunConfig)
    value: int = 0
    """Added to the input."""
    source: str = ""
    """Input file (a number); empty: 0."""
    fail: bool = False
    """Raise instead of running."""


def fake_run(cfg: FakeConfig) -> dict:
    out = Path(cfg.run.output_dir)
    CALLS.append(out.name)
    if cfg.fail:
        raise RuntimeError("boom")
    base = int(Path(cfg.source).read_text()) if cfg.source else 0
    (out / "final").mkdir(parents=True, exist_ok=True)
    (out / "final" / "n.txt").write_text(str(base + cfg.value))
    print("some stage output")
    return {"eval/gold": 0.5, "winners": base + cfg.value}


@pytest.fixture(autouse=True)
def fake_stage(monkeypatch):
    module = types.ModuleType("fake_stage_module")
    module.FakeConfig, module.run = FakeConfig, fake_run
    monkeypatch.setitem(sys.modules, "fake_stage_module", module)
    monkeypatch.setitem(cli.STAGES, "fake", ("fake_stage_module", "FakeConfig", "test stage"))
    CALLS.clear()


def _pipeline(tmp_path: Path, b_value: int = 2, **kwargs) -> PipelineConfig:
    steps = [
        {"name": "a", "stage": "fake", "set": {"value": 1}},
        {"name": "b", "stage": "fake", "set": {"value": b_value, "source": "${steps.a.final}/n.txt"}},
        {"name": "c", "stage": "fake", "set": {"value": 3, "source": "${steps.b.final}/n.txt"}},
        {"name": "side", "stage": "fake", "set": {"value": 5, "source": "${steps.a.final}/n.txt"}},
    ]
    return PipelineConfig(name="p", runs_root=str(tmp_path), steps=steps, **kwargs)


def test_second_run_skips_every_step(tmp_path):
    run_pipeline(_pipeline(tmp_path))
    assert CALLS == ["a", "b", "c", "side"]
    assert (tmp_path / "p" / "c" / "final" / "n.txt").read_text() == "6"
    marker = json.loads((tmp_path / "p" / "b" / ".done.json").read_text())
    assert marker["needs"] == ["a"] and marker["result"] == "eval/gold 0.5, winners 3"
    assert "some stage output" in (tmp_path / "p" / "b" / "log.txt").read_text()
    CALLS.clear()
    result = run_pipeline(_pipeline(tmp_path))
    assert CALLS == [] and set(result["steps"].values()) == {"cached"}


def test_option_change_reruns_that_step_and_downstream_only(tmp_path):
    run_pipeline(_pipeline(tmp_path))
    CALLS.clear()
    run_pipeline(_pipeline(tmp_path, b_value=10))
    assert CALLS == ["b", "c"]  # not a (upstream), not side (does not read b)
    assert (tmp_path / "p" / "c" / "final" / "n.txt").read_text() == "14"


def test_only_and_from(tmp_path):
    run_pipeline(_pipeline(tmp_path))
    CALLS.clear()
    run_pipeline(_pipeline(tmp_path, only=["b"]))
    assert CALLS == ["b"]
    CALLS.clear()
    run_pipeline(_pipeline(tmp_path, from_step="c"))
    assert CALLS == ["c", "side"]
    CALLS.clear()
    run_pipeline(_pipeline(tmp_path, dry_run=True, force=True))
    assert CALLS == []
    with pytest.raises(AlignkitError, match="no step 'x'"):
        run_pipeline(_pipeline(tmp_path, only=["x"]))


def test_cli_from_alias(tmp_path, monkeypatch):
    import yaml

    path = tmp_path / "p.yaml"
    cfg = _pipeline(tmp_path)
    path.write_text(yaml.safe_dump({"name": cfg.name, "runs_root": cfg.runs_root, "steps": cfg.steps}))
    assert cli.main(["pipeline", str(path)]) == 0
    CALLS.clear()
    assert cli.main(["pipeline", str(path), "--from", "side"]) == 0
    assert CALLS == ["side"]


def test_failure_names_the_step_and_log_and_keeps_finished_steps(tmp_path):
    cfg = _pipeline(tmp_path)
    cfg.steps[2]["set"]["fail"] = True
    with pytest.raises(AlignkitError, match=r"stage c failed: RuntimeError: boom; log: .*c/log.txt"):
        run_pipeline(cfg)
    assert "boom" in (tmp_path / "p" / "c" / "log.txt").read_text()
    assert not (tmp_path / "p" / "c" / ".done.json").exists()
    CALLS.clear()
    run_pipeline(_pipeline(tmp_path))
    assert CALLS == ["c", "side"]  # a and b stay cached


def test_sweep_expands_and_templates_are_checked(tmp_path):
    cfg = _pipeline(tmp_path)
    cfg.steps[1]["sweep"] = {"value": [1, 2]}
    with pytest.raises(AlignkitError, match="step b is a sweep; refer to one of its runs: b-value1, b-value2"):
        expand_steps(cfg)
    cfg.steps[2]["set"]["source"] = "${steps.b-value2.final}/n.txt"
    steps = {s.name: s for s in expand_steps(cfg)}
    assert list(steps) == ["a", "b-value1", "b-value2", "c", "side"]
    assert steps["b-value2"].values["value"] == 2 and steps["c"].needs == ["b-value2"]
    assert steps["c"].values["run"]["output_dir"] == str(tmp_path / "p" / "c")
    cfg.steps[2]["set"]["source"] = "${steps.later.final}"
    with pytest.raises(AlignkitError, match="not an earlier step"):
        expand_steps(cfg)
    cfg.steps[2]["set"]["source"] = "${nope}"
    with pytest.raises(AlignkitError, match="unknown template"):
        expand_steps(cfg)
    cfg.steps[2]["set"] = {"valu": 3}
    with pytest.raises(AlignkitError, match="did you mean 'value'"):
        expand_steps(cfg)


def test_the_sentiment_pipeline_file_expands(monkeypatch, tmp_path):
    from alignkit.config import resolve_config

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(repo)
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path))
    cfg = resolve_config(PipelineConfig, "configs/sentiment/pipeline.yaml")
    steps = {s.name: s for s in expand_steps(cfg)}
    assert list(steps)[:4] == ["world", "sft", "label", "reward"] and list(steps)[-2:] == ["eval", "report"]
    assert {"dpo-beta0.03", "dpo-beta0.1", "dpo-beta0.3", "ppo", "rloo", "grpo", "best_of_n"} <= set(steps)
    assert steps["reward"].values["data"]["path"] == "runs/sentiment/label/train.jsonl"
    assert steps["ppo"].needs == ["sft", "reward"] and steps["sft"].needs == ["world"]
    assert "rejection_sampling" in steps["eval"].needs
