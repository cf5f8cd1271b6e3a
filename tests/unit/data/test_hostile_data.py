"""Hostile data files (issue 19, "Data loading" and two "Silent wrong results" items): unreadable JSONL
lines, a format guessed from row 1, RL rows named within a split, a huge line, whitespace-only
prompts, digit-only CSV text, reward skip counts and duplicate rows."""

from __future__ import annotations

import csv
import json
import tracemalloc
from pathlib import Path

import pytest
from tests.conftest import build_tiny_tokenizer

from alignkit.config import DataConfig, OptimConfig, RunConfig
from alignkit.data import load
from alignkit.data.formats import choose_format, print_report, validate_records
from alignkit.data.load import BadRow, load_records, split_records
from alignkit.data.reward_groups import load_reward_data
from alignkit.errors import AlignkitError
from alignkit.stages.best_of_n import BestOfNConfig, load_prompts
from alignkit.stages.eval import EvalConfig, eval_prompts
from alignkit.stages.label import LabelConfig, resolve_inputs
from alignkit.trainers.dpo import DPOConfig, load_preference_data
from alignkit.trainers.reward import RewardConfig
from alignkit.trainers.rl_config import GRPOConfig
from alignkit.trainers.rl_setup import _load_prompts
from alignkit.trainers.sft import SFTConfig, load_sft_data

PREF = [{"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad answer {i}."} for i in range(6)]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# -- 1. unparsable JSONL lines -------------------------------------------------------------------


def _broken(tmp_path: Path) -> str:
    return _jsonl(tmp_path / "sft.jsonl", [
        {"prompt": "Hi", "completion": "Hello"},
        '{"prompt": "torn',  # a write cut short
        "[1, 2]",  # JSON, but not an object
        {"prompt": "Bye", "completion": "Goodbye"},
    ])


def test_unparsable_line_is_an_error_naming_file_and_line(tmp_path):
    path = _broken(tmp_path)
    with pytest.raises(AlignkitError, match=r"sft\.jsonl, line 2: not valid JSON"):
        load_records(path)


def test_unparsable_lines_are_skipped_and_counted_with_skip(tmp_path, tok, capsys):
    path = _broken(tmp_path)
    records = load_records(path, on_bad_rows="skip")
    assert records[1] == BadRow(2, records[1].reason) and "not valid JSON" in records[1].reason
    assert records[2] == BadRow(3, "expected a JSON object, got a list")
    report = validate_records(records, "sft", path, on_bad_rows="skip")
    assert [r["prompt"] for r in report.records] == ["Hi", "Bye"] and report.rows == [1, 4]
    assert [(row, reason.split(" (")[0]) for row, _, reason in report.skipped] == [
        (2, "not valid JSON"), (3, "expected a JSON object, got a list")]  # a JSONL row is its line
    print_report(report, path, "sft")
    assert "sft.jsonl: 2 bad row(s) skipped" in capsys.readouterr().out
    data = load_sft_data(SFTConfig(data=DataConfig(path=path, eval_fraction=0.0, on_bad_rows="skip")), tok)
    assert data["skipped_rows"] == 2 and len(data["train"]) == 2
    # every stage that reads a data file passes the option on
    prompts = _jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}, "{oops", {"prompt": "Bye"}])
    train, _, counts, _ = _load_prompts(GRPOConfig(data=DataConfig(path=prompts, eval_path=prompts,
                                                                on_bad_rows="skip")), None)
    assert train == ["Hi", "Bye"]
    assert counts == {"skipped_rows": 2, "duplicate_rows": 0}  # one per file read (train and held-out)
    pref = _jsonl(tmp_path / "pref.jsonl", [*PREF[:3], "not json", *PREF[3:]])
    data = load_preference_data(DPOConfig(data=DataConfig(path=pref, eval_fraction=0.0, on_bad_rows="skip")), tok)
    assert data["skipped"] == 1 and len(data["train"]) == 6


