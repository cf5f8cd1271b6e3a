"""Training checkpoints: everything that changes during training, written atomically, pickle-free.

A checkpoint `checkpoints/step-N/` holds
- `model.safetensors`: the trainable model's state (tied weights handled by `save_model`);
- `optimizer.safetensors` + `optimizer.json`: optimizer tensors and the rest of its state;
- `rng-<rank>.safetensors` + `trainer_state.json`: RNG states of torch, numpy and `random`, the
  step (which fixes the data position), the scheduler and any stage state (e.g. a KL controller);
- `config.yaml`: the resolved config; `COMPLETE`: written last.
It is written to `checkpoints/.tmp-step-N/`, fsynced and renamed into place after `COMPLETE` is
written (`alignkit.atomic.move_into_place`), so a crash mid-write never leaves a directory named
`step-N`, and a directory without `COMPLETE` is never loaded. Nothing is unpickled when loading.

Failures it survives:
- a full disk mid-write: the temporary directory is deleted and one line says what, where and how
  much space it needed (`alignkit.atomic.raise_if_disk_full`); older checkpoints are untouched;
- a newest checkpoint whose files are torn or truncated although `COMPLETE` is there (a disk that
  lied, a copy cut short): `load_newest` checks every file before loading anything and falls back
  to the previous complete checkpoint with a warning naming the bad one;
- a kill while pruning: a checkpoint is renamed out of the `step-*` namespace (one atomic rename)
  before it is deleted, so a half-deleted directory is never named `step-N`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from alignkit.atomic import is_disk_full, move_into_place, raise_if_disk_full
from alignkit.console import main_print
from alignkit.errors import AlignkitError

MARKER = "COMPLETE"


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for pid, slots in state["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().contiguous().cpu()
            else:
                meta["state"].setdefault(str(pid), {})[name] = value
    return tensors, meta


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, slots in meta["state"].items():
        state.setdefault(int(pid), {}).update(slots)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """RNG states as (tensors, JSON-able dict)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    meta = {
        "numpy": [np_state[0], np_state[1].tolist(), *map(float, np_state[2:])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), int(pos), int(has_gauss), cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    stage_state: dict | None,
    config_yaml: str,
    rank: int = 0,
    is_main: bool = True,
    barrier: Any = None,
) -> Path:
    """Write checkpoint `step-N` atomically; every rank calls it (rank-local RNG files).

    A full disk raises an `AlignkitError` naming the checkpoint, the space it needs and the space
    free, after deleting the temporary directory (the previous checkpoints are untouched).
    """
    final = ckpt_root / f"step-{step}"
    tmp = ckpt_root / f".tmp-step-{step}"
    try:
        if is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        if barrier:
            barrier()
        rng_tensors, rng_meta = rng_state()
        save_file(rng_tensors, tmp / f"rng-{rank}.safetensors")
        (tmp / f"rng-{rank}.json").write_text(json.dumps(rng_meta))
        if barrier:
            barrier()
        if is_main:
            _write_main_files(tmp, step, model, optimizer, scheduler, stage_state, config_yaml)
            move_into_place(tmp, final)  # fsyncs every file and the directories, then renames
    except Exception as err:
        if is_main and is_disk_full(err):  # free what it took; other errors leave it for a look (and clean_stale)
            shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(ckpt_root)
        raise_if_disk_full(
            err, f"checkpoint step-{step}", tmp, need_bytes=_state_bytes(model, optimizer),
            advice=(f"the previous checkpoint {previous[-1]} is intact: free space and rerun with --run.resume"
                    if previous else "no earlier checkpoint: free space and run again"))
        raise
    if barrier:
        barrier()
    return final


def _write_main_files(tmp: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      scheduler: Any, stage_state: dict | None, config_yaml: str) -> None:
    save_model(model, str(tmp / "model.safetensors"))
    opt_tensors, opt_meta = _optimizer_to_files(optimizer)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
    state = {"step": step, "scheduler": scheduler.state_dict(), "stage": stage_state or {}}
    (tmp / "trainer_state.json").write_text(json.dumps(state))
    (tmp / "config.yaml").write_text(config_yaml)
    (tmp / MARKER).write_text(str(step))


