"""`alignkit label` end to end: sampling K per prompt, a reward-model labeler, the file labeler's two phases."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.data.formats import validate_records

PY = sys.executable


def cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "alignkit.cli", *args], capture_output=True, text=True, timeout=300)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("label") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["The movie", "I loved", "What a", "The plot"]))
    return path



def _args(policy: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    return ["label", "--model.name_or_path", str(policy), "--prompts", str(prompts), "--heldout_prompts", str(prompts),
            "--output-dir", str(out), "--sampling.max_new_tokens", "6", "--batch_size", "2", *extra]


def test_label_choices_with_a_reward_model_labeler(tmp_path, tiny_llama_dir, prompts, reward_dir):
    out = tmp_path / "run"
    res = cli(_args(tiny_llama_dir, prompts, out, "--format", "choice", "--k", "3", "--budget", "3",
                    "--heldout_budget", "2", "--labeler", "reward-model", "--scorer", str(reward_dir)))
    assert res.returncode == 0, res.stderr
    assert "3 samples per prompt" in res.stdout
    train = _jsonl(out / "train.jsonl")
    assert len(train) + json.loads((out / "summary.json").read_text()).get("skipped_empty", 0) >= 3
    validate_records(train, "choice", "train.jsonl")
    assert all(len(r["responses"]) == 3 and r["utilities"][r["best"]] == max(r["utilities"]) for r in train)
    assert len(_jsonl(out / "heldout.jsonl")) <= 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["label_agreement_with_utilities"] == 1.0 and summary["sampled_tokens"] > 0


def test_file_labeler_two_phases(tmp_path, tiny_llama_dir, prompts):
    first = tmp_path / "export"
    res = cli(_args(tiny_llama_dir, prompts, first, "--labeler", "file", "--budget", "2", "--heldout_budget", "0"))
    assert res.returncode == 0, res.stderr
    queries = _jsonl(first / "queries.jsonl")
    assert 2 <= len(queries) <= 3 and all(len(q["responses"]) == 2 for q in queries)  # the budget counts queries
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"id": q["id"], "chosen": 1}) + "\n" for q in queries))
    second = tmp_path / "join"
    res = cli(_args(tiny_llama_dir, prompts, second, "--labeler", "file", "--queries", str(first / "queries.jsonl"),
                    "--answers", str(answers)))
    assert res.returncode == 0, res.stderr
    labelled = _jsonl(second / "train.jsonl")
    by_id = {q["id"]: q for q in queries}
    assert labelled and all(r["chosen"] == by_id[r["id"]]["responses"][1] for r in labelled)


def test_bad_options_name_the_option(tmp_path, tiny_llama_dir, prompts):
    res = cli(_args(tiny_llama_dir, prompts, tmp_path / "bad", "--format", "pairs", "--k", "3"))
    assert res.returncode == 2 and "`k`" in res.stderr and "Traceback" not in res.stderr
    res = cli(_args(tiny_llama_dir, prompts, tmp_path / "bad2"))  # gold labeler without a world
    assert res.returncode == 2 and "world" in res.stderr
