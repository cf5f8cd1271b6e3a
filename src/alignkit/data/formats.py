"""Record formats (compatible with TRL's) and their validation, with errors naming file, row and field.

Each kind of record and its fields. A prompt or response is a string or, in TRL's conversational
style, a list of `{role, content}` messages: a conversational prompt ends with a user turn and each
response continues it with assistant turn(s). Extra fields are kept and ignored.

    text        {text}                              raw text (pretraining)
    prompt      {prompt}                            prompts to sample from (RL, labelling)
    sft         {prompt, completion} or {messages}  messages end with an assistant turn
    preference  {prompt, chosen, rejected}          chosen differs from rejected
    ranking     {prompt, responses}                 >= 2 distinct responses, best first
    choice      {prompt, responses, best}           best-of-K; `best` is an index into `responses`
    rating      {prompt, response, score}           score is a finite number
    unpaired    {prompt, completion, label}         label is true (desirable) or false
    steps       {prompt, steps, labels}             one label per step, all bool or all numbers

Roles are `system` (first message only), then `user` and `assistant` strictly alternating, starting
with `user`; every content is a non-empty string.

Preference records whose prompt is implicit, as TRL allows (`{chosen, rejected}` only, or
conversations that repeat the prompt turn), get it extracted before they are checked
(`alignkit.data.prompts.split_preference_prompt`); the report counts them.

A stage decides which kind a file holds from the kinds it reads (`choose_format`), so a row that
does not fit is named with its missing field rather than the file being taken for another kind.
The report also counts rows that repeat an earlier row exactly (`print_report` warns of both).
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from alignkit.console import main_print
from alignkit.data.load import BadRow, content_key, record_rows
from alignkit.data.prompts import PromptError, split_preference_prompt
from alignkit.errors import AlignkitError

ROLES = ("system", "user", "assistant")
_NEXT_ROLES: dict[str | None, tuple[str, ...]] = {
    None: ("system", "user"),
    "system": ("user",),
    "user": ("assistant",),
    "assistant": ("user",),
}
FIELDS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "prompt": ("prompt",),
    "sft": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "ranking": ("prompt", "responses"),
    "choice": ("prompt", "responses", "best"),
    "rating": ("prompt", "response", "score"),
    "unpaired": ("prompt", "completion", "label"),
    "steps": ("prompt", "steps", "labels"),
}
KINDS = tuple(FIELDS)


@dataclass
class ValidationReport:
    """The outcome of `validate_records`: the good records and every skipped row with its reason."""

    records: list[dict[str, Any]]
    """The valid records, in input order."""
    skipped: list[tuple[int, str | None, str]] = field(default_factory=list)
    """`(row, field, reason)` of each skipped record; row is 1-based, field None for the whole record."""
    prompts_extracted: int = 0
    """Valid preference records whose prompt was implicit and taken from `chosen`/`rejected`."""
    kind: str = ""
    """The kind the records were checked as."""
    rows: list[int] = field(default_factory=list)
    """The 1-based row of each valid record (`records[i]` is row `rows[i]`): its file line for JSONL."""
    duplicate_of: dict[int, int] = field(default_factory=dict)
    """`{row: first row}` of each valid record identical to an earlier one (all its fields)."""

    @property
    def n_skipped(self) -> int:
        """How many records were skipped."""
        return len(self.skipped)

    @property
    def n_duplicates(self) -> int:
        """How many valid records repeat an earlier valid record exactly."""
        return len(self.duplicate_of)


class _RowError(Exception):
    """A problem with one field of one record (turned into `AlignkitError` or a skipped row)."""

    def __init__(self, field: str | None, reason: str):
        super().__init__(reason)
        self.field = field
        self.reason = reason


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _text(value: Any, label: str) -> None:
    if value is None:
        raise _RowError(label, "missing (expected a non-empty string)")
    if not isinstance(value, str):
        raise _RowError(label, f"expected a string, got {_describe(value)}")
    if not value.strip():
        raise _RowError(label, "empty string" if not value else "empty string (only whitespace)")


def _list(value: Any, label: str, min_items: int = 1) -> list[Any]:
    if not isinstance(value, list):
        raise _RowError(label, f"expected a list, got {_describe(value)}")
    if not value:
        raise _RowError(label, "empty list")
    if len(value) < min_items:
        raise _RowError(label, f"expected at least {min_items} items, got {len(value)}")
    return value


def _number(value: Any, label: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _RowError(label, f"expected a number, got {_describe(value)}")
    if not math.isfinite(value):
        raise _RowError(label, f"expected a finite number, got {value}")


def _order_problem(previous: str | None, role: str) -> str:
    if role == "system":
        return "a 'system' message is allowed only first"
    if previous in (None, "system"):
        return (
            f"the conversation must start with a 'user' turn (after an optional 'system' one), got {role!r}"
        )
    return f"{role!r} follows {previous!r}; 'user' and 'assistant' turns must alternate"


def _check_turns(messages: list[Any], labels: list[str]) -> None:
    """Check each message's role, position and content; `labels[i]` names message i in errors."""
    previous = None
    for message, label in zip(messages, labels, strict=True):
        if not isinstance(message, dict):
            raise _RowError(label, f"expected a message {{role, content}}, got {_describe(message)}")
        role = message.get("role")
        if role not in ROLES:
            raise _RowError(f"{label}.role", f"expected one of {', '.join(ROLES)}, got {role!r}")
        if role not in _NEXT_ROLES[previous]:
            raise _RowError(f"{label}.role", _order_problem(previous, role))
        _text(message.get("content"), f"{label}.content")
        previous = role


