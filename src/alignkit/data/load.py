"""Read records (plain dicts) from JSONL, JSON, CSV or Parquet files, `datasets` directories and the hub.

`load_records(source)` routes by what `source` is: an existing file (by its suffix), an existing
directory (a dataset saved with `datasets`' `save_to_disk`; `DIR:SPLIT` picks a split of a saved
`DatasetDict`), or otherwise a hub dataset id `name[:split]`. Every problem a user can cause raises
`AlignkitError` naming the file and line; with `on_bad_rows="skip"`, a JSONL line that cannot be read
(not JSON, not an object, not UTF-8, or longer than `MAX_LINE_BYTES`) is kept in its place as a
`BadRow`, which validation counts as a skipped row. Records are not checked here;
`alignkit.data.formats.validate_records` does that. A JSONL file's records come as `Records`, a list
that knows the file line of each (blank lines are not records), so that a record's row is its line.

CSV cells are text, except in the columns that record formats read as numbers or booleans
(`TYPED_CSV_COLUMNS`): a prompt or response "123" stays the string "123".
"""

from __future__ import annotations

import csv
import json
import random
import re
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from alignkit.errors import AlignkitError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
MAX_LINE_BYTES = 16 * 2**20
"""Longest JSONL line (and CSV field) read, in bytes: 16 MiB. A longer line is refused (or, with
`on_bad_rows="skip"`, skipped) after being streamed through, never held in memory or tokenized."""
TYPED_CSV_COLUMNS = ("score", "best", "label", "margin")
"""CSV columns converted to numbers or booleans when every non-empty cell is one (the numeric and
boolean fields of the record formats); every other column stays text. Also `chosen` in a file
without a `rejected` column: the index of the preferred response in a labeler's answers file."""
_READ_CHUNK = 2**20


@dataclass(frozen=True)
class BadRow:
    """A row of a file that could not be read as a record; kept in its place with `on_bad_rows="skip"`."""

    line: int
    """1-based line of the file."""
    reason: str
    """What was wrong, e.g. "not valid JSON (Expecting value at column 1)"."""


class Records(list):
    """The records of a JSONL file, with the 1-based file line of each (`lines[i]` is the line of `self[i]`).

    A file's blank lines are not records, so record i is not always line i; validation names a record by
    its line (`alignkit.data.formats.validate_records`), the number an editor shows. A slice keeps the
    lines of the records it keeps; anything else (`+`, a comprehension) gives a plain list, numbered 1, 2, ...
    """

    def __init__(self, records: Any = (), lines: list[int] | None = None):
        super().__init__(records)
        self.lines = list(lines) if lines is not None else list(range(1, len(self) + 1))

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return Records(super().__getitem__(index), self.lines[index])
        return super().__getitem__(index)


def record_rows(records: list[Any]) -> list[int]:
    """The 1-based row of each record: its file line for a JSONL file's `Records`, else its position."""
    lines = getattr(records, "lines", None)
    return list(lines) if lines is not None and len(lines) == len(records) else list(range(1, len(records) + 1))


# `name` or `owner/name` (letters, digits, `-`, `_`, `.`), optionally `:split`; a split may be sliced
# the `datasets` way, e.g. `train[:10%]`.
_HUB_ID = re.compile(
    r"^(?P<name>[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?)(?::(?P<split>[\w.-]+(?:\[[\w:%-]*\])?))?$"
)


def load_records(source: str, *, split: str | None = None,
                 on_bad_rows: Literal["error", "skip"] = "error") -> list[dict[str, Any]]:
    """Read every record of a file, a saved `datasets` directory or a hub dataset.

    Args:
        source: A `.jsonl`, `.json`, `.csv` or `.parquet` file; a directory written by
            `Dataset.save_to_disk`, or by `DatasetDict.save_to_disk` with its split as `DIR:SPLIT`;
            or a hub id `name[:split]`.
        split: Split of a saved `DatasetDict` or of a hub dataset when `source` names none (a hub
            dataset defaults to "train" and its split may be sliced, e.g. `train[:10%]`; a saved
            `DatasetDict` has no default). Ignored for files.
        on_bad_rows: "error" raises at a JSONL line that cannot be read; "skip" keeps a `BadRow`
            in its place (so later rows keep their numbers), for `validate_records` to count.

    Returns:
        The records, in file order, as plain dicts (and `BadRow`s, with `on_bad_rows="skip"`).

    Raises:
        AlignkitError: The source does not exist, cannot be parsed (naming file and line), has a
            line longer than `MAX_LINE_BYTES` (naming file, line, size and limit), holds no records, or a split is missing or, for a saved `DatasetDict`, not named (listing the
            available ones).
    """
    if not str(source).strip():
        raise AlignkitError("no data source given (set `data.path`)")
    path = Path(source).expanduser()
    directory, _, named = str(source).rpartition(":")
    if path.is_file():
        records = _load_file(path, on_bad_rows)
    elif path.is_dir():
        records = _load_saved_dataset(path, split)
    elif directory and named and Path(directory).expanduser().is_dir():  # DIR:SPLIT of a local directory
        records = _load_saved_dataset(Path(directory).expanduser(), named, named_in_source=True)
    else:
        match = _HUB_ID.match(str(source))
        if match is None or str(source).lower().endswith(SUFFIXES):
            raise AlignkitError(
                f"data source {source!r} is neither an existing file or directory nor a hub dataset id "
                "(`name`, `owner/name` or `owner/name:split`)"
            )
        records = _load_hub(match["name"], match["split"] or split or "train")
    if not records:
        raise AlignkitError(f"{source}: contains no records")
    return records


