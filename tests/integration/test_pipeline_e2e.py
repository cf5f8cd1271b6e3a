"""The whole pipeline (world -> sft -> label -> reward -> ppo/rloo/grpo/dpo sweep/best-of-n/rejection sampling
-> eval -> report) on a tiny fake world and a tiny random Llama; then a second run skips every step."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tests.conftest import TINY_TEXTS

import alignkit.worlds
from alignkit.pipeline import PipelineConfig
from alignkit.pipeline import run as run_pipeline
from alignkit.worlds import base


@dataclass
class TinyBuildConfig:
    """Build the tiny world."""

    seed: int = 0
    """Unused."""


def _gold(texts: list[str]) -> torch.Tensor:
    return torch.tensor([t.count("e") / max(1, len(t)) * 4 for t in texts]).clamp(0, 1)


@pytest.fixture
def tiny_world(monkeypatch, tmp_path, tiny_llama_dir):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    root = base.world_root("tinyworld")

    def build(cfg: TinyBuildConfig) -> dict:
        prompts = [" ".join(t.split()[: 1 + i % 3]) for i, t in enumerate(TINY_TEXTS * 4)]
        base.write_jsonl(root / "prompts_train.jsonl", ({"prompt": p} for p in prompts))
        base.write_jsonl(root / "prompts_heldout.jsonl", ({"prompt": p} for p in prompts[:8]))
        pairs = [{"prompt": t.split()[0], "completion": " " + " ".join(t.split()[1:])} for t in TINY_TEXTS * 4]
        base.write_jsonl(root / "sft.jsonl", pairs)
        base.write_json(root / "summary.json", {"world": "tinyworld"})
        return {"world": "tinyworld"}

    def load(r: Path) -> base.World:
        return base.World("tinyworld", r, tiny_llama_dir, tiny_llama_dir, load_gold=lambda: _gold)

    monkeypatch.setitem(alignkit.worlds.WORLDS, "tinyworld", load)
    monkeypatch.setitem(alignkit.worlds.WORLD_BUILDERS, "tinyworld", lambda: (TinyBuildConfig, build))
    return root


def _steps(model: Path) -> list[dict]:
    rl = {"model.name_or_path": "${steps.sft.final}", "reward.model": "${steps.reward.final}", "world": "tinyworld",
          "prompts_per_step": 4, "samples_per_prompt": 2, "sampling.max_new_tokens": 6, "optim.max_steps": 2,
          "optim.per_device_batch_size": 8, "eval_prompts": 4, "run.eval_every": 1, "run.progress": False,
          "run.report_to": []}
    fast = {"run.progress": False, "run.report_to": []}
    return [
        {"name": "world", "stage": "world"},
        {"name": "sft", "stage": "sft", "after": ["world"], "set": {
            "model.name_or_path": str(model), "data.path": "${world.root}/sft.jsonl", "data.eval_fraction": 0.2,
            "optim.max_steps": 2, "n_samples": 0, **fast}},
        {"name": "label", "stage": "label", "set": {"model.name_or_path": "${steps.sft.final}", "world": "tinyworld",
                                                    "budget": 12, "heldout_budget": 6, "sampling.max_new_tokens": 6, **fast}},
        {"name": "reward", "stage": "reward", "set": {
            "model.name_or_path": "${steps.sft.final}", "data.path": "${steps.label.dir}/train.jsonl",
            "data.eval_path": "${steps.label.dir}/heldout.jsonl", "optim.max_steps": 2, "budget_curve": [6, 12],
            "gold_eval_path": "${steps.label.dir}/heldout_gold.jsonl", **fast}},
        {"name": "ppo", "stage": "ppo", "set": rl},
        {"name": "rloo", "stage": "rloo", "set": rl},
        {"name": "grpo", "stage": "grpo", "set": rl},
        {"name": "dpo", "stage": "dpo", "sweep": {"beta": [0.1, 0.3]}, "set": {
            "model.name_or_path": "${steps.sft.final}", "data.path": "${steps.label.dir}/train.jsonl",
            "world": "tinyworld", "eval_prompts": 4, "sampling.max_new_tokens": 6, "optim.max_steps": 2, **fast}},
        {"name": "best_of_n", "stage": "best-of-n", "set": {
            "model.name_or_path": "${steps.sft.final}", "scorer": "${steps.reward.final}", "world": "tinyworld",
            "n": 4, "sampling.max_new_tokens": 6, **fast}},
        {"name": "rejection_sampling", "stage": "rejection-sampling", "set": {
            "model.name_or_path": "${steps.sft.final}", "scorer": "${steps.reward.final}", "world": "tinyworld",
            "rounds": 1, "n": 2, "prompts_per_round": 8, "sampling.max_new_tokens": 6, "optim.max_steps": 1,
            "eval_prompts": 4, **fast}},
        {"name": "eval", "stage": "eval", "set": {
            "world": "tinyworld", "reference": "${steps.sft.final}", "reward_model": "${steps.reward.final}",
            "policies": ["sft=${steps.sft.final}", "ppo=${steps.ppo.final}", "rloo=${steps.rloo.final}",
                         "grpo=${steps.grpo.final}", "dpo=${steps.dpo-beta0.1.final}",
                         "dpo-beta0.3=${steps.dpo-beta0.3.final}",
                         "rejection_sampling=${steps.rejection_sampling.final}"],
            "best_of_n": ["best_of_n=${steps.best_of_n.dir}"], "best_of_n_headline": 4, "n_prompts": 8,
            "sampling.max_new_tokens": 6, **fast}},
        {"name": "report", "stage": "report", "after": ["sft", "ppo"], "set": {
            "runs_dir": "${pipeline.dir}", "eval_dir": "${steps.eval.dir}", "reward_dir": "${steps.reward.dir}",
            "ppo_dir": "${steps.ppo.dir}"}},
    ]


@pytest.mark.slow  # ~1.5-2 min on a busy 2-core machine
def test_pipeline_end_to_end_then_cached(tmp_path, tiny_world, tiny_llama_dir, capsys):
    cfg = PipelineConfig(name="tiny", runs_root=str(tmp_path / "runs"), world="tinyworld", steps=_steps(tiny_llama_dir))
    first = run_pipeline(cfg)
    assert set(first["steps"].values()) == {"run"}
    runs = tmp_path / "runs" / "tiny"
    summary = json.loads((runs / "summary.json").read_text())
    for method in ("sft", "ppo", "rloo", "grpo", "dpo", "best_of_n", "rejection_sampling"):
        assert set(summary["methods"][method]) >= {"gold_reward", "kl", "win_rate_vs_sft", "proxy_reward"}
    assert summary["reward_model"]["labels"] == 12 and "ppo" in summary["timings_s"]
    assert "data:image/png;base64," in (runs / "report.html").read_text()
    rows = (runs / "eval" / "samples.jsonl").read_text().splitlines()
    assert len(rows) == 8 * 8  # 7 policies + best-of-N headline, 8 prompts each
    out = capsys.readouterr().out
    assert "[ 4/13] reward" in out and "done in" in out
    second = run_pipeline(cfg)
    assert set(second["steps"].values()) == {"cached"}
