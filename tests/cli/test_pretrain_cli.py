"""`alignkit pretrain` from the command line: run dir, kill -9 + --resume, atomic checkpoints, 2 processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import TINY_TEXTS, assert_trained_copy_saved

from alignkit.errors import AlignkitError
from alignkit.trainers import checkpoint as ckpt

PY = sys.executable


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "text.jsonl"
    rows = [{"text": f"{t} number {i}."} for i in range(40) for t in TINY_TEXTS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pretrain_args(model_dir: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--model.name_or_path", str(model_dir), "--data.path", str(corpus),
            "--output-dir", str(out), "--block_size", "32", "--optim.per_device_batch_size", "4",
            "--optim.grad_accum_steps", "2", "--optim.lr", "3e-3", "--optim.warmup_steps", "3",
            "--run.log_every", "1", "--run.report_to", "[]", "--run.progress", "false", *extra]


def cli(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "alignkit.cli", *args], capture_output=True, text=True, timeout=300, **kwargs)


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss/total"] for r in rows if "loss/total" in r]


def test_pretrain_run_dir_and_loss_falls(tmp_path, tiny_llama_dir, corpus):
    out = tmp_path / "run"
    res = cli(pretrain_args(tiny_llama_dir, corpus, out, "--optim.max_steps", "30"))
    assert res.returncode == 0, res.stderr
    assert "8 examples per optimizer step" in res.stdout  # the plan is printed before step 0
    for name in ["config.yaml", "metrics.jsonl", "summary.json", "final/model.safetensors", "final/config.json"]:
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["eval/perplexity"] > 1
    curve = losses(out)
    assert len(curve) == 30 and curve[-1] < curve[0] - 1.0

    assert_trained_copy_saved(out / "final", tiny_llama_dir)


def test_unknown_option_is_an_error_without_traceback(tmp_path, tiny_llama_dir, corpus):
    res = cli(pretrain_args(tiny_llama_dir, corpus, tmp_path / "x", "--optim.lrr", "1"))
    assert res.returncode == 2
    assert "unknown option `--optim.lrr`" in res.stderr and "--optim.lr" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.slow  # tens of seconds; `make test-slow`
def test_kill_9_then_resume_is_bitwise_identical(tmp_path, tiny_llama_dir, corpus):
    steps = ["--optim.max_steps", "60", "--run.save_every", "5", "--run.keep_last", "2"]
    ref = tmp_path / "ref"
    assert cli(pretrain_args(tiny_llama_dir, corpus, ref, *steps)).returncode == 0

    out = tmp_path / "killed"
    proc = subprocess.Popen([PY, "-m", "alignkit.cli", *pretrain_args(tiny_llama_dir, corpus, out, *steps)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not ckpt.list_checkpoints(out / "checkpoints") and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists(), "the run finished before it could be killed"
    killed_at = int(ckpt.list_checkpoints(out / "checkpoints")[-1].name.split("-")[1])
    assert 0 < killed_at < 60

    res = cli(pretrain_args(tiny_llama_dir, corpus, out, *steps, "--resume"))
    assert res.returncode == 0, res.stderr
    assert f"(step {killed_at})" in res.stdout or "resumed from" in res.stdout
    a, b = load_file(ref / "final/model.safetensors"), load_file(out / "final/model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert losses(out) == losses(ref)  # metrics.jsonl reads as one run


def test_interrupted_checkpoint_write_never_loads(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    root = tmp_path / "checkpoints"
    ckpt.save_checkpoint(root, 1, model=model, optimizer=opt, scheduler=sched, stage_state={}, config_yaml="")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "_optimizer_to_files", crash)  # dies after the model file is written
    with pytest.raises(OSError):
        ckpt.save_checkpoint(root, 2, model=model, optimizer=opt, scheduler=sched, stage_state={}, config_yaml="")
    assert not (root / "step-2").exists() and (root / ".tmp-step-2" / "model.safetensors").exists()
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-1"]
    with pytest.raises(AlignkitError, match="incomplete"):
        ckpt.load_checkpoint(root / ".tmp-step-2", model=model, optimizer=opt, scheduler=sched)
    state = ckpt.load_checkpoint(root / "step-1", model=model, optimizer=opt, scheduler=sched)
    assert state["step"] == 1


def test_two_processes_match_one(tmp_path, tiny_llama_dir, corpus):
    one = tmp_path / "one"
    res = cli(pretrain_args(tiny_llama_dir, corpus, one, "--optim.max_steps", "6"))
    assert res.returncode == 0, res.stderr
    two = tmp_path / "two"
    args = pretrain_args(tiny_llama_dir, corpus, two, "--optim.max_steps", "6")
    args[args.index("--optim.grad_accum_steps") + 1] = "1"  # 4 per device x 1 x 2 processes = 8
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:  # a free port, so parallel or lingering runs do not collide
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    # without a GPU, alignkit's Accelerator(cpu=True) turns the --multi_gpu launch into gloo CPU processes
    launch = [PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--main_process_port", port, "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "alignkit.cli", *args]
    res = subprocess.run(launch, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[:3000]
    assert "2 device(s) = 8 examples" in res.stdout
    assert losses(two) == pytest.approx(losses(one), abs=1e-5)
    summary_one = json.loads((one / "summary.json").read_text())
    summary_two = json.loads((two / "summary.json").read_text())
    assert summary_two["eval/loss"] == pytest.approx(summary_one["eval/loss"], abs=1e-5)


@pytest.mark.slow  # tens of seconds; `make test-slow`
def test_two_live_runs_cannot_share_a_directory(tmp_path, tiny_llama_dir, corpus):
    """A second `alignkit pretrain` (fresh, then --run.resume) on a running run's directory is refused."""
    import time

    out = tmp_path / "shared"
    first = subprocess.Popen([PY, "-m", "alignkit.cli", *pretrain_args(tiny_llama_dir, corpus, out,
                                                                        "--optim.max_steps", "100000",
                                                                        "--run.save_every", "5")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not any((out / "checkpoints").glob("step-*")) and time.monotonic() < deadline:
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.2)
        for extra in ([], ["--run.resume"]):
            res = cli(pretrain_args(tiny_llama_dir, corpus, out, "--optim.max_steps", "3", *extra))
            assert res.returncode == 2 and "Traceback" not in res.stderr
            assert f"is in use by another run (pid {first.pid}" in res.stderr
        assert first.poll() is None  # the first run was not disturbed
    finally:
        first.kill()
        first.wait()
    # killed, it holds nothing: its directory resumes
    res = cli(pretrain_args(tiny_llama_dir, corpus, out, "--optim.max_steps", "6", "--run.resume",
                            "--run.save_every", "5", "--run.resume_override", "optim.max_steps"))
    assert res.returncode == 0, res.stderr