def _labels(key: str, n: int) -> list[str]:
    return [f"{key}[{i}]" for i in range(n)]


def _prompt(record: dict[str, Any]) -> bool:
    """Check `prompt`; True when it is a conversation (a list of messages)."""
    prompt = record.get("prompt")
    if not isinstance(prompt, list):
        _text(prompt, "prompt")
        return False
    _check_turns(_list(prompt, "prompt"), _labels("prompt", len(prompt)))
    if prompt[-1]["role"] != "user":
        raise _RowError(
            "prompt", f"a prompt conversation must end with a 'user' turn, not {prompt[-1]['role']!r}"
        )
    return True


def _response(record: dict[str, Any], key: str, value: Any, conversational: bool) -> None:
    """Check a response: a string after a string prompt, assistant turn(s) continuing a conversation."""
    if not conversational:
        if isinstance(value, list):
            raise _RowError(key, "expected a string, as 'prompt' is a string, got a list")
        _text(value, key)
        return
    if not isinstance(value, list):
        raise _RowError(key, f"expected a list of messages, as 'prompt' is one, got {_describe(value)}")
    prompt = record["prompt"]
    _check_turns(prompt + _list(value, key), _labels("prompt", len(prompt)) + _labels(key, len(value)))
    if value[-1]["role"] != "assistant":
        raise _RowError(key, f"must end with an 'assistant' turn, not {value[-1]['role']!r}")


def _check_sft(record: dict[str, Any]) -> None:
    if "messages" not in record:
        _response(record, "completion", record["completion"], _prompt(record))
        return
    messages = _list(record["messages"], "messages")
    _check_turns(messages, _labels("messages", len(messages)))
    if all(message["role"] != "assistant" for message in messages):
        raise _RowError("messages", "no 'assistant' turn (nothing to train on)")
    if messages[-1]["role"] != "assistant":
        raise _RowError("messages", f"must end with an 'assistant' turn, not {messages[-1]['role']!r}")


def _check_preference(record: dict[str, Any]) -> None:
    conversational = _prompt(record)
    for key in ("chosen", "rejected"):
        _response(record, key, record[key], conversational)
    if record["chosen"] == record["rejected"]:
        raise _RowError("chosen", "identical to 'rejected'")


def _check_responses(record: dict[str, Any], *, distinct: bool) -> list[Any]:
    conversational = _prompt(record)
    responses = _list(record["responses"], "responses", min_items=2)
    for i, response in enumerate(responses):
        _response(record, f"responses[{i}]", response, conversational)
        if distinct and response in responses[:i]:
            first = responses.index(response)
            raise _RowError(
                f"responses[{i}]", f"identical to responses[{first}]; ranked responses must differ"
            )
    return responses


def _check_choice(record: dict[str, Any]) -> None:
    responses = _check_responses(record, distinct=False)
    best = record["best"]
    if isinstance(best, bool) or not isinstance(best, numbers.Integral):
        raise _RowError("best", f"expected an integer index into 'responses', got {_describe(best)}")
    if not 0 <= best < len(responses):
        raise _RowError(
            "best", f"index {best} is out of range for {len(responses)} responses (0 to {len(responses) - 1})"
        )


def _check_rating(record: dict[str, Any]) -> None:
    _response(record, "response", record["response"], _prompt(record))
    _number(record["score"], "score")


def _check_unpaired(record: dict[str, Any]) -> None:
    _response(record, "completion", record["completion"], _prompt(record))
    if not isinstance(record["label"], bool):
        raise _RowError("label", f"expected true or false, got {_describe(record['label'])}")