def test_a_line_cut_short_is_reported_at_its_own_last_column(tmp_path):
    torn = '{"prompt": "x", "completion": '  # a write cut short mid-value
    path = _jsonl(tmp_path / "sft.jsonl", [{"prompt": "Hi", "completion": "Hello"}, torn])
    with pytest.raises(AlignkitError) as err:
        load_records(path)
    assert str(err.value) == f"{path}, line 2: not valid JSON (Expecting value at column {len(torn) + 1})"
    crlf = tmp_path / "crlf.jsonl"  # a Windows line ending is not part of the line either
    crlf.write_bytes(b'{"prompt": "Hi", "completion": "Hello"}\r\n{"prompt": "x", "completion": \r\n')
    with pytest.raises(AlignkitError, match=rf"line 2: not valid JSON \(Expecting value at column {len(torn) + 1}\)"):
        load_records(str(crlf))


def test_rows_of_a_jsonl_file_are_its_lines_blank_lines_counted(tmp_path, tok, capsys):
    good = [{"prompt": f"Q{i}", "completion": f"A{i}"} for i in range(7)]
    path = _jsonl(tmp_path / "sft.jsonl", [good[0], "", "  ", *good[1:], {"prompt": "Q9"}, '{"prompt": "torn'])
    # lines: 1 a record, 2-3 blank, 4-9 records, 10 lacks `completion`, 11 is torn
    with pytest.raises(AlignkitError, match=r"sft\.jsonl, row 10, field 'completion': missing"):
        validate_records(load_records(path, on_bad_rows="skip"), "sft", path)
    report = validate_records(load_records(path, on_bad_rows="skip"), "sft", path, on_bad_rows="skip")
    assert report.rows == [1, 4, 5, 6, 7, 8, 9]
    assert [(row, name) for row, name, _ in report.skipped] == [(10, "completion"), (11, None)]
    print_report(report, path, "sft")
    out = capsys.readouterr().out
    assert "row 10, field 'completion': missing" in out and "row 11: not valid JSON" in out
    data = load_sft_data(SFTConfig(data=DataConfig(path=path, eval_fraction=0.0, on_bad_rows="skip", limit=3)), tok)
    assert data["skipped_rows"] == 2 and len(data["train"]) == 3
    # RL: the file's line, whatever the split; `data.limit` keeps the lines of the rows it keeps
    prompts = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, "", {"prompt": "b"}, "", "", {"prompt": 3}])
    for cfg in (DataConfig(path=prompts, eval_fraction=0.0), DataConfig(path=prompts, eval_fraction=0.5, limit=3)):
        with pytest.raises(AlignkitError, match=r"p\.jsonl, row 6, field 'prompt': expected a string"):
            _load_prompts(GRPOConfig(data=cfg), None)
    # other sources keep their rows: a CSV's row N is its N-th record (the header is not a row)
    table = tmp_path / "sft.csv"
    table.write_text("prompt,completion\nQ1,A1\nQ2,\n")
    with pytest.raises(AlignkitError, match=r"sft\.csv, row 2, field 'completion'"):
        validate_records(load_records(str(table)), "sft", str(table))


# -- 2. the format is decided from the stage, and a row that does not fit is named ---------------


def test_a_dpo_file_whose_first_row_lacks_rejected_names_row_and_field(tmp_path, tok):
    path = _jsonl(tmp_path / "pref.jsonl", [{"prompt": "Sky?", "chosen": "Blue"}, *PREF])
    cfg = DPOConfig(data=DataConfig(path=path, eval_fraction=0.0))
    with pytest.raises(AlignkitError, match=r"pref\.jsonl, row 1, field 'rejected': missing; 'preference' records"):
        load_preference_data(cfg, tok)
    cfg.data.on_bad_rows = "skip"
    assert len(load_preference_data(cfg, tok)["train"]) == len(PREF)
    # every row lacking `rejected`: still a preference file with rows to fix, not "'prompt' records"
    only = _jsonl(tmp_path / "only.jsonl", [{"prompt": "Sky?", "chosen": "Blue"}] * 2)
    with pytest.raises(AlignkitError, match=r"only\.jsonl, row 1, field 'rejected': missing"):
        load_preference_data(DPOConfig(data=DataConfig(path=only, eval_fraction=0.0)), tok)
    with pytest.raises(AlignkitError, match=r"only\.jsonl, row 1, field 'rejected': missing"):
        load_reward_data(RewardConfig(data=DataConfig(path=only, eval_fraction=0.0)), tok)


