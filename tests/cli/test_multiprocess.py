"""Two processes and fewer held-out examples than processes: every stage finishes (no collective is
left waiting), and its held-out figures equal a one-process run's; `accelerate launch` without
`--multi_gpu` warns that it runs one process.

On a machine without a GPU, `accelerate launch --multi_gpu --num_processes 2` runs two gloo CPU
processes (alignkit's `Accelerator(cpu=True)`). A hang fails the test at its timeout: the launcher
is started in its own session and the whole group is killed, so no worker is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import TINY_TEXTS

PY = sys.executable
# a 2-process tiny run takes ~10-25 s on 2 shared cores; a hang is forever
HANG_TIMEOUT_S = float(os.environ.get("ALIGNKIT_TEST_HANG_TIMEOUT_S", "180"))


def _free_port() -> str:
    with socket.socket() as sock:  # a free port, so parallel or lingering runs do not collide
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run `cmd` in a new session; on timeout kill its whole process group and fail the test."""
    timeout = HANG_TIMEOUT_S
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"{' '.join(cmd[-40:])} did not finish in {timeout} s (a collective left waiting?)\n"
                    f"{out[-2000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _kill_tree(proc: subprocess.Popen) -> None:
    """End a launcher and its workers: torch elastic starts each worker in a session of its own, so
    killing the launcher's process group would leave them waiting in a collective (for gloo's 30 min)."""
    import psutil

    workers = psutil.Process(proc.pid).children(recursive=True)
    proc.terminate()  # the elastic agent stops its workers on SIGTERM
    _, alive = psutil.wait_procs(workers, timeout=10)
    for p in alive:
        p.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def launch(args: list[str], *, processes: int = 2, multi_gpu: bool = True) -> subprocess.CompletedProcess:
    """`accelerate launch [--multi_gpu] --num_processes N -m alignkit.cli <args>`."""
    cmd = [PY, "-m", "accelerate.commands.launch", *(["--multi_gpu"] if multi_gpu else []),
           "--main_process_port", _free_port(), "--num_processes", str(processes), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "alignkit.cli", *args]
    return _run(cmd)


def single(args: list[str]) -> subprocess.CompletedProcess:
    return _run([PY, "-m", "alignkit.cli", *args])


def ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def with_accum(args: list[str], accum: int) -> list[str]:
    """`args` with `--optim.grad_accum_steps accum`: 4 x 2 accumulation x 1 process = 4 x 1 x 2 processes."""
    return [*args, "--optim.grad_accum_steps", str(accum)]


COMMON = ["--optim.per_device_batch_size", "4", "--optim.warmup_steps", "0", "--optim.scheduler", "constant",
          "--run.log_every", "1", "--run.report_to", "[]", "--run.progress", "false"]
ONE_HELD_OUT = ["--data.eval_fraction", "0.02"]  # round(30 x 0.02) = 1 held-out record (at least 1)


def _split(text: str) -> tuple[str, str]:
    words = text.split(" ")
    return " ".join(words[:3]), " " + " ".join(words[3:])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """30 records of each kind (so eval_fraction 0.02 holds out exactly one)."""
    root = tmp_path_factory.mktemp("mp_data")
    pairs = [(p, f"{c} ({i})") for i, (p, c) in enumerate([_split(t) for t in TINY_TEXTS] * 5)]  # 30, distinct
    short = [" great.", " bad.", " fine."]
    rows = {
        "text": [{"text": f"{t} number {i}."} for i in range(5) for t in TINY_TEXTS],
        "sft": [{"prompt": p, "completion": c} for p, c in pairs],
        "prefs": [{"prompt": p, "chosen": c, "rejected": short[i % 3]} for i, (p, c) in enumerate(pairs)],
        "unpaired": [{"prompt": p, "completion": c if i % 2 else short[1], "label": bool(i % 2)}
                     for i, (p, c) in enumerate(pairs)],
        "prompts": [{"prompt": f"{' '.join(t.split()[: 1 + i % 3])} {i}"} for i, t in enumerate(TINY_TEXTS * 5)],
    }
    paths = {}
    for name, records in rows.items():
        assert len(records) == 30
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths


# ---------------------------------------------------------------------------------------------
# sft and pretrain: the held-out loss is sharded over processes (the stages that hung)
# ---------------------------------------------------------------------------------------------


def sft_args(model: Path, data: Path, out: Path) -> list[str]:
    return ["sft", "--model.name_or_path", str(model), "--data.path", str(data), "--output-dir", str(out),
            "--optim.lr", "3e-3", "--optim.max_steps", "3", "--run.eval_every", "2", "--n_samples", "1",
            "--sampling.max_new_tokens", "4", *COMMON, *ONE_HELD_OUT]