def _check_steps(record: dict[str, Any]) -> None:
    _prompt(record)
    steps = _list(record["steps"], "steps")
    for i, step in enumerate(steps):
        _text(step, f"steps[{i}]")
    labels = _list(record["labels"], "labels")
    if len(labels) != len(steps):
        raise _RowError("labels", f"{len(labels)} labels for {len(steps)} steps; expected one label per step")
    for i, label in enumerate(labels):
        if not isinstance(label, bool):
            _number(label, f"labels[{i}]")
    if len({isinstance(label, bool) for label in labels}) > 1:
        raise _RowError("labels", "mixes true/false and numbers; use one kind of label")


_CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {
    "text": lambda record: _text(record["text"], "text"),
    "prompt": _prompt,
    "sft": _check_sft,
    "preference": _check_preference,
    "ranking": lambda record: _check_responses(record, distinct=True),
    "choice": _check_choice,
    "rating": _check_rating,
    "unpaired": _check_unpaired,
    "steps": _check_steps,
}


def _normalised(record: Any, kind: str) -> tuple[Any, bool]:
    """The record with an implicit preference prompt made explicit, and whether it was."""
    if kind != "preference" or not isinstance(record, dict):
        return record, False
    try:
        explicit = split_preference_prompt(record)
    except PromptError as err:
        raise _RowError(err.field, err.reason) from None
    return (record, False) if explicit is None else (explicit, True)


def _refuse_raw_text(records: list[Any], kind: str, source: str) -> None:
    """Raw text records given where `sft` records are expected: one error for the file, not one per row."""
    first = records[0] if records else None
    if kind == "sft" and isinstance(first, dict) and "text" in first and not {"prompt", "messages"} & set(first):
        raise AlignkitError(f"{source}: these are raw text records {{text}}; SFT trains on {{prompt, completion}} "
                            "or {messages} records. To train on raw text, use `alignkit pretrain`")


def _check_record(record: Any, kind: str, row: int) -> None:
    if isinstance(record, BadRow):  # a line `load_records(..., on_bad_rows="skip")` could not read
        raise _RowError(None, record.reason if record.line == row else f"line {record.line}: {record.reason}")
    if not isinstance(record, dict):
        raise _RowError(None, f"expected a record (an object with fields), got {_describe(record)}")
    if not (kind == "sft" and "messages" in record):
        for name in FIELDS[kind]:
            if record.get(name) is None:
                also = " or {messages}" if kind == "sft" else ""
                raise _RowError(
                    name, f"missing; {kind!r} records have fields {{{', '.join(FIELDS[kind])}}}{also}"
                )
    _CHECKS[kind](record)


def validate_records(
    records: list[dict[str, Any]], kind: str, source: str, on_bad_rows: Literal["error", "skip"] = "error"
) -> ValidationReport:
    """Check every record against format `kind`; raise at the first bad one, or skip and count them.

    Args:
        records: The records, e.g. from `load_records`.
        kind: One of `KINDS`: text, prompt, sft, preference, ranking, choice, rating, unpaired, steps.
        source: Where the records came from (a file name), used in messages.
        on_bad_rows: "error" raises at the first invalid record; "skip" leaves it out and records
            `(row, field, reason)` in the report, so the caller can report how many were skipped.

    Returns:
        The valid records with their rows, the skipped rows (`BadRow`s from `load_records` among
        them) and the rows that repeat an earlier one. Preference records with an implicit prompt
        are returned with it extracted (new dicts; see `alignkit.data.prompts`), and counted.

    Raises:
        AlignkitError: An invalid record with `on_bad_rows="error"`, as
            `data/train.jsonl, row 17, field 'chosen': identical to 'rejected'` (rows are 1-based; the row of
            a JSONL file's record is its line, blank lines counted, `alignkit.data.load.Records`);
            raw `{text}` records given as `sft`; or an unknown `kind` or `on_bad_rows`.
    """
    if kind not in FIELDS:
        hint = difflib.get_close_matches(str(kind), KINDS, n=1)
        extra = f"; did you mean {hint[0]!r}?" if hint else ""
        raise AlignkitError(f"unknown record format {kind!r}; expected one of {', '.join(KINDS)}{extra}")
    if on_bad_rows not in ("error", "skip"):
        raise AlignkitError(f"option `data.on_bad_rows`: expected 'error' or 'skip', got {on_bad_rows!r}")
    _refuse_raw_text(records, kind, source)
    report = ValidationReport(records=[], kind=kind)
    first_rows: dict[Any, int] = {}
    for row, record in zip(record_rows(records), records, strict=True):  # a JSONL record's row is its line
        try:
            record, extracted = _normalised(record, kind)
            _check_record(record, kind, row)
        except _RowError as err:
            if on_bad_rows == "error":
                where = f"{source}, row {row}" + (f", field '{err.field}'" if err.field else "")
                raise AlignkitError(f"{where}: {err.reason}") from None
            report.skipped.append((row, err.field, err.reason))
            continue
        report.records.append(record)
        report.rows.append(row)
        report.prompts_extracted += int(extracted)
        first = first_rows.setdefault(content_key(record), row)
        if first != row:
            report.duplicate_of[row] = first
    return report


