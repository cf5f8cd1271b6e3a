"""Prompts that TRL's dataset shapes leave implicit, and prompts as records and text.

`split_preference_prompt` makes the prompt of a preference record explicit, for the shapes TRL
accepts (and the hub holds) that name no separate prompt:

    {chosen, rejected} strings             the prompt is their shared text prefix; a space just
                                           before the first difference stays with the responses
                                           (TRL's `extract_prompt`)
    {chosen, rejected} conversations       the prompt is their longest common prefix of messages,
                                           up to its last user turn (trl-lib/ultrafeedback_binarized)
    {prompt: string, chosen, rejected}     conversations that begin with the prompt turn(s)
                                           (HuggingFaceH4/ultrafeedback_binarized): the shared turns
                                           are the prompt; the string must be their last user turn
    {prompt: messages, chosen, rejected}   conversations that repeat `prompt`: it is cut from both

Records written by the sampling stages keep a conversation prompt as given; their sampled text
becomes an assistant turn after it (`with_assistant_turns`), so the records are valid input again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

RESPONSE_FIELDS = ("chosen", "rejected", "completion", "response")
"""Fields of a record that hold one response (`responses` holds a list of them)."""


class PromptError(ValueError):
    """A preference record whose implicit prompt cannot be extracted; `field` names the field."""

    def __init__(self, field: str, reason: str):
        super().__init__(reason)
        self.field, self.reason = field, reason


def _turn(message: Any) -> Any:
    """What makes two messages the same turn (datasets may add empty keys to stored messages)."""
    return (message.get("role"), message.get("content")) if isinstance(message, dict) else message


def shared_prefix_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Length of the longest common prefix of two sequences (characters, or messages by role and content)."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if _turn(a[i]) != _turn(b[i])), n)


def extract_text_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """`(prompt, chosen, rejected)`: the shared text prefix of two strings and their remainders.

    A space just before the first differing character is given to the responses, so
    "Sky is blue" / "Sky is green" give "Sky is", " blue", " green".

    Raises:
        PromptError: No shared prefix, or one string is a prefix of the other (nothing would be left).
    """
    i = shared_prefix_length(chosen, rejected)
    if i == 0:
        raise PromptError("prompt", "missing, and 'chosen' and 'rejected' share no leading text to take as "
                                    "the prompt")
    if i == min(len(chosen), len(rejected)):
        raise PromptError("prompt", "missing, and one of 'chosen' and 'rejected' is a prefix of the other, so "
                                    "no prompt can be taken from them")
    if chosen[i - 1] == " ":
        i -= 1
    return chosen[:i], chosen[i:], rejected[i:]


def extract_conversation_prompt(chosen: list[Any], rejected: list[Any]) -> tuple[list, list, list]:
    """`(prompt, chosen, rejected)`: the shared messages of two conversations up to the last shared user turn.

    Raises:
        PromptError: The conversations share no user turn.
    """
    shared = shared_prefix_length(chosen, rejected)
    users = [i for i in range(shared) if _turn(chosen[i])[0] == "user"]
    if not users:
        raise PromptError("prompt", "missing, and 'chosen' and 'rejected' share no leading user turn to take "
                                    "as the prompt")
    cut = users[-1] + 1
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _conversations(*values: Any) -> bool:
    return all(isinstance(v, list) and v and all(isinstance(m, dict) for m in v) for v in values)


def split_preference_prompt(record: dict[str, Any]) -> dict[str, Any] | None:
    """The record with its prompt made explicit (a new dict), or None when there is nothing to extract.

    See the module docstring for the shapes; other fields are kept. Records of other shapes (or with
    wrong types) give None and are left to validation.

    Raises:
        PromptError: A shape above whose prompt cannot be extracted.
    """
    prompt, chosen, rejected = record.get("prompt"), record.get("chosen"), record.get("rejected")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if prompt is not None:
            return None
        new = extract_text_prompt(chosen, rejected)
    elif _conversations(chosen, rejected):
        starts_with_prompt = chosen[0].get("role") != "assistant" and rejected[0].get("role") != "assistant"
        if isinstance(prompt, list):
            n = len(prompt)
            if not (shared_prefix_length(prompt, chosen) == n == shared_prefix_length(prompt, rejected)):
                return None
            new = (prompt, chosen[n:], rejected[n:])
        elif prompt is None or (isinstance(prompt, str) and starts_with_prompt):
            new = extract_conversation_prompt(chosen, rejected)
            if isinstance(prompt, str) and str(new[0][-1].get("content", "")).strip() != prompt.strip():
                raise PromptError("prompt", "a string, while 'chosen' and 'rejected' are conversations that begin "
                                            "with other turns; expected it to be their last shared user turn")
        else:
            return None
    else:
        return None
    return {**record, "prompt": new[0], "chosen": new[1], "rejected": new[2]}


def prompt_text(value: Any) -> str:
    """A prompt (or response) as plain text: a string as is, messages as their contents, one per line."""
    if isinstance(value, list):
        return "\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in value)
    return str(value)


def with_assistant_turns(record: dict[str, Any]) -> dict[str, Any]:
    """A record whose prompt is a conversation, with each string response made one assistant turn.

    Sampled responses are text; after a message-list prompt a record's responses are messages (see
    `alignkit.data.formats`). Records with a string prompt are returned unchanged.
    """
    if not isinstance(record.get("prompt"), list):
        return record

    def turns(value: Any) -> Any:
        return [{"role": "assistant", "content": value}] if isinstance(value, str) else value

    out = {k: turns(v) if k in RESPONSE_FIELDS else v for k, v in record.items()}
    if isinstance(out.get("responses"), list):
        out["responses"] = [turns(r) for r in out["responses"]]
    return out
