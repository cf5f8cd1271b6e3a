"""Built-in reward functions: answer matching, format matching, length and repetition penalties.

Every reward function here follows the interface shared with user functions::

    fn(prompts: list, completions: list[str], **columns) -> list[float | None]

``prompts`` holds one prompt per completion (a string or a chat message list), ``completions``
the generated texts, and ``columns`` every extra column of the prompt records as a list aligned
with the completions (e.g. ``answer=[...]``). A function whose signature names a parameter
``completion_ids`` also gets the token ids of each completion (``list[list[int]]``). It returns one
float per completion, or None where the reward does not apply to that completion.

Built-ins take their settings as keyword-only parameters with defaults; the loader binds them with
``functools.partial(fn, **settings)`` after :func:`check_builtin` has validated them. This module
imports only the standard library (plus :class:`~alignkit.errors.AlignkitError`), because it is
imported in worker processes.
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from alignkit.errors import AlignkitError

EXTRACT_MODES = ("auto", "boxed", "prefix", "hash", "last_number", "full")
MATCH_MODES = ("fullmatch", "search")
LENGTH_UNITS = ("words", "chars", "tokens")

_BOXED_RE = re.compile(r"\\boxed\s*\{")
_PREFIX_RE = re.compile(r"\banswer\s*(?:is(?![\w'])\s*:?|:)", re.IGNORECASE)
# A number: thousands groups of exactly three digits (1,234) or plain digits, optional decimals,
# exponent and denominator. Not glued to a preceding digit or point; a sign only where it cannot be
# a binary minus (not after a word character or a closing bracket).
_NUMBER_BODY = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?(?:/\d+)?"
_NUMBER_RE = re.compile(r"(?:(?<![\w)\]}])[-+\u2212])?(?<![\d.])" + _NUMBER_BODY + r"(?!\d)")
_DECIMAL_RE = re.compile(r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+")
_EXPONENT_RE = re.compile(r"(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)[eE][-+]?\d+")
_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]+)\}\s*\{([^{}]+)\}")


# ---------------------------------------------------------------------------------------------
# Answer extraction and number parsing


def extract_answer(text: str, mode: str = "auto") -> str | None:
    """Extract the final answer from a completion.

    Modes:
        ``boxed``: the content of the last ``\\boxed{...}`` (nested braces balanced), stripped.
        ``prefix``: the text after the last "answer:" or "answer is" (case-insensitive), up to the
            end of that line, stripped of surrounding ``*`` (markdown bold) and a trailing period.
        ``hash``: the text after the last ``####`` up to the end of that line, cleaned the same way.
        ``last_number``: the last number in the text, with its sign, decimals, thousands
            separators (``1,234``) and denominator (``3/4``), as written.
        ``full``: the whole text, stripped.
        ``auto``: the first of boxed, prefix, hash, last_number that finds something.

    Args:
        text: the completion.
        mode: one of the modes above.

    Returns:
        The answer text, or None when the mode finds nothing (or the result is empty).

    Raises:
        AlignkitError: for an unknown mode.
    """
    if mode not in _EXTRACTORS and mode != "auto":
        raise AlignkitError(f"answer extraction mode `{mode}` is unknown (modes: {', '.join(EXTRACT_MODES)})")
    if mode != "auto":
        return _EXTRACTORS[mode](text)
    for name in ("boxed", "prefix", "hash", "last_number"):
        found = _EXTRACTORS[name](text)
        if found is not None:
            return found
    return None


def _balanced_from(text: str, start: int) -> str | None:
    """The text from ``start`` up to the brace closing an already-open ``{``, or None if unclosed."""
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
    return None


def _extract_boxed(text: str) -> str | None:
    for match in reversed(list(_BOXED_RE.finditer(text))):
        content = _balanced_from(text, match.end())
        if content is not None:
            return content.strip() or None
    return None


def _clean_line(rest: str) -> str | None:
    line = rest.split("\n", 1)[0].strip().strip("*").strip()
    line = line.rstrip(".").rstrip().strip("*").strip()
    return line or None


def _extract_prefix(text: str) -> str | None:
    matches = list(_PREFIX_RE.finditer(text))
    return _clean_line(text[matches[-1].end() :]) if matches else None


def _extract_hash(text: str) -> str | None:
    at = text.rfind("####")
    return None if at < 0 else _clean_line(text[at + 4 :])


def _extract_last_number(text: str) -> str | None:
    matches = list(_NUMBER_RE.finditer(text))
    return matches[-1].group(0) if matches else None


def _extract_full(text: str) -> str | None:
    return text.strip() or None


_EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "boxed": _extract_boxed,
    "prefix": _extract_prefix,
    "hash": _extract_hash,
    "last_number": _extract_last_number,
    "full": _extract_full,
}


def parse_number(text: Any) -> Fraction | float | None:
    """Parse a number the way answers write it.

    Accepted: integers and decimals (``42``, ``-3.5``, ``2.50``), thousands groups of exactly three
    digits (``1,234``; ``1,2`` is not a number), a leading currency ``$`` (``$12``, ``-$5``), a
    trailing ``%`` read as the plain number (``12%`` is 12, not 0.12), surrounding LaTeX ``$...$``,
    fractions ``a/b`` and ``\\frac{a}{b}``, and exponent notation (``1e3``). An int, Fraction or
    float is accepted as well.

    Returns:
        A :class:`~fractions.Fraction` (exact) for integers, decimals and fractions; a float for
        exponent notation and for a float given (it already carries rounding error, so answer
        comparisons treat it with a tolerance); None when the text is not a number (or a denominator is zero, or the
        value is not finite).
    """
    if isinstance(text, bool):
        return None
    if isinstance(text, int | Fraction):
        return Fraction(text)
    if isinstance(text, float):
        return _finite(text)
    if not isinstance(text, str):
        return None
    sign, body = _split_sign(text)
    if sign is None:
        return None
    value = _parse_unsigned(body)
    return None if value is None else sign * value


def _split_sign(text: str) -> tuple[int | None, str]:
    """Strip signs, ``$`` and ``%`` from a number's text; returns (sign, the bare number)."""
    s = text.strip().replace("\u2212", "-").replace("\\$", "$").replace("\\%", "%")
    s = s.strip("$").strip().removesuffix("%").strip()
    sign = 1
    if s[:1] in ("-", "+"):
        sign = -1 if s[0] == "-" else 1
        s = s[1:].strip()
    if s.startswith("$"):
        s = s[1:].strip()
    if s[:1] in ("-", "+"):
        return None, s  # two signs
    return sign, s


def _parse_unsigned(s: str) -> Fraction | float | None:
    latex = _LATEX_FRAC_RE.fullmatch(s)
    if latex is not None or "/" in s:
        num_text, den_text = latex.groups() if latex is not None else s.split("/", 1)
        num, den = _parse_plain(num_text.strip()), _parse_plain(den_text.strip())
        if num is None or den is None or den == 0:
            return None
        if isinstance(num, Fraction) and isinstance(den, Fraction):
            return num / den
        return _finite(float(num) / float(den))
    return _parse_plain(s)


def _parse_plain(s: str) -> Fraction | float | None:
    if _DECIMAL_RE.fullmatch(s):
        return Fraction(s.replace(",", ""))
    if _EXPONENT_RE.fullmatch(s):
        return _finite(float(s.replace(",", "")))
    return None


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _normalise(text: str) -> str:
    s = " ".join(text.split()).lower()
    return s.strip("$").strip().rstrip(".").strip()


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _answers_equal(answer: str, reference: Any, numeric: bool, rel_tol: float) -> bool:
    if numeric:
        a, b = parse_number(answer), parse_number(reference)
        if a is not None and b is not None:
            if isinstance(a, Fraction) and isinstance(b, Fraction):
                return a == b
            return math.isclose(float(a), float(b), rel_tol=rel_tol)
    return _normalise(answer) == _normalise(str(reference))


# ---------------------------------------------------------------------------------------------
# Built-in reward functions


def answer_match(
    prompts: list,
    completions: list[str],
    *,
    column: str = "answer",
    extract: str = "auto",
    numeric: bool = True,
    rel_tol: float = 1e-9,
    **columns: list,
) -> list[float | None]:
    """Exact-answer reward: does the answer extracted from the completion equal the reference?

    Formula: r_i = 1.0 if equal(extract_answer(y_i, extract), ref_i) else 0.0, and r_i = None
    where ref_i = ``columns[column][i]`` is None (or NaN). ``equal`` compares as numbers when
    ``numeric`` and both sides parse (:func:`parse_number`): exactly when both are fractions,
    ``math.isclose(a, b, rel_tol=rel_tol)`` otherwise; else it compares normalised strings
    (stripped, whitespace collapsed, lowercased, surrounding ``$`` and trailing ``.`` removed). An
    answer that cannot be extracted scores 0.0. The reference may be an int, float or string.

    Args:
        prompts: the prompts (unused).
        completions: the generated texts.
        column: the prompt-record column holding the reference answers.
        extract: the :func:`extract_answer` mode.
        numeric: compare as numbers where both sides parse as numbers.
        rel_tol: relative tolerance for numbers that are not both exact fractions.
        **columns: the prompt-record columns, each a list aligned with ``completions``.

    Raises:
        AlignkitError: when ``column`` is not among the columns, or ``extract`` is unknown.
    """
    if column not in columns:
        present = ", ".join(f"`{name}`" for name in sorted(columns)) or "none"
        raise AlignkitError(
            f"reward function `answer_match`: column `{column}` is not in the prompt records "
            f"(columns present: {present}); set `column` to the column holding the reference answers"
        )
    rewards: list[float | None] = []
    for completion, reference in zip(completions, columns[column], strict=True):
        if _is_missing(reference):
            rewards.append(None)
            continue
        answer = extract_answer(completion, extract)
        rewards.append(float(answer is not None and _answers_equal(answer, reference, numeric, rel_tol)))
    return rewards


def format_match(
    prompts: list, completions: list[str], *, pattern: str, mode: str = "fullmatch", **_: Any
) -> list[float | None]:
    """Format reward: does the stripped completion match a regular expression?

    Formula: r_i = 1.0 if re.<mode>(pattern, y_i.strip(), flags=re.DOTALL) else 0.0, where
    ``mode`` is ``fullmatch`` (the whole completion must match) or ``search`` (anywhere in it).

    Args:
        prompts: the prompts (unused).
        completions: the generated texts.
        pattern: the regular expression.
        mode: ``fullmatch`` or ``search``.

    Raises:
        AlignkitError: for a pattern that does not compile or an unknown mode.
    """
    _check_choice("format_match", "mode", mode, MATCH_MODES)
    regex = _compile("format_match", pattern)
    matcher = regex.fullmatch if mode == "fullmatch" else regex.search
    return [1.0 if matcher(completion.strip()) else 0.0 for completion in completions]


def length_penalty(
    prompts: list,
    completions: list[str],
    *,
    max_length: int,
    per_unit: float = 1.0,
    unit: str = "words",
    completion_ids: list[list[int]] | None = None,
    **_: Any,
) -> list[float | None]:
    """Length penalty: a linear cost for every unit beyond ``max_length``.

    Formula: r_i = -per_unit * max(0, len_i - max_length), where len_i counts ``words``
    (``len(y_i.split())``), ``chars`` (``len(y_i)``) or ``tokens`` (``len(completion_ids[i])``).

    Args:
        prompts: the prompts (unused).
        completions: the generated texts.
        max_length: the length allowed without penalty.
        per_unit: the penalty per unit over ``max_length``.
        unit: ``words``, ``chars`` or ``tokens``.
        completion_ids: the completions' token ids (given by the trainer; needed for ``tokens``).

    Raises:
        AlignkitError: for an unknown unit, or ``tokens`` without ``completion_ids``.
    """
    _check_choice("length_penalty", "unit", unit, LENGTH_UNITS)
    if unit == "tokens":
        if completion_ids is None:
            raise AlignkitError(
                "reward function `length_penalty`: setting `unit` is `tokens` but no completion "
                "token ids were given"
            )
        lengths = [len(ids) for ids in completion_ids]
    elif unit == "chars":
        lengths = [len(completion) for completion in completions]
    else:
        lengths = [len(completion.split()) for completion in completions]
    if len(lengths) != len(completions):
        raise AlignkitError(
            f"reward function `length_penalty`: {len(lengths)} token id lists for "
            f"{len(completions)} completions"
        )
    return [-per_unit * (n - max_length) if n > max_length else 0.0 for n in lengths]


def repetition_penalty(
    prompts: list, completions: list[str], *, n: int = 3, scale: float = 1.0, **_: Any
) -> list[float | None]:
    """Repetition penalty: the share of repeated word n-grams in the completion.

    Formula: r_i = -scale * (1 - distinct_i / total_i), over the word n-grams of the lowercased,
    whitespace-split completion (total_i = words - n + 1, distinct_i = unique n-grams among them);
    r_i = 0.0 when the completion has fewer than ``n`` words.

    Args:
        prompts: the prompts (unused).
        completions: the generated texts.
        n: the n-gram length in words.
        scale: the penalty for a completion made only of repeats (in the limit).
    """
    rewards: list[float | None] = []
    for completion in completions:
        words = completion.lower().split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        repeated = 1 - len(set(grams)) / len(grams) if grams else 0.0
        rewards.append(-scale * repeated if repeated else 0.0)
    return rewards


BUILTINS: dict[str, Callable[..., list[float | None]]] = {
    "answer_match": answer_match,
    "format_match": format_match,
    "length_penalty": length_penalty,
    "repetition_penalty": repetition_penalty,
}


# ---------------------------------------------------------------------------------------------
# Settings validation (before the run starts)


def _compile(builtin: str, pattern: Any) -> re.Pattern[str]:
    if not isinstance(pattern, str):
        raise AlignkitError(
            f"reward function `{builtin}`: setting `pattern` must be a string, got {pattern!r}"
        )
    try:
        return re.compile(pattern, re.DOTALL)
    except re.error as exc:
        raise AlignkitError(
            f"reward function `{builtin}`: setting `pattern` {pattern!r} is not a valid regular "
            f"expression ({exc})"
        ) from None


def _check_choice(builtin: str, setting: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise AlignkitError(
            f"reward function `{builtin}`: setting `{setting}` is {value!r}; expected one of "
            f"{', '.join(allowed)}"
        )


def _check_number(
    builtin: str, setting: str, value: Any, *, minimum: float | None = None, integer: bool = False
) -> None:
    kinds = (int,) if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)
    if ok and (minimum is None or value >= minimum):
        return
    what = "an integer" if integer else "a finite number"
    bound = "" if minimum is None else f" >= {minimum:g}"
    raise AlignkitError(
        f"reward function `{builtin}`: setting `{setting}` must be {what}{bound}, got {value!r}"
    )


def _check_type(builtin: str, setting: str, value: Any, kind: type, what: str) -> None:
    if not isinstance(value, kind) or (isinstance(value, str) and not value):
        raise AlignkitError(f"reward function `{builtin}`: setting `{setting}` must be {what}, got {value!r}")


_SETTING_CHECKS: dict[str, Callable[[str, Any], object]] = {
    "pattern": _compile,
    "mode": lambda b, v: _check_choice(b, "mode", v, MATCH_MODES),
    "extract": lambda b, v: _check_choice(b, "extract", v, EXTRACT_MODES),
    "unit": lambda b, v: _check_choice(b, "unit", v, LENGTH_UNITS),
    "max_length": lambda b, v: _check_number(b, "max_length", v, minimum=0),
    "n": lambda b, v: _check_number(b, "n", v, minimum=1, integer=True),
    "per_unit": lambda b, v: _check_number(b, "per_unit", v),
    "scale": lambda b, v: _check_number(b, "scale", v),
    "rel_tol": lambda b, v: _check_number(b, "rel_tol", v, minimum=0),
    "numeric": lambda b, v: _check_type(b, "numeric", v, bool, "true or false"),
    "column": lambda b, v: _check_type(b, "column", v, str, "a non-empty column name"),
}

# Keyword-only parameters that the trainer fills, not the user.
_RUNTIME_PARAMS = frozenset({"completion_ids"})


def builtin_settings(name: str) -> dict[str, inspect.Parameter]:
    """The settings a built-in accepts: its keyword-only parameters, minus those the trainer fills."""
    params = inspect.signature(BUILTINS[name]).parameters.values()
    return {
        p.name: p
        for p in params
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _RUNTIME_PARAMS
    }


def check_builtin(name: str, settings: dict[str, Any]) -> None:
    """Validate a built-in's name and settings before the run starts.

    Checks: the name is a built-in (suggesting a close match); every setting is one the built-in
    accepts; every setting without a default is given (``format_match`` needs ``pattern``,
    ``length_penalty`` needs ``max_length``); ``pattern`` compiles; ``mode``, ``extract`` and
    ``unit`` are among their choices; ``max_length >= 0``; ``n >= 1`` (an integer); ``per_unit``
    and ``scale`` are finite numbers; ``rel_tol >= 0``; ``numeric`` is a bool; ``column`` a
    non-empty string.

    Raises:
        AlignkitError: one line naming the built-in and the setting at fault.
    """
    if name not in BUILTINS:
        close = difflib.get_close_matches(name, BUILTINS, n=1)
        hint = f"; did you mean `{close[0]}`?" if close else ""
        raise AlignkitError(
            f"reward function `{name}` is not a built-in{hint} (built-ins: {', '.join(BUILTINS)})"
        )
    accepted = builtin_settings(name)
    for setting in settings:
        if setting not in accepted:
            raise AlignkitError(
                f"reward function `{name}`: setting `{setting}` is unknown (accepted: {', '.join(accepted)})"
            )
    for setting, param in accepted.items():
        if param.default is inspect.Parameter.empty and setting not in settings:
            raise AlignkitError(f"reward function `{name}`: setting `{setting}` is required")
    for setting, value in settings.items():
        check = _SETTING_CHECKS.get(setting)
        if check is not None:
            check(name, value)