def _load_file(path: Path, on_bad_rows: str = "error") -> list[dict[str, Any]]:
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise AlignkitError(
            f"{path}: unsupported file type {path.suffix!r}; expected one of {', '.join(SUFFIXES)}"
        )
    try:
        return _read_jsonl(path, on_bad_rows == "skip") if reader is _read_jsonl else reader(path)
    except UnicodeDecodeError as err:
        raise AlignkitError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _lines(handle: Any, limit: int) -> Any:
    """`(line_no, bytes or None, size)` of each line; None for a line over `limit` bytes (streamed, not kept).

    Sizes do not count the line's newline.
    """
    line_no = 0
    while True:
        line = handle.readline(limit + 1)
        if not line:
            return
        line_no += 1
        size = len(line)
        if size <= limit or line.endswith(b"\n"):
            yield line_no, line, size
            continue
        while not line.endswith(b"\n"):  # the rest of an over-long line, a chunk at a time
            line = handle.readline(_READ_CHUNK)
            if not line:
                break
            size += len(line)
        yield line_no, None, size - line.endswith(b"\n")


def _parse_line(raw: bytes | None, size: int, line_no: int) -> Any:
    """The JSON object of one line; raises `ValueError(reason)` when it is not one."""
    if raw is None:
        raise ValueError(f"{size:,} bytes, over the limit of {MAX_LINE_BYTES:,} bytes per line "
                         "(alignkit.data.load.MAX_LINE_BYTES); split the record or shorten it")
    try:
        # without its line ending, so that a line cut short is reported at its own last column
        text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8").rstrip("\r\n")
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 text ({err.reason} at byte {err.start} of the line)") from None
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {_json_type(record)}")
    return record


def _read_jsonl(path: Path, skip_bad: bool = False) -> Records:
    """The objects of a JSONL file (blank lines ignored) with their lines, read in bounded chunks (see
    `MAX_LINE_BYTES`)."""
    records: list[Any] = []
    lines: list[int] = []
    with path.open("rb") as handle:
        for line_no, raw, size in _lines(handle, MAX_LINE_BYTES):
            try:
                record = _parse_line(raw, size, line_no)
            except ValueError as err:
                if not skip_bad:
                    raise AlignkitError(f"{path}, line {line_no}: {err}") from None
                record = BadRow(line_no, str(err))
            if record is not None:
                records.append(record)
                lines.append(line_no)
    return Records(records, lines)


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise AlignkitError(
            f"{path}, line {err.lineno}: not valid JSON ({err.msg} at column {err.colno})"
        ) from None
    if isinstance(data, dict):
        lists = [value for value in data.values() if isinstance(value, list)]
        if len(lists) != 1:
            raise AlignkitError(
                f"{path}: expected a list of records, or an object with exactly one list of records; "
                f"found an object with {len(lists)} list values"
            )
        data = lists[0]
    if not isinstance(data, list):
        raise AlignkitError(f"{path}: expected a list of records, got {_json_type(data)}")
    for number, record in enumerate(data, start=1):
        if not isinstance(record, dict):
            raise AlignkitError(f"{path}, record {number}: expected a JSON object, got {_json_type(record)}")
    return data


def _read_csv(path: Path) -> list[dict[str, Any]]:
    """Read a CSV file with a header row; cells are text except in `TYPED_CSV_COLUMNS` (see there)."""
    rows = []
    previous_limit = csv.field_size_limit(MAX_LINE_BYTES)  # the default, 128 KiB, refuses long responses
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            try:
                for row in reader:
                    if None in row or None in row.values():  # extra values go under key None, missing ones are None
                        raise AlignkitError(
                            f"{path}, line {reader.line_num}: the number of values differs from the header's "
                            f"{len(reader.fieldnames or [])} columns"
                        )
                    rows.append(row)
            except csv.Error as err:
                raise AlignkitError(f"{path}, line {reader.line_num}: not valid CSV ({err}; a field may hold at "
                                    f"most {MAX_LINE_BYTES:,} characters)") from None
            columns = reader.fieldnames or []
    finally:
        csv.field_size_limit(previous_limit)
    typed = [c for c in columns if c in TYPED_CSV_COLUMNS or (c == "chosen" and "rejected" not in columns)]
    for column in typed:
        convert = _column_converter([row[column] for row in rows])
        if convert is not None:
            for row in rows:
                row[column] = convert(row[column])
    return rows