def test_choose_format_votes_over_rows_within_the_stage_kinds():
    accepted = ("preference", "ranking", "unpaired")
    rows = [{"prompt": "x", "chosen": "a"}, *PREF]
    assert choose_format(rows, accepted) == "preference"
    ranking = {"prompt": "x", "responses": ["a", "b"]}
    assert choose_format([ranking, *PREF[:2]], accepted) == "preference"  # most rows
    assert choose_format([ranking, PREF[0]], accepted) == "preference"  # a tie: the first accepted kind
    assert choose_format([{"prompt": "x", "completion": "y"}], accepted) == "sft"  # another kind: callers name it
    assert choose_format([{"prompt": "x", "response": "y"}], ("rating", "steps")) == "rating"  # lacks `score`
    assert choose_format([BadRow(1, "not valid JSON"), ranking], accepted) == "ranking"
    assert choose_format([{"text": "x"}], ("prompt",)) == "prompt"
    with pytest.raises(AlignkitError, match="record formats"):
        choose_format(PREF, ("pairs",))


# -- 3. RL prompt errors name the file's row -----------------------------------------------------


def test_rl_prompt_errors_name_the_files_row_not_the_splits(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": f"Prompt {i}"} for i in range(5)] + [{"prompt": 3}])
    for fraction in (0.0, 0.34, 0.5):
        with pytest.raises(AlignkitError, match=r"p\.jsonl, row 6, field 'prompt': expected a string"):
            _load_prompts(GRPOConfig(data=DataConfig(path=path, eval_fraction=fraction)), None)


# -- 4. a huge line is refused early, naming file, line, size and limit -------------------------


def test_a_line_over_the_limit_is_refused_naming_size_and_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(load, "MAX_LINE_BYTES", 1000)
    big = json.dumps({"prompt": "x" * 990, "completion": "y"})
    assert len(big) == 1023
    path = _jsonl(tmp_path / "big.jsonl", [{"prompt": "a", "completion": "b"}, big, {"prompt": "c", "completion": "d"}])
    with pytest.raises(AlignkitError, match=r"big\.jsonl, line 2: 1,023 bytes, over the limit of 1,000 bytes per "
                                            r"line \(alignkit\.data\.load\.MAX_LINE_BYTES\)"):
        load_records(path)
    records = load_records(path, on_bad_rows="skip")
    assert isinstance(records[1], BadRow) and records[1].line == 2 and [r["prompt"] for r in records[::2]] == ["a", "c"]
    report = validate_records(records, "sft", path, on_bad_rows="skip")
    assert report.n_skipped == 1 and "over the limit" in report.skipped[0][2]
    # a line of exactly the limit (newline not counted) is read
    exact = json.dumps({"prompt": "x" * (1000 - len(json.dumps({"prompt": "", "completion": "y"}))), "completion": "y"})
    assert len(exact) == 1000 and len(load_records(_jsonl(tmp_path / "exact.jsonl", [exact]))) == 1


def test_a_huge_line_is_streamed_not_held_in_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(load, "MAX_LINE_BYTES", 64 * 1024)
    path = tmp_path / "huge.jsonl"
    with path.open("w") as handle:
        handle.write(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
        handle.write('{"prompt": "' + "x" * (8 * 2**20) + '", "completion": "y"}\n')  # an 8 MiB line
    tracemalloc.start()
    try:
        records = load_records(str(path), on_bad_rows="skip")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(records[1], BadRow) and "8,388," in records[1].reason
    assert peak < 4 * 2**20, f"peak {peak:,} bytes while skipping an 8 MiB line"


def test_csv_fields_longer_than_csvs_default_limit_are_read(tmp_path):
    path = tmp_path / "long.csv"
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([["prompt", "completion"], ["Hi", "y" * 200_000]])
    assert len(load_records(str(path))[0]["completion"]) == 200_000


# -- 5. whitespace-only prompts are refused by every prompt-reading stage ------------------------


def test_whitespace_only_prompts_are_refused_naming_file_row_and_field(tmp_path, capsys):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}, {"prompt": "  \n\t"}, {"prompt": "Bye"}])
    where = r"p\.jsonl, row 2, field 'prompt': empty string \(only whitespace\)"
    with pytest.raises(AlignkitError, match=where):
        _load_prompts(GRPOConfig(data=DataConfig(path=path, eval_fraction=0.0)), None)
    with pytest.raises(AlignkitError, match=where):
        load_prompts(BestOfNConfig(prompts_path=path), None)
    with pytest.raises(AlignkitError, match=where):
        resolve_inputs(LabelConfig(prompts=path), None)
    with pytest.raises(AlignkitError, match=where):
        eval_prompts(EvalConfig(prompts=path), None)
    conversation = _jsonl(tmp_path / "c.jsonl", [{"prompt": [{"role": "user", "content": " "}]}])
    with pytest.raises(AlignkitError, match=r"c\.jsonl, row 1, field 'prompt\[0\]\.content': empty string"):
        _load_prompts(GRPOConfig(data=DataConfig(path=conversation, eval_path=conversation)), None)
    capsys.readouterr()
    train, *_ = _load_prompts(GRPOConfig(data=DataConfig(path=path, eval_path=path, on_bad_rows="skip")), None)
    assert train == ["Hi", "Bye"]
    assert "p.jsonl: 1 bad row(s) skipped" in capsys.readouterr().out