def test_sft_two_processes_one_heldout_example(tmp_path, tiny_llama_dir, data):
    # Rank 1 has no held-out example: before the fix rank 0 waited in DDP's buffer broadcast of the
    # eval forward pass and rank 1 in the loss all-reduce, forever.
    two = ok(launch(sft_args(tiny_llama_dir, data["sft"], tmp_path / "two")))
    assert "2 device(s) = 8 examples" in two.stdout and "1 held-out examples" in two.stdout
    assert "warning: accelerate launch" not in two.stderr  # --multi_gpu got the processes it asked for
    ok(single(with_accum(sft_args(tiny_llama_dir, data["sft"], tmp_path / "one"), 2)))
    a, b = summary(tmp_path / "one"), summary(tmp_path / "two")
    assert b["eval_examples"] == 1
    assert b["first_eval_loss"] == pytest.approx(a["first_eval_loss"], abs=1e-5)  # before training: exact
    assert b["eval/loss"] == pytest.approx(a["eval/loss"], abs=1e-4)  # after the same 3 steps
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/loss" in r] == [0, 2, 3]


def pretrain_args(model: Path, data: Path, out: Path) -> list[str]:
    return ["pretrain", "--model.name_or_path", str(model), "--data.path", str(data), "--output-dir", str(out),
            "--block_size", "32", "--optim.lr", "3e-3", "--optim.max_steps", "3", "--run.eval_every", "2",
            *COMMON, *ONE_HELD_OUT]  # one held-out text of 36-45 tokens: one block


@pytest.mark.slow  # tens of seconds; `make test-slow`
def test_pretrain_two_processes_one_heldout_block(tmp_path, tiny_llama_dir, data):
    two = ok(launch(pretrain_args(tiny_llama_dir, data["text"], tmp_path / "two")))
    assert "2 device(s) = 8 examples" in two.stdout
    ok(single(with_accum(pretrain_args(tiny_llama_dir, data["text"], tmp_path / "one"), 2)))
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/loss" in r for r in rows if r["step"] == 2)
    assert summary(tmp_path / "two")["eval/loss"] == pytest.approx(summary(tmp_path / "one")["eval/loss"], abs=1e-4)


def test_eval_batch_indices_pad_every_process_to_the_same_count():
    from alignkit.trainers.loop import eval_batch_indices

    # 1 item, 2 processes: rank 1 gets one padding batch (item 0, not counted)
    assert eval_batch_indices(1, 4, 2, 0) == [([0], True)]
    assert eval_batch_indices(1, 4, 2, 1) == [([0], False)]
    # 5 items, batches of 2, 2 processes: ranks hold [0, 2, 4] and [1, 3] -> 2 batches each
    assert eval_batch_indices(5, 2, 2, 0) == [([0, 2], True), ([4], True)]
    assert eval_batch_indices(5, 2, 2, 1) == [([1, 3], True), ([0], False)]
    # every item exactly once over the processes, the same number of batches everywhere
    for n, size, world in [(0, 3, 2), (1, 1, 4), (7, 3, 3), (9, 2, 4), (8, 8, 2)]:
        shards = [eval_batch_indices(n, size, world, r) for r in range(world)]
        assert len({len(s) for s in shards}) == 1
        counted = sorted(i for s in shards for idx, real in s if real for i in idx)
        assert counted == list(range(n))
    assert eval_batch_indices(0, 4, 2, 1) == []  # no held-out data: no eval on any process


# ---------------------------------------------------------------------------------------------
# reward, dpo family, rl: every process evaluates every held-out item (or the main process samples)
# ---------------------------------------------------------------------------------------------


def reward_args(model: Path, data: Path, out: Path) -> list[str]:
    return ["reward", "--model.name_or_path", str(model), "--data.path", str(data), "--output-dir", str(out),
            "--optim.lr", "3e-3", "--optim.max_steps", "3", "--run.eval_every", "2", *COMMON, *ONE_HELD_OUT]


@pytest.mark.slow
def test_reward_two_processes_one_heldout_pair(tmp_path, tiny_llama_dir, data):
    ok(launch(reward_args(tiny_llama_dir, data["prefs"], tmp_path / "two")))
    ok(single(with_accum(reward_args(tiny_llama_dir, data["prefs"], tmp_path / "one"), 2)))
    a, b = summary(tmp_path / "one"), summary(tmp_path / "two")
    assert b["eval_groups"] == 1
    for key in ("eval/loss", "eval/pairwise_accuracy"):
        assert b[key] == pytest.approx(a[key], abs=1e-4), key


def dpo_args(model: Path, data: Path, out: Path, loss: str) -> list[str]:
    return ["dpo", "--model.name_or_path", str(model), "--data.path", str(data), "--output-dir", str(out),
            "--loss", loss, "--beta", "0.5", "--optim.lr", "3e-3", "--optim.max_steps", "3",
            "--run.eval_every", "2", *COMMON, *ONE_HELD_OUT]


