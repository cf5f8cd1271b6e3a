"""TRL's dataset shapes end to end: `alignkit dpo` on implicit-prompt conversations, `alignkit grpo` and
`alignkit best-of-n` on conversational prompts, and raw text given to `alignkit sft`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.data.formats import validate_records
from alignkit.data.load import load_records

PY = sys.executable
QUESTIONS = ["how are you?", "The movie?", "The plot?", "Sky colour?"]


def cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "alignkit.cli", *args], capture_output=True, text=True, timeout=300)


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trl_shapes")
    # trl-lib/ultrafeedback_binarized: chosen/rejected are whole conversations, no `prompt`
    implicit = [{"chosen": [user(q), assistant("I loved it, wonderful!")],
                 "rejected": [user(q), assistant("Terrible.")]} for q in QUESTIONS * 3]
    prompts = [{"prompt": [user(q)]} for q in QUESTIONS * 3]
    return {"implicit": _write(root / "implicit.jsonl", implicit), "prompts": _write(root / "prompts.jsonl", prompts),
            "text": _write(root / "text.jsonl", [{"text": t} for t in QUESTIONS])}


def test_dpo_on_implicit_prompt_conversations(tmp_path, tiny_llama_dir, data):
    out = tmp_path / "dpo"
    res = cli(["dpo", "--model.name_or_path", str(tiny_llama_dir), "--data.path", str(data["implicit"]),
               "--output-dir", str(out), "--optim.per_device_batch_size", "4", "--optim.max_steps", "2",
               "--data.eval_fraction", "0.25", "--run.report_to", "[]", "--run.progress", "false"])
    assert res.returncode == 0, res.stderr
    assert "prompt: extracted from chosen/rejected (implicit prompt), 12 records" in res.stdout  # the plan
    summary = json.loads((out / "summary.json").read_text())
    assert summary["groups"] == 9 and summary["eval_groups"] == 3 and summary["skipped_rows"] == 0


def test_grpo_on_conversational_prompts(tmp_path, tiny_llama_dir, reward_dir, data):
    out = tmp_path / "grpo"
    res = cli(["grpo", "--model.name_or_path", str(tiny_llama_dir), "--reward.model", str(reward_dir),
               "--data.path", str(data["prompts"]), "--data.eval_fraction", "0.25", "--output-dir", str(out),
               "--prompts_per_step", "2", "--samples_per_prompt", "2", "--sampling.max_new_tokens", "4",
               "--eval_prompts", "2", "--optim.max_steps", "2", "--optim.per_device_batch_size", "4",
               "--run.report_to", "[]", "--run.progress", "false"])
    assert res.returncode == 0, res.stderr
    assert "9 training prompts" in res.stdout
    samples = [json.loads(line) for line in (out / "samples" / "step-2.jsonl").read_text().splitlines()]
    assert samples and all(isinstance(s["prompt"], list) and s["prompt"][-1]["role"] == "user" for s in samples)


def test_best_of_n_on_conversational_prompts_writes_valid_records(tmp_path, tiny_llama_dir, reward_dir, data):
    out = tmp_path / "bon"
    res = cli(["best-of-n", "--model.name_or_path", str(tiny_llama_dir), "--prompts_path", str(data["prompts"]),
               "--max_prompts", "3", "--scorer", str(reward_dir), "--n", "2", "--sampling.max_new_tokens", "6",
               "--sampling.min_new_tokens", "1", "--output-dir", str(out), "--run.progress", "false"])
    assert res.returncode == 0, res.stderr
    winners = load_records(str(out / "best.jsonl"))
    assert winners and all(w["prompt"] in [[user(q)] for q in QUESTIONS] for w in winners)  # kept as given
    # the winners are SFT data again (rejection sampling fine-tunes on them): responses are assistant turns
    assert len(validate_records(winners, "sft", "best.jsonl").records) == len(winners)
    assert all(isinstance(r, list) for row in load_records(str(out / "samples.jsonl")) for r in row["responses"])


def test_sft_on_raw_text_points_to_pretrain(tmp_path, tiny_llama_dir, data):
    res = cli(["sft", "--model.name_or_path", str(tiny_llama_dir), "--data.path", str(data["text"]),
               "--output-dir", str(tmp_path / "sft"), "--run.report_to", "[]"])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "raw text records {text}" in res.stderr and "alignkit pretrain" in res.stderr
