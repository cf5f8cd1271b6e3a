"""Turn prompt/response records into token ids with a per-token training mask.

SFT, reward models, DPO and PPO all tokenize through here, so the same rules hold everywhere:

- Rendering. Message data (`{messages}`, or list `prompt` + list `completion`) uses the chat
  template. String `{prompt, completion}` is plain concatenation, `prompt + completion + EOS` with
  nothing in between: a completion should begin with its own separator (e.g. a space).
- Strict prefix. The rendering is cut into segments at each assistant turn (the context before it,
  rendered with `add_generation_prompt=True`, and the turn's increment), each segment is tokenized
  on its own and the ids are concatenated. So the ids of a prompt are exactly the first ids of
  prompt + response: tokenizing the joined string could merge tokens across the boundary.
- One BOS. Segments are tokenized without special tokens; the tokens the tokenizer puts in front
  of a text (its BOS, if any) are prepended once, unless the template already rendered them.
- Per-turn rendering. A template that renders earlier assistant turns differently from the last
  (Qwen3 drops `<think>` blocks from the history) has no single rendering that extends turn by
  turn. Then each assistant turn is its own example: the context rendered as the template renders
  it before that turn (untrained), then that turn (trained) — `conversation_rows`.
- Masks from positions. A token is trained when it lies in an assistant increment up to and
  including that turn's last EOS (template text after the EOS, e.g. a newline, is not). A turn
  without EOS is trained whole, and EOS is appended to the final turn when the template did not
  emit one. Masks never come from `ids != pad_id`, so EOS is trained even when pad == EOS.

Labels are aligned with `input_ids` (the loss shifts them): `labels[t] = input_ids[t]` if trained,
else `IGNORE_INDEX`; `labels[0]` is always `IGNORE_INDEX` (no token predicts the first).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from alignkit.errors import AlignkitError
from alignkit.ops.logprobs import IGNORE_INDEX

Message = dict[str, str]
Example = dict[str, Any]  # input_ids, labels (lists of int, same length), prompt_length


def special_prefix(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts in front of a text when it adds special tokens (usually `[BOS]`)."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    n = len(with_special) - len(plain)
    return list(with_special[:n]) if n > 0 and with_special[n:n + len(plain)] == plain else []


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Ids of `text` without special tokens added (special tokens written in the text are kept)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def render(tokenizer: Any, messages: list[Message], *, add_generation_prompt: bool) -> str:
    """The chat-template rendering of `messages` as text."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as err:  # jinja raises its own types (e.g. raise_exception in a template)
        raise AlignkitError(f"the chat template cannot render this conversation: {err}") from None


class NotAPrefixError(AlignkitError):
    """The chat template's rendering of a conversation does not extend that of a shorter one."""


def _increment(longer: str, shorter: str, what: str) -> str:
    if not longer.startswith(shorter):
        raise NotAPrefixError(
            f"the chat template does not render {what} as a prefix of the longer conversation, so the "
            "prompt tokens cannot be a strict prefix; use a template whose renderings extend each other"
        )
    return longer[len(shorter):]


def conversation_segments(
    tokenizer: Any, messages: list[Message], *, add_generation_prompt: bool = False
) -> list[tuple[str, bool]]:
    """Split the chat-template rendering into `(text, is_assistant)` pieces, in order.

    The context before each assistant turn (rendered with the generation prompt) is one piece and
    the turn's increment another; their concatenation is the rendering of the whole conversation
    (plus the generation prompt when `add_generation_prompt` and the last turn is not the assistant's).

    Raises:
        AlignkitError: The template cannot render the messages, or its renderings of successive
            prefixes do not extend each other.
    """
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        after = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        segments.append((_increment(before, done, f"turn {i}'s context"), False))
        segments.append((_increment(after, before, f"turn {i}"), True))
        done = after
    if messages and (messages[-1]["role"] != "assistant" or not segments):  # the tail after the last turn
        full = render(tokenizer, messages, add_generation_prompt=add_generation_prompt)
        segments.append((_increment(full, done, "the conversation"), False))
    return [(text, trained) for text, trained in segments if text]


def conversation_rows(tokenizer: Any, messages: list[Message]) -> list[list[tuple[str, bool]]]:
    """The segments of a conversation ending with an assistant turn, as one row or one row per assistant turn.

    One row (`conversation_segments`) when the template's renderings extend each other turn by turn.
    Otherwise (e.g. Qwen3's template, which drops `<think>` blocks from earlier assistant turns) row
    k is the context before assistant turn k, rendered with the generation prompt exactly as
    `encode_prompt` renders it (untrained), then turn k's increment (trained): each turn is trained
    once, in the context the template gives it there.

    Raises:
        AlignkitError: The template cannot render the messages, or a turn's rendering does not
            extend its context's even on its own.
    """
    try:
        return [conversation_segments(tokenizer, messages)]
    except NotAPrefixError:
        pass
    rows = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            context = context_segments(tokenizer, messages[:i])
            before = "".join(text for text, _ in context)
            after = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
            row = [*context, (_increment(after, before, f"turn {i}"), True)]
            rows.append([(text, trained) for text, trained in row if text])
    return rows


