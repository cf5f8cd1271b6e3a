"""Atomic, durable outputs: a file or directory is written beside its final path, then renamed in.

Every artefact alignkit writes for later use (run summaries, checkpoints, `final/` models, world
files) goes through this module, so a crash, a kill or a full disk leaves either the old version
or the new one, never a half-written one under the final name:

- `atomic_path(final)` yields a fresh temporary sibling path (nothing there yet) to write a file or a
  directory to; on success its contents are fsynced and it is renamed to `final`;
- `atomic_dir(final)` is the same with the temporary directory already created;
- `atomic_write_bytes`, `atomic_write_text`, `atomic_write_json` write one file that way;
- `move_into_place(tmp, final)` is the commit step on its own, for a temporary directory that
  several processes fill (training checkpoints);
- `fsync_file`, `fsync_dir` are the durability primitives;
- `raise_if_disk_full(err, what, where)` turns a full disk (ENOSPC, EDQUOT) into one line for the
  user: what was being written, where, the space free there and, when known, the space needed.

An existing `final` is replaced: a directory is moved aside, the new one renamed in, and the old
one deleted; if the rename fails the old directory is moved back.

Durability policy (one for all callers): every file written is fsynced before the rename and the
parent directory after it. A directory fsync that the filesystem does not support (EINVAL, ENOTSUP,
as on some network and FUSE filesystems; Windows cannot open directories at all) is skipped; any
other error (EIO, ENOSPC, ...) is raised, because then the data may not be on disk.

Standard library only, so every layer of alignkit can import it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from alignkit.errors import AlignkitError  # a plain exception class: no dependencies

# errno values meaning "this filesystem cannot fsync a directory", not "the data is not on disk".
_FSYNC_UNSUPPORTED = frozenset(
    getattr(errno, name) for name in ("EINVAL", "ENOTSUP", "EOPNOTSUPP", "ENOSYS") if hasattr(errno, name)
)


DISK_FULL = frozenset(getattr(errno, name) for name in ("ENOSPC", "EDQUOT") if hasattr(errno, name))


def _size(n: int, decimals: int = 1) -> str:
    """`n` bytes in KiB below 1 MiB, in MiB below 1 GiB, else in GiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.{decimals}f} {unit}"
    return f"{n / 2**10:.{decimals}f} KiB"


def _sizes(*counts: int) -> list[str]:
    """`_size` of each count, with as many decimals (up to 3) as it takes for different counts to read
    differently: "it needs about 1.04 MiB, 1.01 MiB free there", not "1.0 MiB, 1.0 MiB"."""
    for decimals in (1, 2, 3):
        out = [_size(n, decimals) for n in counts]
        if len(set(out)) == len(set(counts)):
            break
    return out


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free space on the filesystem of `path` (or of its nearest existing parent); None if unknown."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def is_disk_full(err: BaseException) -> bool:
    """Whether `err` (or an error it was raised from) is a full disk or an exhausted quota."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in DISK_FULL:
            return True
        if "No space left on device" in str(err) or "Disk quota exceeded" in str(err):
            return True  # e.g. safetensors' Rust error, which carries no errno
        err = err.__cause__ or err.__context__
    return False


def raise_if_disk_full(err: BaseException, what: str, where: str | os.PathLike, *, need_bytes: int | None = None,
                       advice: str = "") -> None:
    """Raise an `AlignkitError` (from `err`) in one line if `err` is a full disk; otherwise return."""
    if not is_disk_full(err):
        return
    free = free_bytes(where)
    need_text, free_text = _sizes(need_bytes or 0, free or 0)  # read side by side: need > free shows
    parts = [f"disk full while writing {what} to {where}"]
    if need_bytes is not None:
        parts.append(f"it needs about {need_text}")
    if free is not None:
        parts.append(f"{free_text} free there")
    message = ": ".join(parts[:2]) + ("".join(f", {p}" for p in parts[2:]) if len(parts) > 2 else "")
    raise AlignkitError(message + (f"; {advice}" if advice else "")) from err


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's contents to disk."""
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)  # Windows fsyncs writable handles only
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries of directory `path` (creations, renames) durable.

    Skipped where the platform or filesystem cannot fsync a directory (see the module docstring);
    any other `OSError` is raised.
    """
    if os.name == "nt":  # a directory cannot be opened as a file there; NTFS journals renames itself
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in _FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync a file, or every file and directory under a directory (deepest first)."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        if not path.is_symlink():
            fsync_file(path)
        return
    for root, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            file = os.path.join(root, name)
            if not os.path.islink(file):
                fsync_file(file)
        fsync_dir(root)


def _remove(path: Path) -> None:
    """Delete a file or a directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _sibling(final: Path, kind: str) -> Path:
    """A hidden, unique path next to `final`, e.g. `.final.tmp-1234-9f3a0c1e`."""
    return final.with_name(f".{final.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def move_into_place(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Commit a written temporary file or directory: fsync its contents, rename it to `final`.

    `tmp` must be on the same filesystem as `final` (a sibling). An existing directory `final` is
    moved aside first and deleted after the rename; if the rename fails it is moved back and the
    error raised (`tmp` is then left for the caller to delete).
    """
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    if final.is_dir() and not final.is_symlink():  # os.replace cannot replace a non-empty directory
        old = _sibling(final, "old")
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(old, final)
            raise
        fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
        fsync_dir(final.parent)
    return final


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path to write a file or a directory to; rename it to `final` on success.

    Nothing exists at the yielded path yet: create a file or a directory there. On success it is
    fsynced and renamed to `final` (see `move_into_place`); on an exception, or if nothing was
    written, the temporary path is deleted and `final` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(final, "tmp")
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"nothing was written to the temporary path of {final}")
        move_into_place(tmp, final)
    finally:
        _remove(tmp)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty temporary directory beside `final`; it replaces `final` on success."""
    with atomic_path(final) as tmp:
        tmp.mkdir()
        yield tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically and durably."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically and durably."""
    return atomic_write_bytes(path, text.encode(encoding))


def json_default(value: Any) -> Any:
    """JSON for the values alignkit's records hold besides plain ones: 0-d tensors / numpy scalars, paths."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def atomic_write_json(
    path: str | os.PathLike, data: Any, *, indent: int | None = 2, default: Callable[[Any], Any] = json_default
) -> Path:
    """Write `data` as JSON (indented, newline-terminated) to `path` atomically and durably."""
    return atomic_write_text(path, json.dumps(data, indent=indent, default=default) + "\n")
