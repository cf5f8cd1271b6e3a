"""Built-in reward functions: answer extraction, number parsing, the four rewards, settings checks."""

import subprocess
import sys
from fractions import Fraction

import pytest

from alignkit.errors import AlignkitError
from alignkit.rewards.builtins import (
    BUILTINS,
    answer_match,
    check_builtin,
    extract_answer,
    format_match,
    length_penalty,
    parse_number,
    repetition_penalty,
)

# ---------------------------------------------------------------------------------------------
# extract_answer


@pytest.mark.parametrize(
    ("text", "mode", "expected"),
    [
        ("so \\boxed{\\frac{1}{2}} it is", "boxed", "\\frac{1}{2}"),
        ("first \\boxed{1}, then \\boxed{ 2 }", "boxed", "2"),
        ("unclosed last \\boxed{3} \\boxed{4", "boxed", "3"),
        ("no box here", "boxed", None),
        ("The answer is 12.", "prefix", "12"),
        ("Answer: x = 3\nthen more text", "prefix", "x = 3"),
        ("answer: 1. Final ANSWER IS **7**.", "prefix", "7"),
        ("the answer isn't clear", "prefix", None),
        ("work\n#### 1,234", "hash", "1,234"),
        ("#### 5\n#### 6", "hash", "6"),
        ("no hashes", "hash", None),
        ("I got 3 then -4.5", "last_number", "-4.5"),
        ("total 1,234 items, 3/4 of them", "last_number", "3/4"),
        ("from 3-4 apples", "last_number", "4"),
        ("no digits", "last_number", None),
        ("  whole text \n", "full", "whole text"),
        ("   ", "full", None),
    ],
)
def test_extract_answer_modes(text, mode, expected):
    assert extract_answer(text, mode) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 5 but \\boxed{6}", "6"),  # boxed first
        ("#### 9\nThe answer is 8", "8"),  # then prefix
        ("steps 1 2\n#### 10", "10"),  # then hash
        ("I got 3 then -4.5", "-4.5"),  # then the last number
        ("no answer at all", None),
    ],
)
def test_extract_answer_auto_order(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_unknown_mode_lists_the_modes():
    with pytest.raises(AlignkitError, match="`boxy`.*boxed, prefix, hash, last_number, full"):
        extract_answer("x", "boxy")


# ---------------------------------------------------------------------------------------------
# parse_number


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("42", Fraction(42)),
        ("-3.5", Fraction(-7, 2)),
        ("1,234", Fraction(1234)),
        ("1,234,567.5", Fraction(2469135, 2)),
        ("3/4", Fraction(3, 4)),
        ("2.50", Fraction(5, 2)),
        ("$12", Fraction(12)),
        ("-$5", Fraction(-5)),
        ("12%", Fraction(12)),
        ("\\frac{1}{2}", Fraction(1, 2)),
        (" 7 ", Fraction(7)),
        (12, Fraction(12)),
    ],
)
def test_parse_number_exact(text, expected):
    value = parse_number(text)
    assert type(value) is Fraction
    assert value == expected


@pytest.mark.parametrize(("text", "expected"), [("1e3", 1000.0), ("-2.5E-1", -0.25), (0.1, 0.1)])
def test_parse_number_exponent_or_float_gives_a_float(text, expected):
    value = parse_number(text)
    assert type(value) is float
    assert value == expected


@pytest.mark.parametrize(
    "text", ["abc", "1,2", "1234,567", "", "1/0", "--3", "1e999", "12 apples", True, None, float("inf")]
)
def test_parse_number_rejects(text):
    assert parse_number(text) is None


# ---------------------------------------------------------------------------------------------
# answer_match


def test_answer_match_batch():
    completions = ["The answer is 12.", "\\boxed{7}", "#### 3"]
    assert answer_match(["p"] * 3, completions, answer=[12, "8", None]) == [1.0, 0.0, None]


def test_answer_match_numeric_equality():
    completions = ["\\boxed{12.0}", "#### 1,234", "The answer is 3/4", "\\boxed{\\frac{1}{2}}", "#### 0.3"]
    assert answer_match([""] * 5, completions, answer=[12, "1234", 0.75, "0.5", 0.1 + 0.2]) == [1.0] * 5


