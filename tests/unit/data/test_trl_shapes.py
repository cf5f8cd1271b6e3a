"""TRL's dataset shapes as the hub holds them: implicit prompts, HuggingFaceH4's layout, raw text given to SFT,
and each shape read back from JSONL, Parquet and `save_to_disk` form."""

from __future__ import annotations

import json

import datasets
import pytest

from alignkit.data.formats import detect_format, validate_records
from alignkit.data.load import load_records
from alignkit.data.prompts import (
    extract_text_prompt,
    prompt_text,
    split_preference_prompt,
    with_assistant_turns,
)
from alignkit.errors import AlignkitError


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


SKY = [user("What color is the sky?")]
# trl-lib/ultrafeedback_binarized: conversations with the user turn, no `prompt`
IMPLICIT_CONVERSATION = {"chosen": SKY + [assistant("It is blue.")], "rejected": SKY + [assistant("It is green.")],
                         "score_chosen": 8.0, "score_rejected": 2.0}
# the standard (string) form with a shared text prefix
IMPLICIT_TEXT = {"chosen": "The sky is blue.", "rejected": "The sky is green."}
# HuggingFaceH4/ultrafeedback_binarized: prompt string, conversations with the user turn, and `messages`
H4 = {"prompt": SKY[0]["content"], "prompt_id": "abc", "chosen": SKY + [assistant("It is blue.")],
      "rejected": SKY + [assistant("It is green.")], "messages": SKY + [assistant("It is blue.")],
      "score_chosen": 8.0, "score_rejected": 2.0}


@pytest.mark.parametrize("chosen,rejected,expected", [
    ("The sky is blue.", "The sky is green.", ("The sky is", " blue.", " green.")),  # the space goes with them
    ("Q: 2+2? A: 4", "Q: 2+2? A: 5", ("Q: 2+2? A:", " 4", " 5")),
    ("I like cats", "I like cars", ("I like ca", "ts", "rs")),  # characters, as TRL: not words
])
def test_text_prompt_is_the_shared_prefix_as_trl_extract_prompt(chosen, rejected, expected):
    assert extract_text_prompt(chosen, rejected) == expected


@pytest.mark.parametrize("chosen,rejected,reason", [
    ("Blue", "Green", "share no leading text"),
    ("The sky", "The sky is blue", "is a prefix of the other"),
])
def test_text_prompt_that_cannot_be_extracted_names_row_and_field(chosen, rejected, reason):
    records = [IMPLICIT_TEXT, {"chosen": chosen, "rejected": rejected}]
    with pytest.raises(AlignkitError, match=rf"data.jsonl, row 2, field 'prompt': missing, and .*{reason}"):
        validate_records(records, "preference", "data.jsonl")
    report = validate_records(records, "preference", "data.jsonl", on_bad_rows="skip")
    assert report.n_skipped == 1 and report.prompts_extracted == 1


def test_implicit_conversation_prompt_is_the_common_prefix_of_messages():
    report = validate_records([IMPLICIT_CONVERSATION], "preference", "data.jsonl")
    (record,) = report.records
    assert record["prompt"] == SKY
    assert record["chosen"] == [assistant("It is blue.")] and record["rejected"] == [assistant("It is green.")]
    assert record["score_chosen"] == 8.0 and report.prompts_extracted == 1  # other fields kept, and counted
    assert "prompt" not in IMPLICIT_CONVERSATION  # the input record is not modified


def test_multi_turn_implicit_prompt_ends_with_the_last_shared_user_turn():
    history = [user("Hi"), assistant("Hello"), user("Sky?")]
    record = {"chosen": history + [assistant("Blue")], "rejected": history + [assistant("Green")]}
    assert split_preference_prompt(record)["prompt"] == history
    # shared assistant turns after the last shared user turn stay with the responses
    record = {"chosen": [user("Hi"), assistant("Hello"), user("Sky?"), assistant("Blue")],
              "rejected": [user("Hi"), assistant("Hello")]}
    out = split_preference_prompt(record)
    assert out["prompt"] == [user("Hi")] and out["rejected"] == [assistant("Hello")]
    with pytest.raises(AlignkitError, match="no leading user turn"):
        validate_records([{"chosen": [assistant("a")], "rejected": [assistant("b")]}], "preference", "f")