def context_segments(tokenizer: Any, messages: list[Message]) -> list[tuple[str, bool]]:
    """The untrained segments of a context rendered with the generation prompt (what precedes a response).

    Cut at its assistant turns like `conversation_segments`, or one piece when the template renders
    earlier assistant turns differently from the last.
    """
    try:
        segments = conversation_segments(tokenizer, messages, add_generation_prompt=True)
    except NotAPrefixError:
        segments = [(render(tokenizer, messages, add_generation_prompt=True), False)]
    return [(text, False) for text, _ in segments if text]


def _trained_flags(ids: list[int], eos_id: int | None) -> list[bool]:
    """An assistant increment is trained up to and including its last EOS (all of it if it has none)."""
    if eos_id is None or eos_id not in ids:
        return [True] * len(ids)
    last = len(ids) - 1 - ids[::-1].index(eos_id)
    return [i <= last for i in range(len(ids))]


def encode_segments(
    tokenizer: Any, segments: list[tuple[str, bool]], *, final_eos: bool, prefix: list[int] | None = None
) -> tuple[list[int], list[bool], int]:
    """Tokenize each segment separately and concatenate the ids.

    The tokenizer's special prefix (BOS; `prefix` if given: callers encoding many examples pass it)
    is prepended unless the ids already start with it. With `final_eos`, EOS is appended (trained)
    when the last trained token is not EOS.

    Returns:
        `(ids, trained, last_start)`: T ids, T trained flags, and the index of the first token of
        the last assistant segment (T when there is none).
    """
    eos_id = tokenizer.eos_token_id
    ids: list[int] = []
    flags: list[bool] = []
    last_start = None
    for text, is_assistant in segments:
        seg = encode_text(tokenizer, text)
        if is_assistant:
            last_start = len(ids)
        ids += seg
        flags += _trained_flags(seg, eos_id) if is_assistant else [False] * len(seg)
    prefix = special_prefix(tokenizer) if prefix is None else prefix
    if prefix and ids[: len(prefix)] != prefix:
        ids, flags = prefix + ids, [False] * len(prefix) + flags
        last_start = None if last_start is None else last_start + len(prefix)
    if final_eos and eos_id is not None:
        last_trained = max((i for i, f in enumerate(flags) if f), default=None)
        if last_trained is None or ids[last_trained] != eos_id:
            ids, flags = ids + [eos_id], flags + [True]
    return ids, flags, len(ids) if last_start is None else last_start


def record_rows(tokenizer: Any, record: dict[str, Any]) -> list[list[tuple[str, bool]]]:
    """The `(text, is_assistant)` segments of an `sft` record, per row (see `conversation_rows`)."""
    if isinstance(record.get("prompt"), str):
        return [[(record["prompt"], False), (record["completion"], True)]]
    messages = record["messages"] if "messages" in record else [*record["prompt"], *record["completion"]]
    return conversation_rows(tokenizer, [{"role": m["role"], "content": m["content"]} for m in messages])


def record_segments(tokenizer: Any, record: dict[str, Any]) -> list[tuple[str, bool]]:
    """The `(text, is_assistant)` segments of an `sft` record's last row: the final response in its context."""
    return record_rows(tokenizer, record)[-1]


def encode_prompt(tokenizer: Any, prompt: str | list[Message], prefix: list[int] | None = None) -> list[int]:
    """Ids of a prompt exactly as they begin `encode_example` of any response to it (BOS included).

    A string is tokenized as is; a message list is rendered with the generation prompt (in one piece
    when the template renders earlier assistant turns differently, as `conversation_rows` does).
    """
    if isinstance(prompt, str):
        return encode_segments(tokenizer, [(prompt, False)], final_eos=False, prefix=prefix)[0]
    return encode_segments(tokenizer, context_segments(tokenizer, list(prompt)), final_eos=False, prefix=prefix)[0]


def encode_example(tokenizer: Any, record: dict[str, Any], *, train_on_prompt: bool = False,
                   prefix: list[int] | None = None) -> Example:
    """Tokenize one `sft`-format record (`{prompt, completion}` or `{messages}`) with its labels.

    With `train_on_prompt`, every token but the first is trained. Returns `{"input_ids", "labels",
    "prompt_length"}`; `prompt_length` counts the tokens before the final (last assistant) response.
    With a template that needs one row per assistant turn (`conversation_rows`), this is the last
    row, the final response in its context; `encode_examples` gives every row.
    """
    return _encode_row(tokenizer, record_segments(tokenizer, record), train_on_prompt, prefix)


