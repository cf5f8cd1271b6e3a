"""A generated arithmetic task for "rewards as code": SFT solutions, RL prompts with answers.

Problems are short integer expressions (``a + b``, ``a - b``, ``a * b``, ``a + b - c``) written
with one space between digits, so that a byte-pair tokenizer trained on ordinary text (the
sentiment world's) sees one token per digit instead of an irregular mix of one- and two-digit
pieces::

    prompt      "2 3 + 5 8 ="
    completion  " 8 1"            (SFT records; EOS is appended by the SFT stage)
    answer      "8 1"             (RL / evaluation records: the completion, stripped)

so the built-in reward ``answer_match(extract=full)`` scores a completion 1.0 exactly when it is
the answer and nothing else (whitespace at the ends ignored). `extract_answer` turns a completion
into the plain integer (``" 8 1"`` -> ``"81"``) for analysis.

`write_task` writes five files into a directory:

- ``sft_train.jsonl``, ``sft_heldout.jsonl``: ``{"prompt", "completion"}`` records;
- ``prompts_train.jsonl``, ``prompts_heldout.jsonl``: ``{"prompt", "answer"}`` records;
- ``task.json``: the settings, the counts and the per-operation mix of every split.

The four splits hold mutually disjoint problems (an expression appears in one split only).
The held-out and RL-prompt splits hold distinct problems; ``sft_train`` may repeat a problem
when the problem space is small (e.g. the multiplication table at low difficulty).

Command line: ``alignkit task --run.output_dir DIR [--seed N] ...`` (`alignkit.stages.task`).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from alignkit.atomic import atomic_write_text

KINDS = ("add", "sub", "mul", "add_sub")

# difficulty -> (max_operand for + and -, max operand for *)
DIFFICULTY = {1: (20, 9), 2: (99, 12), 3: (999, 30)}

DEFAULT_WEIGHTS = {"add": 0.35, "sub": 0.3, "mul": 0.15, "add_sub": 0.2}

_ATTEMPTS = 2000  # draws per problem before a split is declared impossible (problem space used up)
_NUMBER = re.compile(r"-?\s?\d+(?: \d+)*")

# Every possible problem belongs to one split, by a seeded hash of its prompt, in these shares; a split
# draws only its own problems, so splits are disjoint and a small problem space (the multiplication
# table) is not used up by the evaluation splits.
SHARES = {"prompts_heldout": 0.1, "sft_heldout": 0.1, "prompts_train": 0.2, "sft_train": 0.6}


def split_of(prompt: str, seed: int) -> str:
    """The split a problem belongs to (a deterministic function of the prompt and the seed)."""
    u = random.Random(f"{seed}:{prompt}").random()
    for name, share in SHARES.items():
        if u < share:
            return name
        u -= share
    return "sft_train"


def spell(n: int) -> str:
    """An integer with its digits separated by spaces: ``-81`` -> ``"- 8 1"``."""
    digits = " ".join(str(abs(n)))
    return f"- {digits}" if n < 0 else digits


def extract_answer(completion: str) -> str | None:
    """The first integer in the first line of a completion, digits joined (``" 8 1"`` -> ``"81"``).

    Accepts the spaced form the task trains (``" - 1 2"`` -> ``"-12"``) as well as plain integers
    (``" 81"``); ``None`` when the first line has no digit.
    """
    line = completion.split("\n", 1)[0]
    match = _NUMBER.search(line)
    if match is None:
        return None
    text = match.group(0).replace(" ", "")
    return str(int(text))


def _operands(kind: str, rng: random.Random, max_operand: int, mul_max: int, negative: bool) -> tuple:
    if kind == "mul":
        return (rng.randint(0, mul_max), rng.randint(0, mul_max))
    if kind == "add":
        return (rng.randint(0, max_operand), rng.randint(0, max_operand))
    if kind == "sub":
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        return (a, b) if negative or a >= b else (b, a)
    # add_sub: a + b - c; without negatives, c is at most a + b
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    c = rng.randint(0, max_operand if negative else min(max_operand, a + b))
    return (a, b, c)


def evaluate(kind: str, operands: tuple) -> int:
    """The value of a problem."""
    if kind == "add":
        return operands[0] + operands[1]
    if kind == "sub":
        return operands[0] - operands[1]
    if kind == "mul":
        return operands[0] * operands[1]
    if kind == "add_sub":
        return operands[0] + operands[1] - operands[2]
    raise ValueError(f"unknown operation {kind!r}; expected one of {', '.join(KINDS)}")


_SIGNS = {"add": ("+",), "sub": ("-",), "mul": ("*",), "add_sub": ("+", "-")}


def render(kind: str, operands: tuple) -> str:
    """The prompt of a problem: ``"2 3 + 5 8 ="``."""
    parts = [spell(operands[0])]
    for sign, x in zip(_SIGNS[kind], operands[1:], strict=True):
        parts += [sign, spell(x)]
    return " ".join(parts) + " ="


def _draw_split(
    n: int,
    rng: random.Random,
    *,
    seed: int,
    unique: bool,
    kinds: list[str],
    weights: list[float],
    max_operand: int,
    mul_max: int,
    negative: bool,
    name: str,
) -> list[tuple[str, str, int]]:
    """`n` problems of split `name` as (kind, prompt, value); distinct ones when `unique`."""
    out: list[tuple[str, str, int]] = []
    own: set[str] = set()
    for _ in range(n):
        for _attempt in range(_ATTEMPTS):
            kind = rng.choices(kinds, weights)[0]
            operands = _operands(kind, rng, max_operand, mul_max, negative)
            prompt = render(kind, operands)
            if split_of(prompt, seed) == name and not (unique and prompt in own):
                break
        else:
            raise ValueError(
                f"split {name!r}: the problem space is used up after {len(out)} of {n} problems; "
                "lower the counts or raise the difficulty / operand ranges"
            )
        own.add(prompt)
        out.append((kind, prompt, evaluate(kind, operands)))
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_task(
    out_dir: str | Path,
    *,
    n_train: int = 2000,
    n_sft: int = 20000,
    n_heldout: int = 500,
    n_sft_heldout: int = 500,
    seed: int = 0,
    difficulty: int = 2,
    max_operand: int | None = None,
    mul_max: int | None = None,
    weights: dict[str, float] | None = None,
    allow_negative: bool = False,
) -> dict:
    """Write the task's files into `out_dir` and return the contents of its ``task.json``.

    `n_train` / `n_heldout`: RL prompts (``prompts_train`` / ``prompts_heldout``); `n_sft` /
    `n_sft_heldout`: SFT solutions (``sft_train`` / ``sft_heldout``). `difficulty` (1-3) picks
    the operand ranges (see `DIFFICULTY`); `max_operand` (for + and -) and `mul_max` (for *)
    override them. `weights`: relative frequency of each operation in `KINDS` (0 drops it).
    `allow_negative`: allow negative results (otherwise ``a - b`` has ``a >= b`` and so on).
    """
    if difficulty not in DIFFICULTY:
        raise ValueError(f"difficulty must be one of {sorted(DIFFICULTY)}, got {difficulty}")
    for name, value in (
        ("n_train", n_train),
        ("n_sft", n_sft),
        ("n_heldout", n_heldout),
        ("n_sft_heldout", n_sft_heldout),
    ):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    d_max, d_mul = DIFFICULTY[difficulty]
    max_operand = d_max if max_operand is None else max_operand
    mul_max = d_mul if mul_max is None else mul_max
    if max_operand < 1 or mul_max < 1:
        raise ValueError("max_operand and mul_max must be >= 1")
    weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
    unknown = set(weights) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown operations {sorted(unknown)}; expected some of {', '.join(KINDS)}")
    kinds = [k for k in KINDS if weights.get(k, 0) > 0]
    if not kinds or any(w < 0 for w in weights.values()):
        raise ValueError("weights must be >= 0 with at least one operation > 0")

    rng = random.Random(seed)
    common = dict(
        seed=seed,
        kinds=kinds,
        weights=[weights[k] for k in kinds],
        max_operand=max_operand,
        mul_max=mul_max,
        negative=allow_negative,
    )
    # The evaluation splits are drawn first, so that they do not depend on n_sft.
    splits = {}
    for name, n, unique in (
        ("prompts_heldout", n_heldout, True),
        ("sft_heldout", n_sft_heldout, True),
        ("prompts_train", n_train, True),
        ("sft_train", n_sft, False),
    ):
        splits[name] = _draw_split(n, rng, unique=unique, name=name, **common)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, problems in splits.items():
        if name.startswith("sft_"):
            rows = [{"prompt": p, "completion": " " + spell(v)} for _, p, v in problems]
        else:
            rows = [{"prompt": p, "answer": spell(v)} for _, p, v in problems]
        _write_jsonl(out / f"{name}.jsonl", rows)

    info = {
        "task": "arithmetic",
        "format": {
            "prompt": "digits separated by spaces, e.g. '2 3 + 5 8 ='",
            "completion": "' ' + the answer's digits separated by spaces, e.g. ' 8 1' (SFT adds EOS)",
            "answer": "the completion stripped, e.g. '8 1': reward `answer_match(extract=full)`",
        },
        "settings": {
            "seed": seed,
            "difficulty": difficulty,
            "max_operand": max_operand,
            "mul_max": mul_max,
            "weights": {k: weights.get(k, 0) for k in KINDS},
            "allow_negative": allow_negative,
        },
        "counts": {name: len(problems) for name, problems in splits.items()},
        "mix": {
            name: {k: sum(1 for kind, _, _ in problems if kind == k) for k in kinds}
            for name, problems in splits.items()
        },
        "distinct": {name: len({p for _, p, _ in problems}) for name, problems in splits.items()},
    }
    atomic_write_text(out / "task.json", json.dumps(info, indent=2) + "\n")
    return info