# -- 6. digit-only CSV text stays text -----------------------------------------------------------


def _csv(path: Path, rows: list[list[str]]) -> str:
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return str(path)


def test_digit_only_csv_text_columns_stay_strings(tmp_path):
    sft = _csv(tmp_path / "sft.csv", [["prompt", "completion"], ["123", "456"], ["7", "8"]])
    records = load_records(sft)
    assert records == [{"prompt": "123", "completion": "456"}, {"prompt": "7", "completion": "8"}]
    assert validate_records(records, "sft", sft).records == records
    pref = _csv(tmp_path / "pref.csv", [["prompt", "chosen", "rejected", "margin"], ["2+2", "4", "5", "1.5"]])
    assert load_records(pref) == [{"prompt": "2+2", "chosen": "4", "rejected": "5", "margin": 1.5}]
    rating = _csv(tmp_path / "rating.csv", [["prompt", "response", "score", "id"], ["1", "2", "3", "17"]])
    assert load_records(rating) == [{"prompt": "1", "response": "2", "score": 3, "id": "17"}]
    unpaired = _csv(tmp_path / "kto.csv", [["prompt", "completion", "label"], ["1", "2", "true"]])
    assert validate_records(load_records(unpaired), "unpaired", unpaired).records[0]["label"] is True
    # a labeler's answers file: `chosen` (without `rejected`) is the index of the preferred response
    answers = _csv(tmp_path / "answers.csv", [["id", "chosen"], ["q1", "0"], ["q2", "1"]])
    assert [r["chosen"] for r in load_records(answers)] == [0, 1]


# -- 7. the reward stage reports skipped rows in summary.json ------------------------------------


def test_reward_data_counts_skipped_rows(tmp_path, tok):
    path = _jsonl(tmp_path / "pref.jsonl", [*PREF, {"prompt": "x", "chosen": "same", "rejected": "same"}, "{torn"])
    data = load_reward_data(RewardConfig(data=DataConfig(path=path, eval_fraction=0.0, on_bad_rows="skip")), tok)
    assert data["skipped_rows"] == 2 and data["duplicate_rows"] == 0 and len(data["train"]) == len(PREF)


def test_reward_summary_carries_skipped_rows(tmp_path, tiny_llama_dir):
    from alignkit.config import ModelConfig
    from alignkit.trainers.reward import run

    path = _jsonl(tmp_path / "pref.jsonl", [*PREF, "{torn", {"prompt": "x", "chosen": "a"}])
    out = tmp_path / "rm"
    cfg = RewardConfig(run=RunConfig(output_dir=str(out), report_to=[], progress=False),
                       model=ModelConfig(name_or_path=str(tiny_llama_dir)),
                       data=DataConfig(path=path, eval_fraction=0.0, on_bad_rows="skip", max_length=32),
                       optim=OptimConfig(max_steps=1, per_device_batch_size=2, warmup_steps=0), normalize=False)
    run(cfg)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_rows"] == 2 and summary["duplicate_rows"] == 0


