"""Record formats: valid examples of every kind, every validation error (row and field named), skip mode."""

import math

import pytest

from alignkit.data.formats import (
    KINDS,
    ValidationReport,
    detect_format,
    validate_records,
)
from alignkit.errors import AlignkitError

SOURCE = "data/train.jsonl"


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


def system(content):
    return {"role": "system", "content": content}


CONV_PROMPT = [system("Be brief."), user("Hi"), assistant("Hello"), user("Sky colour?")]

VALID = {
    "text": [{"text": "Once upon a time."}],
    "prompt": [{"prompt": "Write a poem."}, {"prompt": CONV_PROMPT}],
    "sft": [
        {"prompt": "2+2?", "completion": "4"},
        {"messages": [system("Be brief."), user("2+2?"), assistant("4"), user("And 3+3?"), assistant("6")]},
        {"prompt": [user("2+2?")], "completion": [assistant("4")]},
    ],
    "preference": [
        {"prompt": "Sky?", "chosen": "Blue", "rejected": "Green", "source": "extra fields are kept"},
        {"prompt": CONV_PROMPT, "chosen": [assistant("Blue")], "rejected": [assistant("Green")]},
        {
            "prompt": [user("Hi")],
            "chosen": [assistant("Hey"), user("Sky?"), assistant("Blue")],
            "rejected": [assistant("Go away")],
        },
    ],
    "ranking": [{"prompt": "Sky?", "responses": ["Blue", "Azure", "Green"]}],
    "choice": [
        {"prompt": "Sky?", "responses": ["Green", "Blue"], "best": 1},
        {"prompt": "Sky?", "responses": ["Blue", "Blue"], "best": 0},  # identical samples are allowed
    ],
    "rating": [
        {"prompt": "Sky?", "response": "Blue", "score": 0.9},
        {"prompt": "Sky?", "response": "Red", "score": -3},
    ],
    "unpaired": [{"prompt": "Sky?", "completion": "Blue", "label": True}],
    "steps": [
        {"prompt": "3*4+1?", "steps": ["3*4 = 12", "12+1 = 13"], "labels": [True, True]},
        {"prompt": "3*4+1?", "steps": ["3*4 = 12", "12+1 = 14"], "labels": [1.0, 0]},
    ],
}


@pytest.mark.parametrize("kind", KINDS)
def test_valid_records_of_every_kind_pass_unchanged(kind):
    report = validate_records(VALID[kind], kind, SOURCE)
    assert isinstance(report, ValidationReport)
    assert report.records == VALID[kind]
    assert report.skipped == [] and report.n_skipped == 0


def test_every_kind_has_a_valid_example():
    assert set(VALID) == set(KINDS)