def test_answer_match_rel_tol():
    # 1e3 parses to a float, so rel_tol applies: |1000 - 1000.5| / 1000.5 ~ 5e-4
    assert answer_match([""], ["#### 1e3"], answer=[1000.5]) == [0.0]
    assert answer_match([""], ["#### 1e3"], answer=[1000.5], rel_tol=1e-3) == [1.0]


def test_answer_match_string_comparison_when_not_numeric():
    completions = ["The answer is Paris", "Answer: $x+1$", "The answer is Rome"]
    assert answer_match([""] * 3, completions, answer=["paris.", "X+1", "Paris"]) == [1.0, 1.0, 0.0]


def test_answer_match_numeric_false_compares_strings():
    assert answer_match([""], ["#### 12.0"], answer=["12"], numeric=False) == [0.0]
    assert answer_match([""], ["#### 12.0"], answer=["12"], numeric=True) == [1.0]


def test_answer_match_no_extracted_answer_scores_zero_and_nan_reference_is_none():
    assert answer_match(["", ""], ["no idea", "#### 4"], answer=["4", float("nan")]) == [0.0, None]


def test_answer_match_custom_column_and_extract():
    completions = ["Answer: 5 then 6", "Answer: 5 then 6"]
    rewards = answer_match(
        [""] * 2, completions, column="gold", extract="last_number", gold=[6, 5], answer=[5, 5]
    )
    assert rewards == [1.0, 0.0]


def test_answer_match_missing_column_names_it_and_the_columns_present():
    with pytest.raises(AlignkitError, match=r"column `gold`.*columns present: `answer`, `id`"):
        answer_match([""], ["#### 1"], column="gold", answer=[1], id=[0])


# ---------------------------------------------------------------------------------------------
# format_match, length_penalty, repetition_penalty


def test_format_match_fullmatch_vs_search():
    completions = ["  A: 42  ", "Thinking... A: 42", "A: forty"]
    assert format_match([""] * 3, completions, pattern=r"A: \d+") == [1.0, 0.0, 0.0]
    assert format_match([""] * 3, completions, pattern=r"A: \d+", mode="search") == [1.0, 1.0, 0.0]


def test_format_match_dotall_spans_lines():
    assert format_match([""], ["<think>a\nb</think> 5"], pattern=r"<think>.*</think> \d") == [1.0]


def test_format_match_bad_pattern_or_mode():
    with pytest.raises(AlignkitError, match="setting `pattern`"):
        format_match([""], ["x"], pattern="(")
    with pytest.raises(AlignkitError, match="setting `mode`"):
        format_match([""], ["x"], pattern="x", mode="match")


def test_length_penalty_words():
    completions = ["one two three four five six seven", "one two three", "a b c d e"]
    assert length_penalty([""] * 3, completions, max_length=5, per_unit=0.5) == [-1.0, 0.0, 0.0]


def test_length_penalty_chars():
    assert length_penalty(["", ""], ["abcdefgh", "abc"], max_length=5, unit="chars") == [-3.0, 0.0]


def test_length_penalty_tokens():
    ids = [[1, 2, 3, 4], [1, 2]]
    assert length_penalty(
        ["", ""], ["x", "y"], max_length=2, per_unit=2.0, unit="tokens", completion_ids=ids
    ) == [
        -4.0,
        0.0,
    ]


def test_length_penalty_tokens_without_ids():
    with pytest.raises(AlignkitError, match="setting `unit`"):
        length_penalty([""], ["x"], max_length=2, unit="tokens")


def test_repetition_penalty():
    # bigrams of "a b a b a b": ab ba ab ba ab -> 2 distinct of 5 -> -(1 - 2/5) = -0.6
    assert repetition_penalty([""], ["a b a b a b"], n=2) == [pytest.approx(-0.6, abs=1e-15)]
    # trigrams of "A a a a": (a a a) twice -> 1 distinct of 2 -> -2 * 0.5 = -1.0 (lowercased)
    assert repetition_penalty([""], ["A a a a"], scale=2.0) == [-1.0]
    assert repetition_penalty(["", ""], ["all words differ here", "two words"]) == [0.0, 0.0]