def _column_converter(values: list[str]) -> Callable[[str], Any] | None:
    """A function converting every value of a CSV column to int, float or bool, or None to keep strings."""
    present = [value.strip() for value in values if value.strip()]
    if not present:
        return None
    for kind in (int, float):
        try:
            [kind(value) for value in present]
        except ValueError:
            continue
        return lambda value, kind=kind: kind(value) if value.strip() else None
    if all(value.lower() in ("true", "false") for value in present):
        return lambda value: value.strip().lower() == "true" if value.strip() else None
    return None


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq  # a dependency of `datasets`

    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise AlignkitError(f"{path}: cannot read as Parquet ({err})") from None


def _load_saved_dataset(path: Path, split: str | None, named_in_source: bool = False) -> list[dict[str, Any]]:
    """The records of a `save_to_disk` directory: a `Dataset`, or the named split of a `DatasetDict`.

    A `DatasetDict` without a split named is an error rather than a guess: reading `train` for a
    held-out path would evaluate on the training data.
    """
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise AlignkitError(
            f"{path}: a directory, but not a dataset saved with `save_to_disk` ({err})"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = ", ".join(loaded)
        if split is None:
            raise AlignkitError(f"{path}: a DatasetDict with splits {splits}; name one as DIR:SPLIT "
                                f"(e.g. {path}:{next(iter(loaded), 'train')})")
        if split not in loaded:
            raise AlignkitError(f"{path}: no split {split!r}; available splits: {splits}")
        loaded = loaded[split]
    elif named_in_source:
        raise AlignkitError(f"{path}:{split}: {path} is a single saved Dataset, without splits; "
                            "give the directory alone")
    return loaded.to_list()


def _load_hub(name: str, split: str) -> list[dict[str, Any]]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as err:  # network, missing repo, missing split: all reported the same way
        raise AlignkitError(f"hub dataset {name!r}, split {split!r}: cannot load ({err})") from err
    return dataset.to_list() if hasattr(dataset, "to_list") else [dict(row) for row in dataset]


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def content_key(value: Any) -> Hashable:
    """What makes two records (or prompts) the same content: their JSON, keys sorted."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def split_records(
    records: list[Any], eval_fraction: float, seed: int, key: Callable[[Any], Any] | None = None
) -> tuple[list[Any], list[Any]]:
    """Hold out a random `eval_fraction` of the records, the same way for the same seed, disjoint by content.

    Records with the same content (`key`; default `content_key` of the record) go to the same side,
    so no held-out record is a copy of a training one. Distinct contents are taken in a seeded
    random order while their copies fit in `round(len(records) * eval_fraction)` (at least 1): with
    all records distinct, exactly that many, as a plain shuffle would; when every content has more
    copies than that, all copies of one content. Both parts keep the original order of the records.

    Args:
        records: All records (or any items, e.g. `(row, record)` pairs with a `key`).
        eval_fraction: Fraction held out, in [0, 1).
        seed: Seed of the shuffle that picks the held-out records.
        key: What makes two items copies of each other (anything hashable, or JSON-able).

    Returns:
        `(train, eval)`.

    Raises:
        AlignkitError: The fraction is outside [0, 1), or it would leave no training records (e.g.
            every record is a copy of one).
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise AlignkitError(f"option `data.eval_fraction`: expected a value in [0, 1), got {eval_fraction}")
    if eval_fraction == 0.0:
        return list(records), []
    n_eval = max(1, round(len(records) * eval_fraction))
    copies: dict[Any, list[int]] = {}
    for i, record in enumerate(records):
        k = key(record) if key is not None else record
        copies.setdefault(k if isinstance(k, int | str) else content_key(k), []).append(i)
    groups = list(copies.values())
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    held_out: set[int] = set()
    for g in order:
        if len(held_out) + len(groups[g]) <= n_eval:
            held_out.update(groups[g])
    if not held_out:  # every content has more copies than the held-out share: hold out one content
        held_out.update(groups[order[0]])
    if len(held_out) >= len(records):
        distinct = f" ({len(groups)} distinct)" if len(groups) < len(records) else ""
        raise AlignkitError(
            f"option `data.eval_fraction`: holding out {eval_fraction} of {len(records)} records{distinct} leaves "
            "none for training (copies of a record stay on one side); give more records, a smaller fraction, "
            "or `data.eval_path`"
        )
    train = [record for i, record in enumerate(records) if i not in held_out]
    evaluation = [record for i, record in enumerate(records) if i in held_out]
    return train, evaluation
