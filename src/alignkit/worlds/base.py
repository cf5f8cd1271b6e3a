"""What every embedded world offers, where worlds are cached, and how their files are written.

A *world* is a small, self-contained alignment task built once on the local machine: a tokenizer,
a pretrained base model, prompt sets and a gold scorer (the stand-in for human judgement). Later
stages and the pipeline use a world only through `World`, so any world can take its place.

Worlds live in `$ALIGNKIT_CACHE/worlds/<name>` (`ALIGNKIT_CACHE` defaults to `~/.cache/alignkit`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from alignkit.atomic import atomic_path  # the world builders import it from here too
from alignkit.errors import AlignkitError

GoldFn = Callable[[list[str]], Any]
"""A gold scorer: texts -> tensor (or array) of floats in [0, 1], one per text."""

SUMMARY_FILE = "summary.json"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The alignkit cache directory: `cache_dir`, else `$ALIGNKIT_CACHE`, else `~/.cache/alignkit`."""
    root = cache_dir or os.environ.get("ALIGNKIT_CACHE") or "~/.cache/alignkit"
    return Path(root).expanduser()


def world_root(name: str, cache_dir: str | Path | None = None) -> Path:
    """Directory of world `name`: `<cache root>/worlds/<name>`."""
    return cache_root(cache_dir) / "worlds" / name


# ---------------------------------------------------------------------------------------------
# Atomic outputs: a crash never leaves a half-written artefact that a later build counts as done
# ---------------------------------------------------------------------------------------------


def remove_path(path: Path) -> None:
    """Delete a file or a directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file, with an error that names the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise AlignkitError(f"{path} does not exist") from None
    except json.JSONDecodeError as err:
        raise AlignkitError(f"{path} is not valid JSON: {err}") from None


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write one JSON object per line, atomically; return the number of rows."""
    count = 0
    with atomic_path(path) as tmp, tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def read_jsonl_field(path: str | Path, key: str) -> list[Any]:
    """The value of `key` in every line of a JSONL file, with errors naming file, row and field."""
    path = Path(path)
    if not path.is_file():
        raise AlignkitError(f"{path} does not exist")
    values = []
    with path.open() as f:
        for row_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                values.append(json.loads(line)[key])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise AlignkitError(f"{path}, row {row_number}: expected a JSON object with {key!r}") from None
    return values


# ---------------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """A built world: paths of its artefacts, its prompts, its gold scorer and its build summary."""

    name: str
    """Short name, e.g. `sentiment`."""
    root: Path
    """Cache directory holding every artefact of the world."""
    tokenizer_path: Path
    """Hugging Face tokenizer directory (with chat template)."""
    base_model_path: Path
    """Hugging Face causal LM directory (safetensors + tokenizer): the pretrained base model."""
    load_gold: Callable[[], GoldFn] = field(repr=False)
    """Builds the gold scorer (called once, on first use)."""
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def prompts(self, split: Literal["train", "heldout"] = "train") -> list[str]:
        """The prompt texts of `split`, from `prompts_<split>.jsonl`."""
        if split not in ("train", "heldout"):
            raise AlignkitError(f"world {self.name}: split must be 'train' or 'heldout', got {split!r}")
        return read_jsonl_field(self.root / f"prompts_{split}.jsonl", "prompt")

    def gold_scorer(self) -> GoldFn:
        """The gold scorer (loaded once and kept): texts -> floats in [0, 1]."""
        if "gold" not in self._cache:
            self._cache["gold"] = self.load_gold()
        return self._cache["gold"]

    def summary(self) -> dict[str, Any]:
        """The build summary (`summary.json`): sizes, gold accuracy, perplexity, build times."""
        return read_json(self.root / SUMMARY_FILE)