PREF = {"prompt": "Sky?", "chosen": "Blue", "rejected": "Green"}
CASES = [
    # (kind, bad record, field named, fragment of the reason)
    ("text", {"txt": "typo"}, "text", "missing; 'text' records have fields {text}"),
    ("text", {"text": ""}, "text", "empty string"),
    ("text", {"text": "   \n"}, "text", "empty string"),
    ("text", {"text": 42}, "text", "expected a string, got int 42"),
    ("prompt", {"prompt": None}, "prompt", "missing"),
    ("prompt", {"prompt": []}, "prompt", "empty list"),
    ("prompt", {"prompt": [user("Hi"), assistant("Hello")]}, "prompt", "must end with a 'user' turn"),
    ("prompt", {"prompt": [system("S")]}, "prompt", "must end with a 'user' turn, not 'system'"),
    (
        "sft",
        {"prompt": "Hi"},
        "completion",
        "missing; 'sft' records have fields {prompt, completion} or {messages}",
    ),
    (
        "sft",
        {"prompt": "Hi", "completion": ["Hello"]},
        "completion",
        "expected a string, as 'prompt' is a string",
    ),
    ("sft", {"messages": []}, "messages", "empty list"),
    ("sft", {"messages": "Hi"}, "messages", "expected a list, got str"),
    ("sft", {"messages": [user("Hi")]}, "messages", "no 'assistant' turn"),
    (
        "sft",
        {"messages": [user("Hi"), assistant("Yo"), user("Hm")]},
        "messages",
        "must end with an 'assistant' turn",
    ),
    ("sft", {"messages": [assistant("Hi")]}, "messages[0].role", "must start with a 'user' turn"),
    (
        "sft",
        {"messages": [system("S"), system("T")]},
        "messages[1].role",
        "'system' message is allowed only first",
    ),
    (
        "sft",
        {"messages": [user("Hi"), system("S"), assistant("A")]},
        "messages[1].role",
        "allowed only first",
    ),
    ("sft", {"messages": [user("Hi"), user("Hi again")]}, "messages[1].role", "'user' follows 'user'"),
    ("sft", {"messages": [user("Hi"), {"role": "bot", "content": "Yo"}]}, "messages[1].role", "got 'bot'"),
    ("sft", {"messages": [user("Hi"), {"content": "Yo"}]}, "messages[1].role", "got None"),
    ("sft", {"messages": [user("Hi"), assistant("")]}, "messages[1].content", "empty string"),
    ("sft", {"messages": [user("Hi"), {"role": "assistant"}]}, "messages[1].content", "missing"),
    ("sft", {"messages": [user("Hi"), assistant(["x"])]}, "messages[1].content", "expected a string"),
    ("sft", {"messages": ["Hi"]}, "messages[0]", "expected a message {role, content}"),
    ("preference", {"prompt": "Sky?", "chosen": "Blue"}, "rejected", "missing"),
    ("preference", {**PREF, "rejected": "Blue"}, "chosen", "identical to 'rejected'"),
    ("preference", {**PREF, "chosen": ""}, "chosen", "empty string"),
    ("preference", {**PREF, "rejected": 3}, "rejected", "expected a string"),
    (
        "preference",
        {**PREF, "prompt": [user("Sky?")]},
        "chosen",
        "expected a list of messages, as 'prompt' is one",
    ),
    (
        "preference",
        {"prompt": [user("Sky?")], "chosen": [assistant("Blue")], "rejected": [user("Green")]},
        "rejected[0].role",
        "'user' follows 'user'",
    ),
    (
        "preference",
        {"prompt": [user("Sky?")], "chosen": [assistant("Blue"), user("ok")], "rejected": [assistant("Red")]},
        "chosen",
        "must end with an 'assistant' turn, not 'user'",
    ),
    (
        "preference",
        {"prompt": [user("Sky?")], "chosen": [assistant("Blue")], "rejected": [assistant("Blue")]},
        "chosen",
        "identical to 'rejected'",
    ),
    ("ranking", {"prompt": "Sky?", "responses": ["Blue"]}, "responses", "at least 2 items, got 1"),
    ("ranking", {"prompt": "Sky?", "responses": "Blue"}, "responses", "expected a list"),
    (
        "ranking",
        {"prompt": "Sky?", "responses": ["Blue", "Red", "Blue"]},
        "responses[2]",
        "identical to responses[0]",
    ),
    ("ranking", {"prompt": "Sky?", "responses": ["Blue", ""]}, "responses[1]", "empty string"),
    ("ranking", {"prompt": "", "responses": ["Blue", "Red"]}, "prompt", "empty string"),
    ("choice", {"prompt": "Sky?", "responses": ["A", "B"]}, "best", "missing"),
    (
        "choice",
        {"prompt": "Sky?", "responses": ["A", "B"], "best": 2},
        "best",
        "index 2 is out of range for 2",
    ),
    ("choice", {"prompt": "Sky?", "responses": ["A", "B"], "best": -1}, "best", "out of range"),
    ("choice", {"prompt": "Sky?", "responses": ["A", "B"], "best": "1"}, "best", "expected an integer index"),
    (
        "choice",
        {"prompt": "Sky?", "responses": ["A", "B"], "best": True},
        "best",
        "expected an integer index",
    ),
    ("choice", {"prompt": "Sky?", "responses": ["A", "B"], "best": 1.0}, "best", "expected an integer index"),
    (
        "rating",
        {"prompt": "Sky?", "response": "Blue", "score": math.nan},
        "score",
        "expected a finite number",
    ),
    (
        "rating",
        {"prompt": "Sky?", "response": "Blue", "score": math.inf},
        "score",
        "expected a finite number",
    ),
    (
        "rating",
        {"prompt": "Sky?", "response": "Blue", "score": "high"},
        "score",
        "expected a number, got str",
    ),
    (
        "rating",
        {"prompt": "Sky?", "response": "Blue", "score": False},
        "score",
        "expected a number, got bool",
    ),
    ("rating", {"prompt": "Sky?", "score": 1.0}, "response", "missing"),
    (
        "unpaired",
        {"prompt": "Sky?", "completion": "Blue", "label": 1},
        "label",
        "expected true or false, got int 1",
    ),
    ("unpaired", {"prompt": "Sky?", "completion": "", "label": True}, "completion", "empty string"),
    ("steps", {"prompt": "Q", "steps": [], "labels": []}, "steps", "empty list"),
    ("steps", {"prompt": "Q", "steps": ["a", "b"], "labels": [True]}, "labels", "1 labels for 2 steps"),
    ("steps", {"prompt": "Q", "steps": ["a", ""], "labels": [1, 0]}, "steps[1]", "empty string"),
    (
        "steps",
        {"prompt": "Q", "steps": ["a", "b"], "labels": [True, 0.5]},
        "labels",
        "mixes true/false and numbers",
    ),
    ("steps", {"prompt": "Q", "steps": ["a", "b"], "labels": [1, "ok"]}, "labels[1]", "expected a number"),
    ("steps", {"prompt": "Q", "steps": ["a"], "labels": [math.nan]}, "labels[0]", "expected a finite number"),
]


