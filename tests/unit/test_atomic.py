"""`alignkit.atomic`: files and directories renamed into place only once written and fsynced."""

from __future__ import annotations

import errno
import json
import os

import pytest

import alignkit.atomic as atomic
from alignkit.atomic import (
    atomic_dir,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    fsync_dir,
    move_into_place,
)


def names(path):
    return sorted(p.name for p in path.iterdir())


def test_files_are_written_replaced_and_leave_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "summary.json"
    atomic_write_json(target, {"a": 1, "path": tmp_path / "x"})
    assert json.loads(target.read_text()) == {"a": 1, "path": str(tmp_path / "x")}
    assert target.read_text().endswith("\n")
    atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n" and names(target.parent) == ["summary.json"]


def test_values_with_item_are_written_as_numbers(tmp_path):
    class Scalar:  # a 0-d tensor or numpy scalar
        def item(self):
            return 0.5

    atomic_write_json(tmp_path / "m.json", {"loss": Scalar()})
    assert json.loads((tmp_path / "m.json").read_text()) == {"loss": 0.5}
    with pytest.raises(TypeError, match="not JSON-serialisable: object"):
        atomic_write_json(tmp_path / "bad.json", {"x": object()})
    assert names(tmp_path) == ["m.json"]


def test_a_failed_write_keeps_the_old_file_or_directory(tmp_path):
    atomic_write_text(tmp_path / "done.txt", "old")
    with pytest.raises(RuntimeError, match="crash"), atomic_path(tmp_path / "done.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert (tmp_path / "done.txt").read_text() == "old"

    with atomic_dir(tmp_path / "final") as tmp:
        (tmp / "a.bin").write_bytes(b"old")
    with pytest.raises(RuntimeError, match="crash"), atomic_dir(tmp_path / "final") as tmp:
        (tmp / "a.bin").write_bytes(b"half")
        raise RuntimeError("crash")
    assert (tmp_path / "final" / "a.bin").read_bytes() == b"old"
    assert names(tmp_path) == ["done.txt", "final"]

    with pytest.raises(RuntimeError, match="nothing was written"), atomic_path(tmp_path / "empty"):
        pass
    assert names(tmp_path) == ["done.txt", "final"]


def test_a_directory_is_replaced_whole(tmp_path):
    out = tmp_path / "final"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with atomic_dir(out) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "model.bin").write_bytes(b"new")
    assert names(out) == ["sub"] and (out / "sub" / "model.bin").read_bytes() == b"new"
    assert names(tmp_path) == ["final"]  # the old directory moved aside was deleted


def test_a_failed_rename_moves_the_old_directory_back(tmp_path, monkeypatch):
    out = tmp_path / "step-3"
    out.mkdir()
    (out / "COMPLETE").write_text("3")
    tmp = tmp_path / ".tmp-step-3"
    tmp.mkdir()
    (tmp / "COMPLETE").write_text("new")
    real_replace = os.replace

    def replace(src, dst):
        if str(src) == str(tmp):
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        move_into_place(tmp, out)
    assert (out / "COMPLETE").read_text() == "3"
    assert names(tmp_path) == [".tmp-step-3", "step-3"]  # the caller owns (and later prunes) its temp dir


def test_everything_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    paths: dict[int, str] = {}
    real_open, real_fsync, real_replace = os.open, os.fsync, os.replace

    def open_(path, flags, *args):
        fd = real_open(path, flags, *args)
        paths[fd] = os.path.relpath(path, tmp_path)
        return fd

    def fsync(fd):
        events.append(("fsync", paths[fd]))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", os.path.relpath(dst, tmp_path)))
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "open", open_)
    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    with atomic_dir(tmp_path / "final") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"1")
        (tmp / "COMPLETE").write_text("1")
        name = tmp.name
    rename = events.index(("rename", "final"))
    assert sorted(events[:rename]) == sorted(("fsync", os.path.join(name, *p)) for p in
                                             [("sub", "w.bin"), ("sub",), ("COMPLETE",), ()])
    assert events[rename + 1:] == [("fsync", ".")]  # then the parent directory, for the rename


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOTSUP])
def test_fsync_dir_skips_filesystems_without_directory_fsync(tmp_path, monkeypatch, code):
    def unsupported(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(atomic.os, "fsync", unsupported)
    fsync_dir(tmp_path)  # no error


def test_fsync_dir_raises_real_errors(tmp_path, monkeypatch):
    def failing(fd):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(atomic.os, "fsync", failing)
    with pytest.raises(OSError, match="I/O error"):
        fsync_dir(tmp_path)
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError):  # a directory that is not there is a bug, not a filesystem limit
        fsync_dir(tmp_path / "missing")


@pytest.mark.parametrize(("need", "free", "expected"), [
    (110_000, 100_000, "it needs about 107.4 KiB, 97.7 KiB free there"),  # was "0.1 MiB, 0.1 MiB"
    (1_090_000, 1_060_000, "it needs about 1.04 MiB, 1.01 MiB free there"),  # one decimal would read the same
    (3 * 2**30, 5 * 2**20, "it needs about 3.0 GiB, 5.0 MiB free there"),
    (200, 0, "it needs about 0.2 KiB, 0.0 KiB free there"),
])
def test_a_full_disk_message_shows_that_the_need_exceeds_the_free_space(tmp_path, monkeypatch, need, free, expected):
    monkeypatch.setattr(atomic, "free_bytes", lambda _path: free)
    with pytest.raises(atomic.AlignkitError) as err:
        atomic.raise_if_disk_full(OSError(errno.ENOSPC, "No space left on device"), "the final model",
                                  tmp_path / "final", need_bytes=need)
    assert str(err.value) == f"disk full while writing the final model to {tmp_path / 'final'}: {expected}"
