"""`alignkit rejection-sampling` end to end: rounds of best-of-N winners -> SFT, each from the latest policy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PY = sys.executable


def cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "alignkit.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rs") / "prompts.jsonl"
    texts = ["The movie", "I loved", "What a", "The plot", "Terrible", "The quick", "User:", "The ending"]
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in texts))
    return path



@pytest.mark.slow
def test_rounds_chain_policies_and_reuse_finished_rounds(tmp_path, tiny_llama_dir, prompts, reward_dir):
    out = tmp_path / "run"
    args = ["rejection-sampling", "--model.name_or_path", str(tiny_llama_dir), "--prompts_path", str(prompts),
            "--scorer", str(reward_dir), "--rounds", "2", "--n", "4", "--prompts_per_round", "4",
            "--sampling.max_new_tokens", "6", "--optim.max_steps", "2", "--optim.per_device_batch_size", "2",
            "--data.eval_fraction", "0.25", "--output-dir", str(out), "--run.progress", "false"]
    res = cli(args)
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    r0, r1 = summary["rounds"]
    assert r0["policy_in"] == str(tiny_llama_dir) and r1["policy_in"] == r0["policy_out"]  # latest policy
    assert r0["winner_score"] >= r0["sample_score"]
    for r in range(2):
        assert (out / f"round-{r}" / "best_of_n" / "best.jsonl").is_file()
        assert (out / f"round-{r}" / "sft" / "final" / "model.safetensors").is_file()
    first = [json.loads(line)["prompt"] for line in (out / "round-0/best_of_n/best.jsonl").read_text().splitlines()]
    second = [json.loads(line)["prompt"] for line in (out / "round-1/best_of_n/best.jsonl").read_text().splitlines()]
    assert not set(first) & set(second)  # fresh prompts each round
    assert (out / "final" / "model.safetensors").is_file()
    again = cli(args)
    assert again.returncode == 0 and again.stdout.count("reusing") == 2


def test_needs_a_policy(tmp_path):
    res = cli(["rejection-sampling", "--output-dir", str(tmp_path / "x")])
    assert res.returncode == 2 and "model.name_or_path" in res.stderr
