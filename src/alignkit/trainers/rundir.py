"""The run directory of a stage: where it is, its saved config, its metrics and its summary.

Layout: `config.yaml`, `metrics.jsonl` (one JSON object per logged step), `summary.json`,
`checkpoints/step-N/`, `final/` (Hugging Face format), and the files of local experiment trackers
(`run.report_to`): TensorBoard events under `alignkit/`.

One run per directory: `prepare_run_dir` takes an OS lock (`fcntl.flock`) on `<out>/.lock`, which
holds the pid of the run. The lock goes with the open file, so it is released when the process
exits or dies, however it dies; a second run on the directory gets an `AlignkitError` naming the
holder's pid. Holding the lock, the run may then delete the temporary files a killed run left
(`.final.tmp-*`, `checkpoints/.tmp-step-*`, ...): no live run can be writing them.

Resume with a changed config: the saved `config.yaml` is compared with the new config; a change in a
field that shapes the result (batch sizes, learning rate, seed, model, data, ...) is refused, naming
the fields, unless it is listed in `run.resume_override`; an applied override is recorded in
`resume_history.jsonl`. Fields that may change freely on resume: `RESUME_FREE_FIELDS`. A resume writes
`config.yaml` and that record only once a checkpoint has loaded (`record_resume`): a resume that fails
(every checkpoint torn, a model that does not fit) leaves the run's files as they were.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import accelerate
import yaml
from accelerate import tracking

from alignkit.atomic import atomic_write_json, atomic_write_text, raise_if_disk_full
from alignkit.config import to_dict
from alignkit.console import main_print
from alignkit.errors import AlignkitError
from alignkit.trainers.checkpoint import clean_stale, list_checkpoints

PROJECT = "alignkit"
"""The tracker project (wandb / comet / trackio project, MLflow experiment, TensorBoard sub-directory)."""

_noted: set[str] = set()  # trackers already reported missing in this process


def resolve_output_dir(stage: str, output_dir: str | None) -> Path:
    """`output_dir`, or `runs/<stage>-<timestamp>` when it is not set."""
    if output_dir:
        return Path(output_dir)
    return Path("runs") / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON (indented; tensors' and numpy scalars' values, paths as strings) atomically and durably."""
    try:
        atomic_write_json(path, data)
    except OSError as err:
        raise_if_disk_full(err, path.name, path)
        raise


def config_yaml(cfg: Any) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


LOCK_NAME = ".lock"
_held: dict[str, int] = {}  # resolved run dir -> fd of its lock file, for the runs of this process


def _lock_holder(path: Path) -> str:
    try:
        pid = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "another process (pid not yet written)"


def acquire_run_lock(out_dir: Path) -> None:
    """Hold the OS lock of `out_dir` for this process (re-entrant within it); raise if another run holds it."""
    import fcntl  # POSIX; imported here so that the module still imports where it is missing

    key = str(Path(out_dir).resolve())
    path = Path(out_dir) / LOCK_NAME
    if key in _held:
        try:
            if os.stat(path).st_ino == os.fstat(_held[key]).st_ino:
                return
        except FileNotFoundError:  # the directory was deleted and made again (a pipeline's stale stage)
            pass
        os.close(_held.pop(key))
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlignkitError(
                f"output dir {out_dir} is in use by another run ({_lock_holder(path)}, lock {path}): wait for it "
                "to end or stop it, or choose another --output-dir") from None
        try:  # a releasing run unlinks the file: make sure the locked file is still the one at `path`
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[key] = fd


def release_run_lock(out_dir: Path) -> None:
    """Release this process's lock of `out_dir` (a no-op if it holds none). Exiting releases it too."""
    fd = _held.pop(str(Path(out_dir).resolve()), None)
    if fd is None:
        return
    try:
        (Path(out_dir) / LOCK_NAME).unlink(missing_ok=True)  # unlinked while still locked: see acquire_run_lock
    finally:
        os.close(fd)