@pytest.mark.slow
def test_dpo_two_processes_one_heldout_pair(tmp_path, tiny_llama_dir, data):
    ok(launch(dpo_args(tiny_llama_dir, data["prefs"], tmp_path / "two", "sigmoid")))
    ok(single(with_accum(dpo_args(tiny_llama_dir, data["prefs"], tmp_path / "one", "sigmoid"), 2)))
    a, b = summary(tmp_path / "one"), summary(tmp_path / "two")
    assert b["eval_groups"] == 1
    assert b["first"]["eval/loss"] == pytest.approx(a["first"]["eval/loss"], abs=1e-5)
    assert b["final"]["eval/loss"] == pytest.approx(a["final"]["eval/loss"], abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["kto", "ipo"])
def test_dpo_family_two_processes_one_heldout_record(tmp_path, tiny_llama_dir, data, loss):
    source = data["unpaired"] if loss == "kto" else data["prefs"]
    ok(launch(dpo_args(tiny_llama_dir, source, tmp_path / "two", loss)))
    b = summary(tmp_path / "two")
    assert b["eval_groups"] == 1 and "eval/loss" in b["final"]


def rl_args(stage: str, model: Path, reward: Path, prompts: Path, out: Path) -> list[str]:
    return [stage, "--model.name_or_path", str(model), "--reward.model", str(reward), "--data.path", str(prompts),
            "--output-dir", str(out), "--prompts_per_step", "2", "--samples_per_prompt", "2",
            "--sampling.max_new_tokens", "4", "--minibatches", "1", "--epochs", "1", "--eval_prompts", "4",
            "--optim.lr", "1e-3", "--optim.max_steps", "2", "--run.eval_every", "1", *COMMON, *ONE_HELD_OUT]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["ppo", "grpo", "rloo"])
def test_rl_two_processes_one_heldout_prompt(tmp_path, tiny_llama_dir, reward_dir, data, stage):
    two = ok(launch(rl_args(stage, tiny_llama_dir, reward_dir, data["prompts"], tmp_path / "two")))
    assert "1 held-out prompts per evaluation" in two.stdout
    b = summary(tmp_path / "two")
    assert b["eval_prompts"] == 1 and "eval/reward" in b["after"]
    if stage == "ppo":  # the evaluation before training does not depend on how training is split
        ok(single(rl_args(stage, tiny_llama_dir, reward_dir, data["prompts"], tmp_path / "one")))
        a = summary(tmp_path / "one")
        for key in ("eval/reward", "eval/kl"):
            assert b["before"][key] == pytest.approx(a["before"][key], abs=1e-5), key


# ---------------------------------------------------------------------------------------------
# `accelerate launch --num_processes 2` without --multi_gpu: one process, and a warning that says so
# ---------------------------------------------------------------------------------------------


def test_launch_without_multi_gpu_warns_that_it_runs_one_process(tmp_path, tiny_llama_dir, data):
    args = sft_args(tiny_llama_dir, data["sft"], tmp_path / "run")
    args[args.index("--optim.max_steps") + 1] = "1"
    res = ok(launch(args, multi_gpu=False))
    assert "1 device(s)" in res.stdout  # accelerate's simple launcher started one process
    line = next((line for line in res.stderr.splitlines() if "warning: accelerate launch" in line), None)
    assert line is not None, "no warning that 1 process runs where 2 were asked for"
    assert "2 processes" in line and "1 process" in line and "--multi_gpu" in line


@pytest.mark.parametrize("env,parent,expected", [
    # accelerate's simple launcher (no --multi_gpu) with --num_processes 2: MASTER_ADDR, no WORLD_SIZE
    ({"ACCELERATE_USE_CPU": "False", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
     ["accelerate", "launch", "--num_processes", "2", "-m", "alignkit.cli"], (2, 1)),
    ({"ACCELERATE_USE_CPU": "False", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
     ["accelerate", "launch", "--num_processes=3", "train.py"], (3, 1)),
    ({"ACCELERATE_USE_CPU": "False", "MASTER_ADDR": "127.0.0.1"}, ["accelerate", "launch", "x.py"], (None, 1)),
    # torchrun / --multi_gpu: the processes asked for are the processes there are
    ({"MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "2", "RANK": "0"},
     ["accelerate", "launch", "--multi_gpu", "--num_processes", "2"], None),
    ({"ACCELERATE_USE_CPU": "False"}, ["accelerate", "launch", "x.py"], None),  # --num_processes 1
    ({}, ["bash"], None),  # not launched by accelerate
    # mpirun with the simple launcher: the MPI world is the run's
    ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "h", "PMI_SIZE": "2"},
     ["accelerate", "launch", "--num_processes", "2"], None),
])
def test_process_count_mismatch(monkeypatch, env, parent, expected):
    from alignkit import cli

    for key in list(os.environ):
        if key.startswith(("ACCELERATE_", "MASTER_", "WORLD_SIZE", "RANK", "PMI_", "OMPI_", "MV2_")):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(cli, "_parent_argv", lambda: parent)
    assert cli.process_count_mismatch() == expected
    message = cli.launch_warning()
    assert (message is None) == (expected is None)
    if expected is not None:
        assert "--multi_gpu" in message and "1 process" in message