def _state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the model's and the optimizer's tensors: about the size of a checkpoint."""
    n = sum(t.numel() * t.element_size() for t in model.state_dict().values() if torch.is_tensor(t))
    for slots in optimizer.state.values():
        n += sum(v.numel() * v.element_size() for v in slots.values() if torch.is_tensor(v))
    return n


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (directories without the marker are ignored)."""
    if not ckpt_root.is_dir():
        return []
    done = [p for p in ckpt_root.glob("step-*") if (p / MARKER).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def prune_checkpoints(ckpt_root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and stale temp dirs.

    Each is first renamed to `.step-N.old-prune-<pid>` (one atomic rename, out of the `step-*` names
    that `list_checkpoints` reads), then deleted: a kill mid-delete leaves a hidden directory that the
    next prune or run start removes, never a half-deleted `step-N` with its marker.
    """
    done = list_checkpoints(ckpt_root)
    for old in done[: max(0, len(done) - keep_last)]:
        doomed = old.with_name(f".{old.name}.old-prune-{os.getpid()}")
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    clean_stale(ckpt_root)


def clean_stale(ckpt_root: Path) -> list[Path]:
    """Delete `.tmp-step-N` (a write that did not finish) and `.step-N.old-*` (a replaced or pruned one).

    Call it from the main process of the run holding the run dir's lock, between writes.
    """
    if not ckpt_root.is_dir():
        return []
    stale = sorted([*ckpt_root.glob(".tmp-step-*"), *ckpt_root.glob(".step-*.old-*")])
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def verify_checkpoint(path: Path, rank: int = 0) -> None:
    """Check that every file of checkpoint `path` is whole (parses; tensors fit the file) before loading it.

    Every process's RNG file is checked, not only `rank`'s: the processes of a multi-process run see the
    same files and so all accept, or all skip, the same checkpoint (a torn `rng-1` alone must not send
    process 1 back to an older checkpoint than process 0).

    Raises `AlignkitError` naming the bad file.
    """
    if not (path / MARKER).is_file():
        raise AlignkitError(f"checkpoint {path} is incomplete (no {MARKER} marker): it was interrupted")
    own = path / f"rng-{rank}.safetensors"
    own = own if own.is_file() else path / "rng-0.safetensors"
    rngs = sorted({own, *path.glob("rng-*.safetensors")})
    for file in (path / "model.safetensors", path / "optimizer.safetensors", *rngs):
        try:
            with safe_open(str(file), framework="pt") as fh:  # header parsed, tensor extents checked
                fh.keys()
        except Exception as err:  # safetensors raises its own error type for a torn header or file
            raise AlignkitError(f"checkpoint file {file} is unreadable or truncated ({err})") from None
    for file in (path / "optimizer.json", path / "trainer_state.json", *(r.with_suffix(".json") for r in rngs)):
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise AlignkitError(f"checkpoint file {file} is unreadable or truncated ({err})") from None


def load_newest(
    ckpt_root: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank: int = 0,
    model_name: str | None = None,
) -> tuple[Path, dict] | None:
    """Load the newest complete checkpoint whose files are whole; None if there is none.

    A checkpoint marked complete whose files are torn is skipped with a warning naming it, and the
    one before it tried. A checkpoint that does not fit the model is an error (not skipped), naming
    `model_name` (e.g. `model.name_or_path`) as the model.
    """
    found = list_checkpoints(ckpt_root)
    for i, path in enumerate(reversed(found)):
        try:
            verify_checkpoint(path, rank)
        except AlignkitError as err:
            then = "trying the one before it" if i < len(found) - 1 else "there is no earlier one to try"
            main_print(f"warning: skipping checkpoint {path}: {err}; {then}", file=sys.stderr)
            continue
        return path, load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, rank=rank,
                                     model_name=model_name)
    if found:
        raise AlignkitError(f"no readable checkpoint in {ckpt_root}: all {len(found)} are torn (see the warnings)")
    return None


def apply_lr_override(path: Path, lr: float, optimizer: torch.optim.Optimizer, scheduler: Any) -> float:
    """After loading checkpoint `path`: if its saved `optim.lr` differs from `lr` (an override the run
    dir allowed, `run.resume_override`), scale the restored schedule's base rates and the current rates
    by `lr / saved`, so the new learning rate applies. Returns the factor (1.0: unchanged)."""
    try:
        saved = (yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}).get("optim", {}).get("lr")
    except (OSError, yaml.YAMLError, AttributeError):
        return 1.0
    if not isinstance(saved, int | float) or not saved or saved == lr:
        return 1.0
    factor = lr / saved
    if hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [base * factor for base in scheduler.base_lrs]
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * factor
        if "initial_lr" in group:
            group["initial_lr"] = group["initial_lr"] * factor
    return factor


def _check_fits(path: Path, model: torch.nn.Module, model_name: str | None) -> None:
    """Refuse checkpoint `path` if its model tensors have other shapes than `model`'s, naming the first.

    Checked from the file's header before anything is copied, so a model of another shape (a resume
    with `run.resume_override model.name_or_path`) is one error, not torch's list of size mismatches.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if torch.is_tensor(v)}
    with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
        saved = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    differ = [k for k in expected if k in saved and saved[k] != expected[k]]  # in the model's order
    if differ:
        k = differ[0]
        raise AlignkitError(
            f"checkpoint {path} does not fit the model {_model_label(model, model_name)}: {len(differ)} tensor(s) "
            f"have other shapes, e.g. `{k}` is {list(saved[k])} in the checkpoint but {list(expected[k])} in the "
            f"model; resume with the model the run was trained with (its `model` in {path / 'config.yaml'})")


def _model_label(model: torch.nn.Module, model_name: str | None) -> str:
    name = model_name or getattr(model, "name_or_path", None)
    return f"{name} ({type(model).__name__})" if name else type(model).__name__


def load_checkpoint(
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank: int = 0,
    model_name: str | None = None,
) -> dict:
    """Restore model, optimizer, scheduler and RNG in place; return the trainer state dict.

    Raises:
        AlignkitError: The checkpoint is incomplete, or does not fit the model (other tensor shapes or
            names, naming the first and the model, `model_name` or the model's own `name_or_path`).
    """
    if not (path / MARKER).is_file():
        raise AlignkitError(f"checkpoint {path} is incomplete (no {MARKER} marker): it was interrupted")
    _check_fits(path, model, model_name)
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        parts = [f"{len(names)} tensor(s) {where}, e.g. `{sorted(names)[0]}`"
                 for names, where in ((missing, "of the model are not in the checkpoint"),
                                      (unexpected, "of the checkpoint are not in the model")) if names]
        raise AlignkitError(f"checkpoint {path} does not fit the model {_model_label(model, model_name)}: "
                            f"{'; '.join(parts)}; resume with the model the run was trained with")
    opt_meta = json.loads((path / "optimizer.json").read_text())
    try:
        optimizer.load_state_dict(_optimizer_from_files(load_file(path / "optimizer.safetensors"), opt_meta))
    except (ValueError, KeyError) as err:  # other parameter groups or sizes: another model or LoRA setting
        raise AlignkitError(f"checkpoint {path}: its optimizer state does not fit the optimizer of the model "
                            f"{_model_label(model, model_name)} ({err})") from None
    state = json.loads((path / "trainer_state.json").read_text())
    scheduler.load_state_dict(state["scheduler"])
    rng_file = path / f"rng-{rank}.safetensors"
    if not rng_file.is_file():
        rng_file = path / "rng-0.safetensors"
    set_rng_state(load_file(rng_file), json.loads(rng_file.with_suffix(".json").read_text()))
    return state