def encode_examples(tokenizer: Any, record: dict[str, Any], *, train_on_prompt: bool = False,
                    prefix: list[int] | None = None) -> list[Example]:
    """Every example of an `sft` record: one, or one per assistant turn (see `conversation_rows`)."""
    return [_encode_row(tokenizer, row, train_on_prompt, prefix) for row in record_rows(tokenizer, record)]


def _encode_row(tokenizer: Any, segments: list[tuple[str, bool]], train_on_prompt: bool,
                prefix: list[int] | None) -> Example:
    ids, flags, prompt_length = encode_segments(tokenizer, segments, final_eos=True, prefix=prefix)
    if train_on_prompt:
        flags = [True] * len(ids)
    labels = [tok if (flag and t > 0) else IGNORE_INDEX for t, (tok, flag) in enumerate(zip(ids, flags, strict=True))]
    return {"input_ids": ids, "labels": labels, "prompt_length": prompt_length}


def truncate_example(
    example: Example, *, max_length: int, policy: Literal["left", "drop"], keep_prefix: int = 0
) -> tuple[Example | None, bool]:
    """Fit an example into `max_length` tokens. "left" removes the oldest prompt tokens (after the first `keep_prefix` tokens, the BOS), never
    the final response; if the response still does not fit, its end is cut. "drop" returns None
    for any example that is too long. Returns `(example or None, truncated)`; None also when no
    trained token is left.
    """
    ids, labels, plen = example["input_ids"], example["labels"], example["prompt_length"]
    if len(ids) <= max_length:
        return example, False
    if policy == "drop":
        return None, False
    cut = max(0, min(len(ids) - max_length, plen - keep_prefix))
    ids = ids[:keep_prefix] + ids[keep_prefix + cut:]
    labels = labels[:keep_prefix] + labels[keep_prefix + cut:]
    ids, labels = ids[:max_length], labels[:max_length]
    labels[:1] = [IGNORE_INDEX] * min(1, len(labels))  # nothing predicts the first token
    if all(label == IGNORE_INDEX for label in labels):
        return None, True
    return {"input_ids": ids, "labels": labels, "prompt_length": plen - cut}, True


@dataclass
class TokenizedSFT:
    """The outcome of `tokenize_sft`: the examples and what happened to the others."""

    examples: list[Example]  # in record order (one per assistant turn where the template needs it)
    truncated: int = 0  # shortened to fit `max_length` (policy "left")
    dropped: int = 0  # left out for being too long (policy "drop")
    skipped: list[tuple[int, str | None, str]] = field(default_factory=list)  # (row, field, reason), on_bad_rows=skip


def tokenize_sft(records: list[dict[str, Any]], tokenizer: Any, *, max_length: int,
                 truncation: Literal["left", "drop"] = "left", train_on_prompt: bool = False,
                 source: str = "data", rows: list[int] | None = None,
                 on_bad_rows: Literal["error", "skip"] = "error") -> TokenizedSFT:
    """Tokenize validated `sft` records and apply the truncation policy (to each example of a record).

    Args:
        records: Valid `sft` records (`validate_records(..., "sft")`).
        max_length, truncation: See `truncate_example` ("left" or "drop").
        train_on_prompt: Train on prompt tokens too.
        source, rows: File name and 1-based row of each record (default 1..N), for messages.
        on_bad_rows: "error" raises on a record that cannot be tokenized or whose response is
            truncated away; "skip" leaves it out and lists it in `skipped`.

    Raises:
        AlignkitError: Naming file, row and field, with `on_bad_rows="error"`; or a bad option.
    """
    if truncation not in ("left", "drop"):
        raise AlignkitError(f"option `truncation`: expected 'left' or 'drop', got {truncation!r}")
    if max_length < 1:
        raise AlignkitError(f"option `data.max_length`: expected a positive number, got {max_length}")
    rows = rows or list(range(1, len(records) + 1))
    prefix = special_prefix(tokenizer)
    out = TokenizedSFT(examples=[])
    for row, record in zip(rows, records, strict=True):
        field_name = "messages" if "messages" in record else "completion"
        try:
            fits = []
            for example in encode_examples(tokenizer, record, train_on_prompt=train_on_prompt, prefix=prefix):
                fitted, was_cut = truncate_example(example, max_length=max_length, policy=truncation,
                                                   keep_prefix=len(prefix))
                if fitted is None and was_cut:
                    raise AlignkitError(f"the response is fully truncated by data.max_length={max_length} "
                                        f"({len(example['input_ids'])} tokens)")
                fits.append((fitted, was_cut))
        except AlignkitError as err:
            if on_bad_rows == "error":
                raise AlignkitError(f"{source}, row {row}, field '{field_name}': {err}") from None
            out.skipped.append((row, field_name, str(err)))
            continue
        for fitted, was_cut in fits:
            out.truncated += int(was_cut)
            if fitted is None:
                out.dropped += 1
            else:
                out.examples.append(fitted)
    return out