# -- 8. duplicate rows: counted, warned of, and kept on one side of a split ----------------------


def test_split_keeps_copies_on_one_side():
    records = [{"prompt": "same", "completion": "row"}] * 150 + [{"prompt": f"p{i}", "completion": "c"} for i in range(50)]
    train, held = split_records(records, 0.1, seed=0)
    assert len(train) + len(held) == 200 and 1 <= len(held) <= 20
    assert not {json.dumps(r) for r in held} & {json.dumps(r) for r in train}
    for seed in range(20):  # whichever side the copies land on, they land together
        train, held = split_records(records * 1, 0.3, seed=seed)
        assert not {json.dumps(r) for r in held} & {json.dumps(r) for r in train}
    # all distinct: the same split as before (a seeded shuffle, the first round(n * f) held out)
    distinct = list(range(40))
    train, held = split_records(distinct, 0.25, seed=3)
    assert len(held) == 10 and sorted(train + held) == distinct
    with pytest.raises(AlignkitError, match=r"of 150 records \(1 distinct\) leaves none for training"):
        split_records(records[:150], 0.1, seed=0)


def test_duplicate_rows_are_counted_warned_of_and_not_held_out_against_themselves(tmp_path, tok, capsys):
    rows = [{"prompt": "Same?", "completion": "Same."}] * 30 + [{"prompt": f"P{i}?", "completion": f"C{i}."}
                                                              for i in range(30)]
    path = _jsonl(tmp_path / "sft.jsonl", rows)
    report = validate_records(load_records(path), "sft", path)
    assert report.n_duplicates == 29 and report.duplicate_of[2] == 1
    data = load_sft_data(SFTConfig(data=DataConfig(path=path, eval_fraction=0.2)), tok)
    assert "sft.jsonl: 29 row(s) repeat an earlier row exactly (row 2 = row 1" in capsys.readouterr().out
    assert data["duplicate_rows"] == 29
    train_ids = {tuple(ex["input_ids"]) for ex in data["train"]}
    assert data["eval"] and not {tuple(ex["input_ids"]) for ex in data["eval"]} & train_ids
    # DPO and reward split the same way
    pref = _jsonl(tmp_path / "pref.jsonl", [PREF[0]] * 20 + PREF[1:] * 3)
    dpo = load_preference_data(DPOConfig(data=DataConfig(path=pref, eval_fraction=0.2)), tok)
    key = lambda g: tuple(tuple(r["input_ids"]) for r in g["responses"])  # noqa: E731
    assert dpo["duplicates"] == 19 + 10 and dpo["eval"] and not {key(g) for g in dpo["eval"]} & {key(g) for g in dpo["train"]}
    reward = load_reward_data(RewardConfig(data=DataConfig(path=pref, eval_fraction=0.2)), tok)
    keys = lambda part: {tuple(map(tuple, g["items"])) for g in reward[part]}  # noqa: E731
    assert reward["duplicate_rows"] == 29 and reward["eval"] and not keys("eval") & keys("train")
    # RL prompts: counted for summary.json, copies of a prompt on one side of the split
    prompts = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Same"}] * 10 + [{"prompt": f"P{i}"} for i in range(10)])
    train, held, counts, _ = _load_prompts(GRPOConfig(data=DataConfig(path=prompts, eval_fraction=0.3)), None)
    assert counts == {"skipped_rows": 0, "duplicate_rows": 9} and held and not set(train) & set(held)


def test_data_warnings_print_on_the_main_process_only(tmp_path, monkeypatch, capsys):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}, {"prompt": "Hi"}, {"prompt": 3}])
    report = validate_records(load_records(path), "prompt", path, on_bad_rows="skip")
    monkeypatch.setenv("RANK", "1")  # what `accelerate launch` sets on the second process
    print_report(report, path, "grpo")
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    print_report(report, path, "grpo")
    out = capsys.readouterr().out
    assert "1 bad row(s) skipped" in out and "1 row(s) repeat an earlier row" in out
