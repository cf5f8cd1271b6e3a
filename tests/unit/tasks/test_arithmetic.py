"""The generated arithmetic task: correct answers, disjoint splits, determinism, valid JSONL, CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from alignkit.cli import main
from alignkit.rewards.builtins import answer_match
from alignkit.tasks import arithmetic as task

FILES = ("sft_train", "sft_heldout", "prompts_train", "prompts_heldout")
SMALL = dict(n_train=300, n_sft=1000, n_heldout=100, n_sft_heldout=100)


def _read(path):
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def _value(prompt: str) -> int:
    """Recompute a prompt's value independently of the generator: join spaced digits, then eval."""
    assert re.fullmatch(r"(\d( \d)* [-+*] )+\d( \d)* =", prompt), prompt
    expr = re.sub(r"(?<=\d) (?=\d)", "", prompt[:-2])
    assert re.fullmatch(r"\d+( [-+*] \d+)+", expr)
    return eval(expr)  # noqa: S307 - digits and + - * only, checked above


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("arith")
    info = task.write_task(out, seed=3, **SMALL)
    return out, info, {name: _read(out / f"{name}.jsonl") for name in FILES}


def test_files_and_counts(written):
    out, info, rows = written
    assert json.loads((out / "task.json").read_text()) == info
    assert info["counts"] == {
        "sft_train": 1000,
        "sft_heldout": 100,
        "prompts_train": 300,
        "prompts_heldout": 100,
    }
    for name in FILES:
        assert len(rows[name]) == info["counts"][name]
        keys = {"prompt", "completion"} if name.startswith("sft_") else {"prompt", "answer"}
        assert all(set(r) == keys and all(isinstance(v, str) for v in r.values()) for r in rows[name])
    assert sum(info["mix"]["prompts_heldout"].values()) == 100


def test_answers_are_correct(written):
    _, _, rows = written
    for name in FILES:
        for r in rows[name]:
            value = _value(r["prompt"])
            assert value >= 0  # allow_negative is off by default
            if name.startswith("sft_"):
                assert r["completion"] == " " + " ".join(str(value))
                assert task.extract_answer(r["completion"]) == str(value)
            else:
                assert r["answer"] == " ".join(str(value))


def test_splits_are_disjoint_and_eval_splits_distinct(written):
    _, info, rows = written
    prompts = {name: [r["prompt"] for r in rows[name]] for name in FILES}
    for i, a in enumerate(FILES):
        for b in FILES[i + 1 :]:
            assert not set(prompts[a]) & set(prompts[b]), (a, b)
    for name in ("sft_heldout", "prompts_train", "prompts_heldout"):
        assert len(set(prompts[name])) == len(prompts[name])
    assert info["distinct"]["sft_train"] == len(set(prompts["sft_train"]))


def test_deterministic_under_seed(tmp_path, written):
    out, info, _ = written
    assert task.write_task(tmp_path / "same", seed=3, **SMALL) == info
    for name in (*FILES, "task"):
        ext = "json" if name == "task" else "jsonl"
        assert (tmp_path / "same" / f"{name}.{ext}").read_bytes() == (out / f"{name}.{ext}").read_bytes()
    task.write_task(tmp_path / "other", seed=4, **SMALL)
    assert (tmp_path / "other" / "prompts_heldout.jsonl").read_bytes() != (
        out / "prompts_heldout.jsonl"
    ).read_bytes()


def test_eval_splits_do_not_depend_on_n_sft(tmp_path, written):
    out, _, _ = written
    task.write_task(tmp_path, seed=3, **{**SMALL, "n_sft": 50})
    for name in ("prompts_heldout", "sft_heldout", "prompts_train"):
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (out / f"{name}.jsonl").read_bytes()


def test_options(tmp_path):
    info = task.write_task(
        tmp_path,
        seed=0,
        n_train=50,
        n_sft=200,
        n_heldout=50,
        n_sft_heldout=20,
        max_operand=30,
        weights={"sub": 1},
        allow_negative=True,
    )
    rows = _read(tmp_path / "prompts_heldout.jsonl")
    assert info["mix"]["prompts_heldout"] == {"sub": 50}
    for r in rows:
        a, b = (int(x.replace(" ", "")) for x in r["prompt"][:-2].split(" - "))
        assert r["answer"] == task.spell(a - b) and a - b == _value(r["prompt"]) and a <= 30 and b <= 30
    assert any(r["answer"].startswith("- ") for r in rows)
    assert task.spell(-12) == "- 1 2" and task.extract_answer(" - 1 2") == "-12"
    with pytest.raises(ValueError, match="used up"):
        task.write_task(
            tmp_path, n_heldout=50, n_train=0, n_sft=0, n_sft_heldout=0, max_operand=3, weights={"add": 1}
        )
    with pytest.raises(ValueError, match="unknown operations"):
        task.write_task(tmp_path, weights={"div": 1})


def test_extract_answer():
    assert task.extract_answer(" 8 1") == "81"
    assert task.extract_answer(" 81") == "81"
    assert task.extract_answer(" 8 1\n2 3") == "81"
    assert task.extract_answer(" 8 1 + 2") == "81"
    assert task.extract_answer(" none") is None
    assert task.extract_answer("\n8") is None


def test_answer_match_full_scores_the_written_answers(written):
    """The documented reward, `answer_match(extract=full)`, is 1 on each SFT completion and 0 on near misses."""
    _, _, rows = written
    heldout = rows["prompts_heldout"]
    answers = [r["answer"] for r in heldout]
    right = [" " + a for a in answers]
    wrong = [" " + a + " 1" for a in answers]  # an extra digit
    assert answer_match([r["prompt"] for r in heldout], right, extract="full", answer=answers) == [1.0] * len(answers)
    assert answer_match([r["prompt"] for r in heldout], wrong, extract="full", answer=answers) == [0.0] * len(answers)


def test_cli(tmp_path, capsys):
    out = tmp_path / "task"
    args = ["task", "--run.output_dir", str(out), "--run.seed", "1", "--n_train", "20", "--n_sft", "30",
            "--n_heldout", "10", "--n_sft_heldout", "10", "--difficulty", "1", "--weights", "1,0,1,0"]
    done = subprocess.run([sys.executable, "-m", "alignkit.cli", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    info = json.loads((out / "task.json").read_text())
    assert info["settings"]["seed"] == 1 and info["settings"]["max_operand"] == 20
    assert set(info["mix"]["sft_train"]) == {"add", "mul"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["sft_train"] == 30 and summary["files"]["prompts_heldout"].endswith("prompts_heldout.jsonl")
    # user errors: one line, exit 2 (in-process, as the entry point calls it)
    assert main(["task", "--run.output_dir", str(tmp_path / "b"), "--weights", "1,2"]) == 2
    err = capsys.readouterr().err
    assert "option `weights`: expected 4 values" in err and "Traceback" not in err
    assert main(["task", "--run.output_dir", str(tmp_path / "c"), "--max_operand", "3", "--weights", "1,0,0,0"]) == 2
    err = capsys.readouterr().err
    assert "used up" in err and "Traceback" not in err
    assert main(["task", "--help"]) == 0
    assert "--allow_negative" in capsys.readouterr().out
