"""`alignkit sft` end to end: run dir, samples, falling held-out loss, LoRA merged save, row errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.conftest import TINY_TEXTS, assert_trained_copy_saved

PY = sys.executable


def _split(text: str) -> tuple[str, str]:
    words = text.split(" ")
    return " ".join(words[:3]), " " + " ".join(words[3:])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sft_data")
    strings = [dict(zip(("prompt", "completion"), _split(t), strict=True)) for t in TINY_TEXTS * 8]
    messages = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c.strip()},
                              {"role": "user", "content": "More?"}, {"role": "assistant", "content": "No."}]}
                for p, c in (_split(t) for t in TINY_TEXTS * 8)]
    paths = {"strings": root / "strings.jsonl", "messages": root / "messages.jsonl", "bad": root / "bad.jsonl"}
    for name, rows in (("strings", strings), ("messages", messages), ("bad", strings[:2] + [{"prompt": "Hi"}])):
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def sft_args(model_dir: Path, data_path: Path, out: Path, *extra: str) -> list[str]:
    return ["sft", "--model.name_or_path", str(model_dir), "--data.path", str(data_path), "--output-dir", str(out),
            "--data.eval_fraction", "0.15", "--optim.per_device_batch_size", "8", "--optim.lr", "3e-3",
            "--optim.warmup_steps", "2", "--optim.max_steps", "16", "--run.eval_every", "8", "--run.log_every", "4",
            "--n_samples", "2", "--sampling.max_new_tokens", "8", "--run.report_to", "[]", "--run.progress", "false",
            *extra]


def cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "alignkit.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("fmt,extra", [("strings", []), ("messages", ["--packing", "true"])])
def test_sft_run_dir_samples_and_heldout_loss_falls(tmp_path, tiny_llama_dir, data, fmt, extra):
    out = tmp_path / "run"
    res = cli(sft_args(tiny_llama_dir, data[fmt], out, *extra))
    assert res.returncode == 0, res.stderr
    assert "8 examples per optimizer step" in res.stdout and "trained" in res.stdout  # the plan
    for name in ["config.yaml", "metrics.jsonl", "summary.json", "final/model.safetensors", "final/config.json",
                 "samples/step-0.jsonl", "samples/step-8.jsonl", "samples/step-16.jsonl"]:
        assert (out / name).exists(), name
    sample = json.loads((out / "samples/step-16.jsonl").read_text().splitlines()[0])
    assert set(sample) == {"prompt", "completion", "reference"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["examples"] + summary["eval_examples"] == 48
    assert summary["truncated"] == summary["dropped"] == summary["skipped_rows"] == 0
    assert summary["last_eval_loss"] < summary["first_eval_loss"] - 0.5
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0]
    assert all("eval/perplexity" in r for r in rows if "eval/loss" in r)

    assert_trained_copy_saved(out / "final", tiny_llama_dir)


def test_validation_error_names_row_and_field_without_traceback(tmp_path, tiny_llama_dir, data):
    res = cli(sft_args(tiny_llama_dir, data["bad"], tmp_path / "bad"))
    assert res.returncode == 2
    assert "row 3" in res.stderr and "'completion'" in res.stderr and "Traceback" not in res.stderr


def test_on_bad_rows_skip_and_truncation_are_counted(tmp_path, tiny_llama_dir, data):
    out = tmp_path / "skip"
    res = cli(sft_args(tiny_llama_dir, data["bad"], out, "--data.on_bad_rows", "skip", "--data.eval_fraction", "0",
                       "--optim.max_steps", "1", "--data.max_length", "8", "--n_samples", "0"))
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_rows"] == 1 and summary["examples"] == 2 and summary["truncated"] == 2


def test_lora_run_saves_merged_model_with_same_logits(tmp_path, tiny_llama_dir, data, monkeypatch):
    from transformers import AutoModelForCausalLM

    from alignkit.config import resolve_config
    from alignkit.trainers import sft

    captured = {}
    finish = sft.TrainLoop.finish

    def capture(self, *args, **kwargs):
        captured["model"] = self.accelerator.unwrap_model(self.model)
        return finish(self, *args, **kwargs)

    monkeypatch.setattr(sft.TrainLoop, "finish", capture)
    args = sft_args(tiny_llama_dir, data["strings"], tmp_path / "lora", "--model.lora_r", "4",
                    "--optim.max_steps", "3", "--n_samples", "0")[1:]
    summary = sft.run(resolve_config(sft.SFTConfig, None, args))
    in_memory = captured["model"].eval()
    assert type(in_memory).__name__.startswith("Peft")
    final = Path(summary["final_dir"])
    assert not (final / "adapter_config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(final).eval()
    ids = torch.tensor([[1, 40, 50, 60, 70, 80, 90]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, in_memory(ids).logits, atol=1e-5, rtol=1e-5)
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
        assert not torch.allclose(base(ids).logits, loaded(ids).logits, atol=1e-4)  # the adapters were trained