@pytest.mark.parametrize(("kind", "record", "field", "reason"), CASES)
def test_invalid_record_error_names_source_row_and_field(kind, record, field, reason):
    records = [VALID[kind][0], record]  # the bad record is row 2
    with pytest.raises(AlignkitError) as info:
        validate_records(records, kind, SOURCE)
    message = str(info.value)
    assert message.startswith(f"{SOURCE}, row 2, field '{field}': "), message
    assert reason in message


def test_documented_example_message():
    records = [PREF] * 16 + [{**PREF, "rejected": "Blue"}]
    with pytest.raises(AlignkitError) as info:
        validate_records(records, "preference", SOURCE)
    assert str(info.value) == "data/train.jsonl, row 17, field 'chosen': identical to 'rejected'"


def test_record_that_is_not_an_object_names_the_row():
    with pytest.raises(AlignkitError, match=r"^data/train\.jsonl, row 1: expected a record .*got list"):
        validate_records([["Sky?", "Blue"]], "preference", SOURCE)


def test_skip_mode_counts_and_keeps_reasons():
    records = [
        PREF,
        {**PREF, "rejected": "Blue"},
        {"prompt": "Sky?", "chosen": "Blue"},
        {**PREF, "prompt": "Why?"},
        "not a record",
    ]
    report = validate_records(records, "preference", SOURCE, on_bad_rows="skip")
    assert report.records == [records[0], records[3]]
    assert report.n_skipped == 3
    assert report.skipped == [
        (2, "chosen", "identical to 'rejected'"),
        (3, "rejected", "missing; 'preference' records have fields {prompt, chosen, rejected}"),
        (5, None, "expected a record (an object with fields), got str 'not a record'"),
    ]


def test_skip_mode_with_everything_bad_returns_no_records():
    report = validate_records([{"text": ""}, {"text": None}], "text", SOURCE, on_bad_rows="skip")
    assert report.records == [] and [row for row, _, _ in report.skipped] == [1, 2]


def test_unknown_kind_and_option():
    with pytest.raises(AlignkitError, match="unknown record format 'prefrence'.*did you mean 'preference'"):
        validate_records([PREF], "prefrence", SOURCE)
    with pytest.raises(
        AlignkitError, match="option `data.on_bad_rows`: expected 'error' or 'skip', got 'drop'"
    ):
        validate_records([PREF], "preference", SOURCE, on_bad_rows="drop")


@pytest.mark.parametrize("kind", KINDS)
def test_detect_format_recognises_every_valid_example(kind):
    for record in VALID[kind]:
        assert detect_format(record) == kind


def test_detect_format_unknown_fields():
    with pytest.raises(
        AlignkitError, match=r"cannot tell the record format from its fields \['input', 'output'\]"
    ):
        detect_format({"input": "a", "output": "b"})
