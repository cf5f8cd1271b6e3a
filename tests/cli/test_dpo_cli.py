"""`alignkit dpo` end to end: offline DPO / Plackett-Luce / KTO runs, LoRA with precomputed reference, online rounds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import TINY_TEXTS

PY = sys.executable


def cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "alignkit.cli", *args], capture_output=True, text=True, timeout=300)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]


def _split(text: str) -> tuple[str, str]:
    words = text.split(" ")
    return " ".join(words[:3]), " " + " ".join(words[3:])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dpo_data")
    pairs = [_split(t) for t in TINY_TEXTS]
    short = [" great.", " bad.", " fine."]
    prefs = [{"prompt": p, "chosen": c, "rejected": short[i % 3]} for i, (p, c) in enumerate(pairs * 4)]
    ranks = [{"prompt": p, "responses": [c, " fine.", " bad."]} for p, c in pairs * 4]
    unpaired = [{"prompt": p, "completion": c if i % 2 else short[1], "label": bool(i % 2)}
                for i, (p, c) in enumerate(pairs * 4)]
    prompts = [{"prompt": p} for p, _ in pairs]
    paths = {}
    for name, rows in (("prefs", prefs), ("ranks", ranks), ("unpaired", unpaired), ("prompts", prompts),
                       ("bad", prefs[:2] + [{"prompt": "Hi", "chosen": " a", "rejected": " a"}])):
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def dpo_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["dpo", "--model.name_or_path", str(model), "--output-dir", str(out), "--optim.per_device_batch_size", "4",
            "--optim.lr", "3e-3", "--optim.warmup_steps", "0", "--optim.scheduler", "constant", "--optim.max_steps",
            "10", "--run.log_every", "5", "--run.report_to", "[]", "--run.progress", "false",
            "--data.eval_fraction", "0.2", *extra]


@pytest.mark.parametrize("name,extra", [
    ("prefs", ["--loss", "sigmoid"]),
    pytest.param("ranks", ["--loss", "plackett_luce", "--model.lora_r", "8", "--precompute_ref", "true",
                           "--optim.lr", "2e-2"], marks=pytest.mark.slow),
    pytest.param("unpaired", ["--loss", "kto"], marks=pytest.mark.slow),
])
def test_dpo_offline_trains_and_writes_the_run_dir(tmp_path, tiny_llama_dir, data, name, extra):
    out = tmp_path / "run"
    res = cli(dpo_args(tiny_llama_dir, out, "--data.path", str(data[name]), "--beta", "0.5", *extra))
    assert res.returncode == 0, res.stderr
    assert "4 examples per optimizer step" in res.stdout and "one forward pass" in res.stdout
    for path in ["config.yaml", "metrics.jsonl", "summary.json", "final/model.safetensors"]:
        assert (out / path).exists(), path
    rows = _rows(out)
    first = next(r for r in rows if "eval/loss" in r)
    train = [r for r in rows if "rewards/margins" in r and "eval/loss" not in r]
    assert first["step"] == 0 and train and train[-1]["rewards/margins"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["eval/loss"] < summary["first"]["eval/loss"]



@pytest.mark.slow
def test_dpo_online_rounds_sample_label_and_train(tmp_path, tiny_llama_dir, data, reward_dir):
    out = tmp_path / "online"
    res = cli(dpo_args(tiny_llama_dir, out, "--rounds", "2", "--prompts_path", str(data["prompts"]),
                       "--prompts_per_round", "6", "--labeler", str(reward_dir), "--optim.max_steps", "3",
                       "--sampling.max_new_tokens", "6"))
    assert res.returncode == 0, res.stderr
    assert "2 rounds x 3 steps" in res.stdout
    records = [json.loads(line) for line in (out / "rounds" / "round-1.jsonl").read_text().splitlines()]
    assert records and all(set(r) >= {"prompt", "chosen", "rejected"} for r in records)
    assert records[0]["utilities"][0] >= records[0]["utilities"][1]  # tau = 0: the higher score wins
    assert json.loads((out / "summary.json").read_text())["steps"] == 6


def test_bad_preference_row_names_file_row_and_field(tmp_path, tiny_llama_dir, data):
    res = cli(dpo_args(tiny_llama_dir, tmp_path / "bad", "--data.path", str(data["bad"])))
    assert res.returncode == 2 and "row 3" in res.stderr and "'chosen'" in res.stderr
    assert "Traceback" not in res.stderr
