"""Checks of a local model directory's files before transformers reads them: weights only from safetensors.

`check_weight_files` refuses a directory whose only weights are pickle files (by name; a pickle is
never opened), `check_safetensors_files` reads each safetensors header that loading would read, and
`read_json_object` reads a config file. Each problem is one `AlignkitError` naming the file.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from alignkit.errors import AlignkitError

UNSAFE_OPTION = "--model.allow_unsafe_pickle"
"""The option that allows pickle weight files (still through torch's weights-only loader)."""

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
"""Weight-file suffixes whose loading unpickles (and so can run code)."""

def check_weight_files(path: str | Path, allow_unsafe_pickle: bool) -> None:
    """Refuse a local model directory whose only weights are pickle files.

    Looks at file names (and the `transformers_weights` entry of `config.json`) only; never opens a
    pickle file.

    Args:
        path: Local model directory.
        allow_unsafe_pickle: The value of `--model.allow_unsafe_pickle`; True skips the check.

    Raises:
        AlignkitError: If the directory holds no `*.safetensors` file but pickle weights, naming the
            file and the option that allows it.
    """
    if allow_unsafe_pickle:
        return
    path = Path(path)
    explicit = _explicit_weights_file(path)
    if explicit is not None and not explicit.endswith((".safetensors", ".safetensors.index.json")):
        raise AlignkitError(
            f"{path / 'config.json'} names the weight file {explicit!r}, which is not safetensors; "
            f"loading it could run code. Set {UNSAFE_OPTION} true only if you trust it"
        )
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise AlignkitError(
            f"model directory {path} has no *.safetensors weights, only pickle file {pickles[0].name} "
            f"(unpickling can run arbitrary code). Convert it to safetensors, or set {UNSAFE_OPTION} "
            "true if you trust its source"
        )


def _explicit_weights_file(path: Path) -> str | None:
    config_file = path / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None  # transformers reports a broken config.json with its own message
    value = config.get("transformers_weights") if isinstance(config, dict) else None
    return value if isinstance(value, str) else None


def read_json_object(path: str | Path) -> dict[str, Any]:
    """Read a JSON object from a file, with one-line errors that name the file.

    Raises:
        AlignkitError: If the file cannot be read, is not UTF-8 text, is not JSON or is not an object.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
        data = json.loads(text)
    except OSError as err:
        raise AlignkitError(f"cannot read {path}: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise AlignkitError(
            f"{path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); expected JSON"
        ) from err
    except json.JSONDecodeError as err:
        raise AlignkitError(f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}") from err
    if not isinstance(data, dict):
        raise AlignkitError(f"{path} must hold a JSON object, not a {type(data).__name__}")
    return data


def check_safetensors_files(path: str | Path) -> None:
    """Check the header of each safetensors file that loading a local model directory would read.

    That is `model.safetensors`, or else the shards named by `model.safetensors.index.json` (which
    must name existing files). Only headers are read (the tensors are memory-mapped, not loaded).

    Raises:
        AlignkitError: Naming the file that is corrupt, truncated, has an oversized header or is missing.
    """
    path = Path(path)
    if (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif (path / "model.safetensors.index.json").is_file():
        index = path / "model.safetensors.index.json"
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise AlignkitError(f"{index}: expected a non-empty `weight_map` object (tensor name -> shard file)")
        files = [path / str(name) for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise AlignkitError(f"{index} names the shard {file.name}, which is not in {path}")
    else:
        return
    for file in files:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except SafetensorError as err:
            raise AlignkitError(
                f"{file} is not a readable safetensors file ({err}): it is truncated, corrupt or not safetensors"
            ) from err
        except OSError as err:
            raise AlignkitError(f"cannot read {file}: {err.strerror or err}") from err


def refused_pickle_message(source: str, local: Path | None, err: Exception) -> str:
    """The one-line error for a pickle weight file that torch's weights-only loader refused."""
    message = str(err)
    reason = message.split("WeightsUnpickler error:", 1)[-1].strip() if "WeightsUnpickler error:" in message else ""
    reason = reason.splitlines()[0].split(". ", 1)[0].strip() if reason else "it holds more than tensors"
    file = _first_refused_pickle(local) if local is not None else None
    where = str(file) if file is not None else f"a pickle weight file of {source}"
    return (
        f"{where}: torch's weights-only loader refused it ({reason}); alignkit never unpickles arbitrary "
        f"objects, even with {UNSAFE_OPTION} true. If you trust the file, convert it to safetensors yourself"
    )


def _first_refused_pickle(path: Path) -> Path | None:
    """The first pickle weight file in `path` that torch's weights-only loader refuses (loaded on `meta`).

    `pytorch_model*.bin` (what transformers reads) are tried first, then the other pickle files.
    """
    files = [p for p in path.iterdir() if p.is_file() and p.name.endswith(PICKLE_SUFFIXES)]
    for file in sorted(files, key=lambda p: (not p.name.startswith("pytorch_model"), p.name)):
        try:
            torch.load(file, map_location="meta", weights_only=True)
        except pickle.UnpicklingError:
            return file
        except Exception:  # another problem with this file: the refused one is what is looked for
            continue
    return None