_TEMP_NAME = re.compile(r"^\.(.+)\.(tmp|old)-\d+-[0-9a-f]{8}$")  # `alignkit.atomic._sibling`'s names


def clean_stale_temporaries(out_dir: Path) -> list[Path]:
    """Delete what killed writers left in `out_dir` (call with the run lock held); return what was removed.

    `.NAME.tmp-*` (an unfinished atomic write, e.g. `.final.tmp-*`) and `checkpoints/.tmp-step-*` are
    deleted; `.NAME.old-*` (a replaced version moved aside) is deleted, or moved back to `NAME` when a
    kill came between moving the old one aside and renaming the new one in.
    """
    removed = []
    for stale in sorted(out_dir.iterdir()) if out_dir.is_dir() else []:
        match = _TEMP_NAME.match(stale.name)  # only the names `alignkit.atomic` makes
        if not match:
            continue
        name, kind = match.groups()
        if kind == "old" and not (out_dir / name).exists():
            os.replace(stale, out_dir / name)
            continue
        _remove_tree(stale)
        removed.append(stale)
    removed += clean_stale(out_dir / "checkpoints")
    return removed


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


RESUME_FREE_FIELDS = frozenset({
    "run.resume", "run.resume_override", "run.output_dir", "run.progress", "run.report_to", "run.save_every",
    "run.keep_last", "run.log_every", "run.eval_every", "run.accel",
})
"""Fields that may differ on `--run.resume` without an override: where and how the run reports and
checkpoints, and the acceleration backend (same results to float rounding). Everything else (batch
sizes, learning rate and schedule, steps, seed, model, data, the stage's own fields) shapes the result."""