def test_h4_layout_is_preference_data_to_a_preference_stage():
    assert detect_format(H4) == "sft"  # without knowing the stage, `messages` says SFT
    assert detect_format(H4, ("preference", "ranking", "unpaired")) == "preference"
    assert detect_format({"prompt": "x"}, ("preference",)) == "prompt"  # no accepted kind: the general guess
    (record,) = validate_records([H4], "preference", "data.jsonl").records
    assert record["prompt"] == SKY and record["chosen"] == [assistant("It is blue.")]
    assert record["messages"] == H4["messages"]  # kept, ignored
    # the same file is SFT data to `alignkit sft`
    assert validate_records([H4], "sft", "data.jsonl").records == [H4]


def test_h4_prompt_that_is_not_the_shared_user_turn_is_an_error():
    bad = {**H4, "prompt": "Something else?"}
    with pytest.raises(AlignkitError, match="row 1, field 'prompt': a string, while 'chosen' and 'rejected' are"):
        validate_records([bad], "preference", "data.jsonl")


def test_message_prompt_repeated_in_the_responses_is_cut_from_them():
    record = {"prompt": SKY, "chosen": SKY + [assistant("Blue")], "rejected": SKY + [assistant("Green")]}
    (out,) = validate_records([record], "preference", "f").records
    assert out == {"prompt": SKY, "chosen": [assistant("Blue")], "rejected": [assistant("Green")]}


def test_raw_text_records_given_to_sft_point_to_pretrain():
    with pytest.raises(AlignkitError, match=r"corpus.jsonl: these are raw text records \{text\}.*`alignkit pretrain`"):
        validate_records([{"text": "Once upon a time."}], "sft", "corpus.jsonl", on_bad_rows="skip")


def test_sampled_records_after_a_conversation_prompt_get_assistant_turns():
    record = {"prompt": SKY, "chosen": "Blue", "rejected": "Green", "responses": ["a", "b"], "score": 1.0}
    out = with_assistant_turns(record)
    assert out["chosen"] == [assistant("Blue")] and out["responses"] == [[assistant("a")], [assistant("b")]]
    assert out["score"] == 1.0 and validate_records([out], "preference", "f").records == [out]
    assert with_assistant_turns({"prompt": "Sky?", "chosen": "Blue"}) == {"prompt": "Sky?", "chosen": "Blue"}
    assert prompt_text([user("Hi"), assistant("Hello"), user("Sky?")]) == "Hi\nHello\nSky?"
    assert prompt_text("Sky?") == "Sky?"


# ---------------------------------------------------------------------------------------------
# Every shape in JSONL, Parquet and save_to_disk form
# ---------------------------------------------------------------------------------------------

CONVERSATIONAL_PROMPTS = [{"prompt": [user(f"Question {i}?")]} for i in range(3)] + [
    {"prompt": [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello"), user("Sky?")]}]
SHAPES = {
    "implicit_conversation": [IMPLICIT_CONVERSATION] * 3,
    "implicit_text": [IMPLICIT_TEXT, {"chosen": "2+2 is 4", "rejected": "2+2 is 5"}],
    "h4": [H4] * 3,
    "conversational_prompts": CONVERSATIONAL_PROMPTS,
}
FORMS = ("jsonl", "parquet", "save_to_disk")


def write_shape(root, name: str, form: str) -> str:
    """The records of shape `name` written in `form`; the path to give `load_records`."""
    rows = SHAPES[name]
    path = root / f"{name}.{form}"
    if form == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif form == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", ["implicit_conversation", "implicit_text", "h4"])
def test_preference_shapes_read_back_in_every_form(tmp_path, name, form):
    records = load_records(write_shape(tmp_path, name, form))
    kind = detect_format(records[0], ("preference", "ranking", "unpaired"))
    report = validate_records(records, kind, "f")
    assert kind == "preference" and report.prompts_extracted == len(SHAPES[name])
    expected = [split_preference_prompt(r) for r in SHAPES[name]]
    assert [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in report.records] == [
        {k: r[k] for k in ("prompt", "chosen", "rejected")} for r in expected]


@pytest.mark.parametrize("form", FORMS)
def test_conversational_prompts_read_back_in_every_form(tmp_path, form):
    records = load_records(write_shape(tmp_path, "conversational_prompts", form))
    assert [r["prompt"] for r in validate_records(records, "prompt", "f").records] == [
        r["prompt"] for r in CONVERSATIONAL_PROMPTS]


def test_an_accepted_kind_does_not_override_a_more_specific_guess():
    choice = {"prompt": "Sky?", "responses": ["Blue", "Green"], "best": 0}
    assert detect_format(choice, ("ranking", "preference")) == "choice"  # not read as a ranking
    assert detect_format({"prompt": "Sky?", "completion": "Blue"}, ("preference", "unpaired")) == "sft"