# ---------------------------------------------------------------------------------------------
# check_builtin


@pytest.mark.parametrize(
    ("name", "settings"),
    [
        ("answer_match", {}),
        ("answer_match", {"column": "gold", "extract": "boxed", "numeric": False, "rel_tol": 1e-6}),
        ("format_match", {"pattern": r"^A: \d+$", "mode": "search"}),
        ("length_penalty", {"max_length": 0, "per_unit": 0.5, "unit": "tokens"}),
        ("repetition_penalty", {}),
        ("repetition_penalty", {"n": 1, "scale": 2}),
    ],
)
def test_check_builtin_accepts_valid_settings(name, settings):
    assert check_builtin(name, settings) is None


@pytest.mark.parametrize(
    ("name", "settings", "message"),
    [
        ("format_match", {}, r"`format_match`: setting `pattern` is required"),
        ("length_penalty", {}, r"`length_penalty`: setting `max_length` is required"),
        ("format_match", {"pattern": "(a"}, r"`format_match`: setting `pattern` '\(a' is not a valid"),
        ("format_match", {"pattern": 5}, r"`format_match`: setting `pattern` must be a string"),
        ("format_match", {"pattern": "a", "mode": "match"}, r"setting `mode` is 'match'.*fullmatch, search"),
        ("answer_match", {"extract": "boxes"}, r"`answer_match`: setting `extract`.*last_number"),
        ("answer_match", {"column": ""}, r"setting `column`"),
        ("answer_match", {"numeric": "yes"}, r"setting `numeric`"),
        ("answer_match", {"rel_tol": -1.0}, r"setting `rel_tol`"),
        ("length_penalty", {"max_length": 5, "unit": "bytes"}, r"setting `unit`.*words, chars, tokens"),
        ("length_penalty", {"max_length": -1}, r"setting `max_length` must be a finite number >= 0"),
        ("length_penalty", {"max_length": "5"}, r"setting `max_length`"),
        ("length_penalty", {"max_length": 5, "per_unit": float("inf")}, r"setting `per_unit`"),
        ("repetition_penalty", {"n": 0}, r"`repetition_penalty`: setting `n` must be an integer >= 1"),
        ("repetition_penalty", {"n": 2.5}, r"setting `n`"),
        ("repetition_penalty", {"scale": float("nan")}, r"setting `scale`"),
        ("repetition_penalty", {"scale": True}, r"setting `scale`"),
    ],
)
def test_check_builtin_rejects_bad_settings(name, settings, message):
    with pytest.raises(AlignkitError, match=message) as info:
        check_builtin(name, settings)
    assert "\n" not in str(info.value)


def test_check_builtin_unknown_setting_lists_the_accepted_ones():
    with pytest.raises(AlignkitError, match=r"`length_penalty`: setting `completion_ids` is unknown"):
        check_builtin("length_penalty", {"max_length": 3, "completion_ids": [[1]]})
    with pytest.raises(AlignkitError, match=r"setting `patern` is unknown \(accepted: pattern, mode\)"):
        check_builtin("format_match", {"patern": "x"})


def test_check_builtin_unknown_name_suggests_a_close_match():
    with pytest.raises(
        AlignkitError, match=r"`answer_mach` is not a built-in; did you mean `answer_match`\?"
    ):
        check_builtin("answer_mach", {})
    with pytest.raises(
        AlignkitError, match=r"`zzz` is not a built-in \(built-ins: answer_match, format_match"
    ):
        check_builtin("zzz", {})


def test_builtins_registry():
    assert BUILTINS == {
        "answer_match": answer_match,
        "format_match": format_match,
        "length_penalty": length_penalty,
        "repetition_penalty": repetition_penalty,
    }


def test_module_imports_only_the_standard_library():
    code = "import sys, alignkit.rewards.builtins\nprint(','.join(m for m in ('torch', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