def print_report(report: ValidationReport, source: str, stage: str = "data") -> None:
    """Warn of the rows `validate_records` skipped and of those that repeat an earlier row (first few of each).

    Printed by the main process only (`alignkit.console.main_print`): every process reads the same file.
    """
    if report.skipped:
        shown = "; ".join(f"row {row}" + (f", field '{name}'" if name else "") + f": {reason}"
                          for row, name, reason in report.skipped[:3])
        more = f"; and {report.n_skipped - 3} more" if report.n_skipped > 3 else ""
        main_print(f"[{stage}] warning: {source}: {report.n_skipped} bad row(s) skipped (data.on_bad_rows=skip): "
                   f"{shown}{more}")
    if report.duplicate_of:
        shown = ", ".join(f"row {row} = row {first}" for row, first in list(report.duplicate_of.items())[:3])
        main_print(f"[{stage}] warning: {source}: {report.n_duplicates} row(s) repeat an earlier row exactly ({shown}"
                   f"{', ...' if report.n_duplicates > 3 else ''}); they are kept, and a held-out split keeps "
                   "all copies of a row on one side")


# Most specific first: the first entry whose fields are all present names the kind.
_DETECT = (
    (("messages",), "sft"),
    (("chosen", "rejected"), "preference"),
    (("responses", "best"), "choice"),
    (("responses",), "ranking"),
    (("steps", "labels"), "steps"),
    (("response", "score"), "rating"),
    (("completion", "label"), "unpaired"),
    (("completion",), "sft"),
    (("prompt",), "prompt"),
    (("text",), "text"),
)


def choose_format(records: list[Any], accepted: tuple[str, ...]) -> str:
    """The kind of a file's records, for a stage that reads the kinds `accepted` (most wanted first).

    Not row 1 alone: the accepted kind that the most rows fit (`detect_format`) wins, ties going to
    the earlier in `accepted`; validation then names each row that does not fit, with its missing
    field. When no row fits an accepted kind: the kind row 1 fits fully, if it is another real kind
    (e.g. `sft` records given to DPO), for the caller's "cannot train on X records" message; else the
    accepted kind with the most of its fields in row 1 (a `{prompt, chosen}` row is a preference
    record lacking `rejected`).

    Raises:
        AlignkitError: `accepted` is empty or names an unknown kind.
    """
    unknown = [kind for kind in accepted if kind not in FIELDS]
    if not accepted or unknown:
        raise AlignkitError(f"record formats {list(accepted)}: expected some of {', '.join(KINDS)}")
    if len(accepted) == 1:
        return accepted[0]
    dicts = [record for record in records if isinstance(record, dict)]
    votes = Counter(_guess(record, accepted) for record in dicts)
    fitting = [kind for kind in accepted if votes[kind]]
    if fitting:
        return max(fitting, key=lambda kind: votes[kind])  # the first of the most voted
    if not dicts:
        return accepted[0]
    first, guess = dicts[0], _guess(dicts[0], accepted)
    if guess not in (None, "prompt", "text"):
        return guess
    return max(accepted, key=lambda kind: sum(name in first for name in FIELDS[kind]))


def _guess(record: dict[str, Any], accepted: tuple[str, ...]) -> str | None:
    try:
        return detect_format(record, accepted)
    except AlignkitError:
        return None


def detect_format(record: dict[str, Any], accepted: tuple[str, ...] | None = None) -> str:
    """Guess a record's kind from its field names (the fields are not checked; see `validate_records`).

    Args:
        record: One record (usually the first of a file).
        accepted: The kinds the caller reads, if it knows. When the general guess is not one of
            them, the first accepted kind whose fields are all present wins, unless its fields are
            a part of the guess's (a `{prompt, responses, best}` choice is not a ranking): so a
            `{prompt, chosen, rejected, messages}` record (HuggingFaceH4's layout) is preference
            data to a preference stage. Otherwise the general guess is returned (for the caller's
            "cannot train on kind X" message).

    Raises:
        AlignkitError: No kind matches the fields.
    """
    for keys, kind in _DETECT:
        if all(key in record for key in keys):
            if accepted is None or kind in accepted:
                return kind
            other = next((k for fields, k in _DETECT if k in accepted and all(f in record for f in fields)
                          and not set(fields) <= set(keys)), None)
            return other or kind
    raise AlignkitError(
        f"cannot tell the record format from its fields {sorted(record)}; expected the fields of one of: "
        + "; ".join(f"{kind} {{{', '.join(fields)}}}" for kind, fields in FIELDS.items())
    )
