"""`alignkit best-of-n` end to end: samples, winners, the reward/KL curve from one set of samples, errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

PY = sys.executable


def cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "alignkit.cli", *args], capture_output=True, text=True, timeout=300)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bon") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["The movie", "I loved", "What a", "The plot"]))
    return path



def test_best_of_n_writes_samples_winners_and_curve(tmp_path, tiny_llama_dir, prompts, reward_dir):
    out = tmp_path / "run"
    res = cli(["best-of-n", "--model.name_or_path", str(tiny_llama_dir), "--prompts_path", str(prompts),
               "--scorer", str(reward_dir), "--n", "8", "--ns", "1,2,4,8", "--sampling.max_new_tokens", "6",
               "--batch_size", "16", "--output-dir", str(out), "--run.progress", "false"])
    assert res.returncode == 0, res.stderr
    assert "4 prompts x N=8 samples" in res.stdout and "KL (analytic)" in res.stdout
    rows = _jsonl(out / "samples.jsonl")
    assert len(rows) == 4 and all(len(r["responses"]) == 8 == len(r["scores"]) for r in rows)
    for row in rows:
        scores = [s for s, text in zip(row["scores"], row["responses"], strict=True) if text.strip()]
        assert row["scores"][row["best"]] == max(scores)
    winners = _jsonl(out / "best.jsonl")
    assert all(set(w) >= {"prompt", "completion", "score"} for w in winners)
    summary = json.loads((out / "summary.json").read_text())
    curve = summary["curve"]
    assert [c["n"] for c in curve] == [1, 2, 4, 8]
    assert [c["reward/model"] for c in curve] == sorted(c["reward/model"] for c in curve)
    assert curve[-1]["kl_analytic"] == pytest.approx(math.log(8) - 7 / 8)
    mean_all = sum(sum(r["scores"]) for r in rows) / 32
    assert curve[0]["reward/model"] == pytest.approx(mean_all, rel=1e-5)
    assert (out / "config.yaml").is_file()


def test_bad_ns_is_an_error_naming_the_option(tmp_path, tiny_llama_dir, prompts, reward_dir):
    res = cli(["best-of-n", "--model.name_or_path", str(tiny_llama_dir), "--prompts_path", str(prompts),
               "--scorer", str(reward_dir), "--n", "4", "--ns", "1,8", "--output-dir", str(tmp_path / "x")])
    assert res.returncode == 2 and "option `ns`" in res.stderr and "Traceback" not in res.stderr
