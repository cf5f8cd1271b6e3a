"""`alignkit eval` on any prompt file with a reward model as the scorer (no world)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PY = sys.executable


def cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "alignkit.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["The movie", "I loved", "What a", "The plot",
                                                                       "Never again"]))
    return path


def test_eval_on_a_prompt_file_scored_by_a_reward_model(tmp_path, tiny_llama_dir, prompts, reward_dir):
    from alignkit.rollout.score import load_scorer

    out = tmp_path / "eval"
    res = cli(["eval", "--prompts", str(prompts), "--scorer", str(reward_dir), "--policies",
               f"base={tiny_llama_dir}", "--n_prompts", "4", "--sampling.max_new_tokens", "6",
               "--output-dir", str(out), "--run.progress", "false"])
    assert res.returncode == 0, res.stderr
    assert f"4 prompts of {prompts}, scored by {reward_dir}" in res.stdout
    report = json.loads((out / "eval.json").read_text())
    assert report["settings"]["scorer"] == str(reward_dir) and report["settings"]["prompts"] == str(prompts)
    figures = report["methods"]["base"]
    assert "gold_reward" not in figures and {"score", "score_ci95", "win_rate_vs_ref", "kl"} <= set(figures)
    assert figures["kl"] == pytest.approx(0.0, abs=1e-5)  # the policy is its own reference
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["The movie", "I loved", "What a", "The plot"]
    # the figure is the reward model's mean score of the saved responses
    scores = load_scorer(str(reward_dir))([r["prompt"] for r in rows], [r["response"] for r in rows])
    assert [r["score"] for r in rows] == pytest.approx(scores.tolist(), abs=1e-4)
    assert figures["score"] == pytest.approx(float(torch.as_tensor(scores).mean()), abs=1e-4)


def test_eval_without_a_world_or_prompts_and_scorer_is_an_error(tmp_path, tiny_llama_dir, prompts):
    res = cli(["eval", "--prompts", str(prompts), "--policies", str(tiny_llama_dir), "--output-dir",
               str(tmp_path / "x")])
    assert res.returncode == 2 and "`prompts`" in res.stderr and "`scorer`" in res.stderr
    assert "Traceback" not in res.stderr
