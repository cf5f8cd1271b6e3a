"""Rewards as code from the CLI: a user's function reads the prompt records' columns, weighted with built-ins
and a reward model; a raising function stops the run with one line; the same under two processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PY = sys.executable

USER_REWARDS = textwrap.dedent("""
    import json, os

    def check(prompts, completions, answer, **kwargs):
        # log what each call got: the test checks that every answer is its own prompt's
        with open(os.environ["REWARD_LOG"], "a") as log:
            for prompt, ans in zip(prompts, answer, strict=True):
                log.write(json.dumps([prompt, ans, os.environ.get("RANK", "0")]) + "\\n")
        return [float(len(c) % 2) for c in completions]

    def closeness(prompts, completions, answer, **kwargs):
        # how close the completion's length is to the prompt's number: a deterministic function of the text
        return [-abs(len(c) - int(a)) for c, a in zip(completions, answer, strict=True)]

    def boom(prompts, completions, **kwargs):
        if any(p.endswith(" 7") for p in prompts):
            raise ZeroDivisionError("planted")
        return [0.0] * len(completions)
""")


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rewards_as_code")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Count {i}", "answer": str(i)}) + "\n" for i in range(24)))
    rewards = root / "my_rewards.py"
    rewards.write_text(USER_REWARDS)
    return {"prompts": prompts, "rewards": rewards}


def grpo_args(model: Path, task: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["grpo", "--model.name_or_path", str(model), "--data.path", str(task["prompts"]),
            "--data.eval_fraction", "0.25", "--output-dir", str(out), "--prompts_per_step", "3",
            "--samples_per_prompt", "2", "--sampling.max_new_tokens", "4", "--minibatches", "1", "--epochs", "1",
            "--eval_prompts", "3", "--optim.max_steps", "3", "--optim.per_device_batch_size", "6",
            "--run.log_every", "1", "--run.report_to", "[]", "--run.progress", "false", *extra]


def run(args: list[str], log: Path, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "REWARD_LOG": str(log), "OMP_NUM_THREADS": "1"}
    cmd = [*(launcher or [PY]), "-m", "alignkit.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def logged_calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_a_user_function_reads_its_rows_columns_weighted_with_a_builtin(tmp_path, tiny_llama_dir, task):
    log, out = tmp_path / "calls.jsonl", tmp_path / "run"
    res = run(grpo_args(tiny_llama_dir, task, out, "--reward.functions",
                        f"{task['rewards']}:check,length_penalty(max_length=2, per_unit=0.5)",
                        "--reward.weights", "1,0.25"), log)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"1 x check (user code from {task['rewards'].resolve()})" in res.stdout
    assert "0.25 x length_penalty (built-in)" in res.stdout
    calls = logged_calls(log)
    # 3 steps x 3 prompts x 2 samples, plus the held-out evaluations before and after (3 prompts each)
    assert len(calls) == 3 * 3 * 2 + 2 * 3
    assert all(prompt == f"Count {answer}" for prompt, answer, _ in calls)  # shuffled, yet each row's own
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/check" in r]
    assert len(steps) == 3 and all("reward/length_penalty" in r for r in steps)
    for r in steps:  # the logged total is the documented weighted sum of the component means
        assert r["reward/model"] == pytest.approx(r["reward/check"] + 0.25 * r["reward/length_penalty"], abs=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert {"eval/reward_check", "eval/reward_length_penalty", "eval/reward"} <= set(summary["after"])


def test_a_reward_model_and_a_function_together(tmp_path, tiny_llama_dir, task):
    log = tmp_path / "calls.jsonl"
    res = run(grpo_args(tiny_llama_dir, task, tmp_path / "run", "--reward.model", str(tiny_llama_dir),
                        "--reward.functions", "answer_match", "--reward.weights", "1"), log)
    assert res.returncode != 0
    assert "1 weight(s) for 2 reward component(s) (reward_model, answer_match)" in res.stderr
    assert "Traceback" not in res.stderr


def test_a_raising_function_stops_the_run_naming_it_and_the_prompt(tmp_path, tiny_llama_dir, task):
    res = run(grpo_args(tiny_llama_dir, task, tmp_path / "run", "--reward.functions", f"{task['rewards']}:boom",
                        "--data.eval_fraction", "0.0", "--eval_prompts", "0", "--optim.max_steps", "8"),
              tmp_path / "calls.jsonl")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "reward function `boom` raised on prompt index 7: ZeroDivisionError: planted" in res.stderr
    ok = run(grpo_args(tiny_llama_dir, task, tmp_path / "scored", "--reward.functions", f"{task['rewards']}:boom",
                       "--reward.error_value", "-1", "--data.eval_fraction", "0.0", "--eval_prompts", "0",
                       "--optim.max_steps", "8"), tmp_path / "calls.jsonl")
    assert ok.returncode == 0, ok.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "scored" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("reward/boom_errors", 0) for r in rows) == 2  # prompt 7's two samples, once


@pytest.mark.slow
def test_two_processes_each_get_their_own_rows_columns(tmp_path, tiny_llama_dir, task):
    from tests.cli.test_multiprocess import _free_port

    log = tmp_path / "calls.jsonl"
    launcher = [PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--main_process_port", _free_port(),
                "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    res = run(grpo_args(tiny_llama_dir, task, tmp_path / "run", "--reward.functions", f"{task['rewards']}:check"),
              log, launcher)
    assert res.returncode == 0, res.stderr[-3000:]
    calls = logged_calls(log)
    assert {rank for _, _, rank in calls} == {"0", "1"}
    assert all(prompt == f"Count {answer}" for prompt, answer, _ in calls)
    # both ranks train (2 x 3 steps x 3 prompts x 2 samples); only rank 0 evaluates (3 held-out, twice)
    assert len(calls) == 2 * 3 * 3 * 2 + 2 * 3


def closeness(prompt: str, completion: str) -> float:
    return -abs(len(completion) - int(prompt.split()[-1]))


def small_task(tmp_path: Path, task: dict[str, Path]) -> Path:
    path = tmp_path / "few.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Count {i}", "answer": str(i), "level": i % 2}) + "\n"
                            for i in (3, 5, 8, 13)))
    return path


def test_best_of_n_picks_by_a_function_reading_the_answer_column(tmp_path, tiny_llama_dir, task):
    out = tmp_path / "bon"
    res = run(["best-of-n", "--model.name_or_path", str(tiny_llama_dir), "--prompts_path", str(small_task(tmp_path, task)),
               "--reward.functions", f"{task['rewards']}:closeness", "--n", "4", "--ns", "1,4",
               "--sampling.max_new_tokens", "8", "--output-dir", str(out), "--run.progress", "false"], tmp_path / "log")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "scorer 1 x closeness (user code from" in res.stdout
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["scores"] == [closeness(row["prompt"], r) for r in row["responses"]]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples/reward/closeness"] == pytest.approx(
        sum(sum(r["scores"]) for r in rows) / sum(len(r["scores"]) for r in rows))


def test_eval_scores_policies_with_answer_match_and_a_user_function(tmp_path, tiny_llama_dir, task):
    out = tmp_path / "eval"
    res = run(["eval", "--prompts", str(small_task(tmp_path, task)), "--reward.functions",
               f"answer_match,{task['rewards']}:closeness", "--reward.weights", "1,0.5", "--policies",
               f"base={tiny_llama_dir}", "--sampling.max_new_tokens", "8", "--output-dir", str(out),
               "--run.progress", "false"], tmp_path / "log")
    assert res.returncode == 0, res.stderr[-3000:]
    figures = json.loads((out / "eval.json").read_text())["methods"]["base"]
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    from alignkit.rewards.builtins import answer_match

    matched = answer_match([r["prompt"] for r in rows], [r["response"] for r in rows],
                           answer=[r["prompt"].split()[-1] for r in rows])
    near = [closeness(r["prompt"], r["response"]) for r in rows]
    assert [r["score"] for r in rows] == pytest.approx([m + 0.5 * c for m, c in zip(matched, near, strict=True)])
    assert figures["reward_answer_match"] == pytest.approx(sum(matched) / len(rows))
    assert figures["reward_closeness"] == pytest.approx(sum(near) / len(rows))


def test_label_with_a_function_as_the_labelers_utility(tmp_path, tiny_llama_dir, task):
    out = tmp_path / "label"
    few = small_task(tmp_path, task)
    res = run(["label", "--model.name_or_path", str(tiny_llama_dir), "--prompts", str(few), "--heldout_prompts",
               str(few), "--format", "choice", "--k", "3", "--budget", "3", "--heldout_budget", "0",
               "--labeler", "reward-model", "--reward.functions", f"{task['rewards']}:closeness",
               "--sampling.max_new_tokens", "8", "--output-dir", str(out), "--batch_size", "2"], tmp_path / "log")
    assert res.returncode == 0, res.stderr[-3000:]
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert train
    for row in train:
        assert row["utilities"] == pytest.approx([closeness(row["prompt"], r) for r in row["responses"]])
        assert row["utilities"][row["best"]] == max(row["utilities"])


def test_rejection_sampling_rounds_pick_with_its_reward_functions(tmp_path):
    from alignkit.config import resolve_config
    from alignkit.stages.rejection_sampling import RejectionSamplingConfig, best_of_n_config

    cfg = resolve_config(RejectionSamplingConfig, None, ["--reward.functions", 'format_match(pattern="[0-9]+"),x.py:f',
                                                         "--reward.weights", "1,2", "--prompts_path", "p.jsonl"])
    bon = best_of_n_config(cfg, "policy", 1, tmp_path)
    assert bon.reward.functions == ['format_match(pattern="[0-9]+")', "x.py:f"] and bon.reward.weights == [1.0, 2.0]
    assert bon.scorer == ""  # the functions alone pick the winners (no gold added)


SEEN: list[tuple[str, str]] = []


def python_reward(prompts, completions, answer, **kwargs):
    SEEN.extend(zip(prompts, answer, strict=True))
    return [1.0 if a in c else 0.0 for c, a in zip(completions, answer, strict=True)]


def test_a_python_callable_from_python_with_run_config(tmp_path, tiny_llama_dir, task):
    import yaml

    from alignkit.config import resolve_config
    from alignkit.trainers import rl

    cfg = resolve_config(rl.GRPOConfig, None, grpo_args(tiny_llama_dir, task, tmp_path / "run")[1:])
    cfg.reward.functions = [python_reward, "format_match(pattern='.*')"]
    SEEN.clear()
    summary = rl.run(cfg)
    assert SEEN and all(prompt == f"Count {answer}" for prompt, answer in SEEN)
    assert "eval/reward_python_reward" in summary["after"]
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["reward"]["functions"] == [f"python:{__name__}.python_reward", "format_match(pattern='.*')"]