def _flat_plain(tree: Any, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in (tree or {}).items():
        if isinstance(value, dict):
            flat.update(_flat_plain(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resume_config_changes(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """`{field: (saved, new)}` for the fields that differ (fields only one side has are left out)."""
    a, b = _flat_plain(old), _flat_plain(new)
    return {k: (a[k], b[k]) for k in b if k in a and a[k] != b[k] and k not in RESUME_FREE_FIELDS}


def check_resume_config(out_dir: Path, cfg: Any) -> dict[str, tuple[Any, Any]]:
    """Refuse to resume `out_dir` with a changed config unless the changed fields are in `run.resume_override`.

    Returns the overridden changes (for `record_resume`, once a checkpoint has loaded); `{}` when nothing
    changed. Writes nothing.
    """
    saved_path = out_dir / "config.yaml"
    if not saved_path.is_file():
        return {}
    try:
        saved = yaml.safe_load(saved_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise AlignkitError(f"{saved_path}: the saved config of the run to resume is unreadable ({err})") from None
    if not isinstance(saved, dict):
        return {}
    changes = resume_config_changes(saved, to_dict(cfg))
    allowed = set(getattr(cfg.run, "resume_override", None) or [])
    refused = {k: v for k, v in changes.items() if k not in allowed}
    if refused:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise AlignkitError(
            f"--run.resume of {out_dir} with a changed config ({listed}; saved in {saved_path}): resume with the "
            f"saved values, or apply the change on purpose with --run.resume_override {','.join(refused)}")
    return changes


def record_resume(out_dir: Path, cfg: Any, changes: dict[str, tuple[Any, Any]]) -> None:
    """After a resume has loaded its checkpoint: record the overridden `changes` (`check_resume_config`) in
    `resume_history.jsonl`, say so, and save the new config as `config.yaml`."""
    if changes:
        row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "overridden": {k: {"saved": old, "new": new} for k, (old, new) in changes.items()}}
        with open(out_dir / "resume_history.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, default=str) + "\n")
        main_print(f"warning: resuming {out_dir} with overridden fields "
                   f"{', '.join(f'{k} ({old!r} -> {new!r})' for k, (old, new) in changes.items())}; recorded in "
                   f"{out_dir / 'resume_history.jsonl'}", file=sys.stderr)
    _write_config(out_dir, cfg)


def _write_config(out_dir: Path, cfg: Any) -> None:
    try:
        atomic_write_text(out_dir / "config.yaml", config_yaml(cfg))
    except OSError as err:
        raise_if_disk_full(err, "the run config", out_dir / "config.yaml")
        raise


def prepare_run_dir(out_dir: Path, cfg: Any, *, resume: bool, check_config: bool = False) -> dict[str, tuple[Any, Any]]:
    """Lock the run dir, clean what killed runs left, save the config; refuse to overwrite a run's checkpoints.

    With `check_config` (a training stage's `--run.resume`), a run dir holding checkpoints is resumed
    only with an unchanged config or the changes named in `run.resume_override` (`check_resume_config`);
    returns the overridden changes. Such a resume does not save the config here: the caller calls
    `record_resume` once a checkpoint has loaded, so a failed resume leaves `config.yaml` as it was.
    """
    ckpts = out_dir / "checkpoints"
    out_dir.mkdir(parents=True, exist_ok=True)
    acquire_run_lock(out_dir)  # first: a live run's directory is refused as such
    try:
        if not resume and ckpts.is_dir() and any(ckpts.glob("step-*")):
            raise AlignkitError(
                f"output dir {out_dir} already holds checkpoints: pass --resume to continue that run, "
                "or choose another --output-dir"
            )
        changes: dict[str, tuple[Any, Any]] = {}
        deferred = resume and check_config and ckpts.is_dir() and any(ckpts.glob("step-*"))
        if deferred:
            changes = check_resume_config(out_dir, cfg)
    except AlignkitError:
        release_run_lock(out_dir)
        raise
    clean_stale_temporaries(out_dir)
    if not deferred:
        _write_config(out_dir, cfg)
    return changes


def final_fallback_dir(out_dir: Path) -> Path:
    """Where `save_final` puts `final/` when the run dir's disk is full: under `$TMPDIR` (or the system's)."""
    return Path(tempfile.gettempdir()) / f"alignkit-final-{Path(out_dir).resolve().name}-{os.getpid()}"


def save_final(save: Any, out_dir: Path, *, need_bytes: int | None = None) -> Path:
    """Call `save(dir)` to write `<out_dir>/final`; on a full disk, write to `final_fallback_dir` instead.

    The trained weights are never lost to a full disk while another filesystem has room: the error
    (one line) names both places and the command that moves them in. Returns `<out_dir>/final`.
    """
    final = out_dir / "final"
    try:
        save(final)
        return final
    except Exception as err:
        try:
            raise_if_disk_full(err, "the final model", final, need_bytes=need_bytes)
        except AlignkitError as full:
            first = str(full)
        else:
            raise
    fallback = final_fallback_dir(out_dir)
    try:
        save(fallback)
    except Exception as err:  # the fallback is full too (or unwritable): say so; the checkpoints are what is left
        raise AlignkitError(f"{first}; writing it to the fallback {fallback} failed too ({err}): the trained "
                            "weights are lost unless a checkpoint holds them (--run.save_every)") from None
    raise AlignkitError(f"{first}; the trained model was saved instead to {fallback}: free space, then "
                        f"`mv {fallback} {final}`")


def _clean(value: Any) -> Any:
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as `{"optim.lr": 1e-4, ...}` with values trackers accept (lists, None as text)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, bool | int | float | str) else str(value)
    return flat


class MetricsLogger:
    """Appends metrics to `metrics.jsonl` and hands them to accelerate's experiment trackers (main process only).

    `metrics.jsonl` is alignkit's own record (resume truncates it to the checkpoint's step, the report
    reads it). The trackers of `run.report_to` are those of `Accelerator(log_with=...)`, chosen with
    `MetricsLogger.trackers`; this starts them (`init_trackers`, with the flattened config), logs the
    numeric metrics of each row to them (`Accelerator.log`) and finishes them on `close`.
    """

    def __init__(self, out_dir: Path, *, enabled: bool, accelerator: Any = None, report_to: Sequence[str] = (),
                 config: Any = None, resume_step: int = 0):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self._acc = accelerator
        chosen = self.trackers(report_to)  # raises on every process, not only the main one
        missing = [name for name in dict.fromkeys(report_to) if name not in chosen]
        if not enabled:
            return
        for name in missing:
            if name not in _noted:
                _noted.add(name)
                print(f"note: `run.report_to` names {name}, but the `{name}` package is not installed: not "
                      f"logging to it (`pip install {name}`, or leave it out of `run.report_to`)", file=sys.stderr)
        self._truncate_after(resume_step)
        if accelerator is not None and accelerator.log_with:
            accelerator.init_trackers(
                PROJECT, config=_flat(to_dict(config)) if config is not None else None,
                init_kwargs={"wandb": {"name": out_dir.name, "dir": str(out_dir)}},
            )

    @staticmethod
    def trackers(report_to: Sequence[str]) -> list[str]:
        """The trackers of `report_to` to pass as `Accelerator(log_with=...)`: those whose package is installed.

        A missing `tensorboard` (the default) is left out (`MetricsLogger` says so once); any other
        missing tracker, or one this accelerate version does not know, is an error naming the option.
        """
        if not report_to:
            return []

        available = {str(getattr(t, "value", t)) for t in tracking.get_available_trackers()}
        chosen = []
        for name in dict.fromkeys(report_to):
            if name not in tracking.LOGGER_TYPE_TO_CLASS:

                raise AlignkitError(f"option `run.report_to`: accelerate {accelerate.__version__} has no tracker "
                                    f"{name!r} (it has {', '.join(sorted(tracking.LOGGER_TYPE_TO_CLASS))}); upgrade accelerate")
            if name in available:
                chosen.append(name)
            elif name != "tensorboard":
                raise AlignkitError(f"option `run.report_to` names {name}, which needs the `{name}` package: "
                                    f"pip install {name}")
        return chosen

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so the file reads as one run.

        Resuming from step 0 (no checkpoint yet) starts the file again: the run logs step 0 anew. A line
        that is not JSON (torn by a kill or a full disk mid-write) is dropped with a warning.
        """
        if not self.path.exists():
            return
        keep, torn = [], 0
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                torn += 1
                continue
            if step > 0 and isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                keep.append(line)
        if torn:
            kept = ("the checkpoint's steps are kept" if step > 0 else
                    "no checkpoint to resume from, so the file starts again")
            print(f"warning: {self.path}: dropped {torn} unreadable line(s) (a write cut short); {kept}",
                  file=sys.stderr)
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        try:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
        except OSError as err:  # a torn last line is dropped on resume (`_truncate_after`)
            raise_if_disk_full(err, f"the metrics of step {step}", self.path, advice=self._resume_advice())
            raise
        if self._acc is not None and self._acc.trackers:
            numbers = {k: v for k, v in row.items() if k != "step" and isinstance(v, int | float)}
            self._acc.log(numbers, step=step)

    def _resume_advice(self) -> str:
        """What a run stopped by a full disk can do next: resume from its newest checkpoint, if it has one."""
        done = list_checkpoints(self.path.parent / "checkpoints")
        if done:
            return f"the newest checkpoint {done[-1]} is intact: free space and rerun with --run.resume"
        return ("no checkpoint has been written yet (see --run.save_every), so the run cannot be resumed: free "
                "space and run it again")

    def close(self) -> None:
        """Finish the trackers (not `Accelerator.end_training`, which also ends the process group that a
        pipeline's next stage in this process still uses). Safe to call twice."""
        if self._acc is not None:
            for tracker in self._acc.trackers:
                tracker.finish()
            self._acc.trackers.clear()
