"""Read records (plain dicts) from JSONL, JSON, CSV or Parquet files, `datasets` directories and the hub.

`load_records(source)` routes by what `source` is: an existing file (by its suffix), an existing
directory (a dataset saved with `datasets`' `save_to_disk`), or otherwise a hub dataset id
`name[:split]`. Every problem a user can cause raises `AlignkitError` naming the file and line.
Records are not checked here; `alignkit.data.formats.validate_records` does that.
"""

from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path
from typing import Any

from alignkit.errors import AlignkitError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# `name` or `owner/name` (letters, digits, `-`, `_`, `.`), optionally `:split`; a split may be sliced
# the `datasets` way, e.g. `train[:10%]`.
_HUB_ID = re.compile(
    r"^(?P<name>[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?)(?::(?P<split>[\w.-]+(?:\[[\w:%-]*\])?))?$"
)


def load_records(source: str, *, split: str | None = None) -> list[dict[str, Any]]:
    """Read every record of a file, a saved `datasets` directory or a hub dataset.

    Args:
        source: A `.jsonl`, `.json`, `.csv` or `.parquet` file; a directory written by
            `Dataset.save_to_disk` or `DatasetDict.save_to_disk`; or a hub id `name[:split]`.
        split: Split of a saved `DatasetDict` or of a hub dataset when `source` names none
            (default "train"; a hub split may be sliced, e.g. `train[:10%]`). Ignored for files.

    Returns:
        The records, in file order, as plain dicts.

    Raises:
        AlignkitError: The source does not exist, cannot be parsed (naming file and line), holds
            no records, or a requested split is missing (listing the available ones).
    """
    if not str(source).strip():
        raise AlignkitError("no data source given (set `data.path`)")
    path = Path(source).expanduser()
    if path.is_file():
        records = _load_file(path)
    elif path.is_dir():
        records = _load_saved_dataset(path, split)
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


def _load_file(path: Path) -> list[dict[str, Any]]:
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise AlignkitError(
            f"{path}: unsupported file type {path.suffix!r}; expected one of {', '.join(SUFFIXES)}"
        )
    try:
        return reader(path)
    except UnicodeDecodeError as err:
        raise AlignkitError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise AlignkitError(
                    f"{path}, line {line_no}: not valid JSON ({err.msg} at column {err.colno})"
                ) from None
            if not isinstance(record, dict):
                raise AlignkitError(
                    f"{path}, line {line_no}: expected a JSON object, got {_json_type(record)}"
                )
            records.append(record)
    return records


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
    """Read a CSV file with a header row; columns that are all numbers or all true/false are converted."""
    rows = []
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            if None in row or None in row.values():  # extra values go under key None, missing ones are None
                raise AlignkitError(
                    f"{path}, line {reader.line_num}: the number of values differs from the header's "
                    f"{len(reader.fieldnames or [])} columns"
                )
            rows.append(row)
        columns = reader.fieldnames or []
    for column in columns:
        convert = _column_converter([row[column] for row in rows])
        if convert is not None:
            for row in rows:
                row[column] = convert(row[column])
    return rows


def _column_converter(values: list[str]):
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


def _load_saved_dataset(path: Path, split: str | None) -> list[dict[str, Any]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise AlignkitError(
            f"{path}: a directory, but not a dataset saved with `save_to_disk` ({err})"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        split = split or "train"
        if split not in loaded:
            raise AlignkitError(f"{path}: no split {split!r}; available splits: {', '.join(loaded)}")
        loaded = loaded[split]
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


def split_records(
    records: list[dict[str, Any]], eval_fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Hold out a random `eval_fraction` of the records, the same way for the same seed.

    The held-out count is `round(len(records) * eval_fraction)`, at least 1 when the fraction is
    positive; both parts keep the original order of the records.

    Args:
        records: All records.
        eval_fraction: Fraction held out, in [0, 1).
        seed: Seed of the shuffle that picks the held-out records.

    Returns:
        `(train, eval)`.

    Raises:
        AlignkitError: The fraction is outside [0, 1), or it would leave no training records.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise AlignkitError(f"option `data.eval_fraction`: expected a value in [0, 1), got {eval_fraction}")
    if eval_fraction == 0.0:
        return list(records), []
    n_eval = max(1, round(len(records) * eval_fraction))
    if n_eval >= len(records):
        raise AlignkitError(
            f"option `data.eval_fraction`: holding out {eval_fraction} of {len(records)} records leaves "
            "none for training; give more records, a smaller fraction, or `data.eval_path`"
        )
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:n_eval])
    train = [record for i, record in enumerate(records) if i not in held_out]
    evaluation = [record for i, record in enumerate(records) if i in held_out]
    return train, evaluation
