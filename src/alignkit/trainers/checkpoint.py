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
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from alignkit.atomic import move_into_place
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
    """Write checkpoint `step-N` atomically; every rank calls it (rank-local RNG files)."""
    final = ckpt_root / f"step-{step}"
    tmp = ckpt_root / f".tmp-step-{step}"
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
        save_model(model, str(tmp / "model.safetensors"))
        opt_tensors, opt_meta = _optimizer_to_files(optimizer)
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
        state = {"step": step, "scheduler": scheduler.state_dict(), "stage": stage_state or {}}
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        (tmp / "config.yaml").write_text(config_yaml)
        (tmp / MARKER).write_text(str(step))
        move_into_place(tmp, final)  # fsyncs every file and the directories, then renames
    if barrier:
        barrier()
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (directories without the marker are ignored)."""
    if not ckpt_root.is_dir():
        return []
    done = [p for p in ckpt_root.glob("step-*") if (p / MARKER).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def prune_checkpoints(ckpt_root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and stale temp dirs."""
    done = list_checkpoints(ckpt_root)
    for old in done[: max(0, len(done) - keep_last)]:
        shutil.rmtree(old, ignore_errors=True)
    # `.tmp-step-N`: a write that did not finish; `.step-N.old-*`: a replaced one a crash left behind.
    for stale in [*ckpt_root.glob(".tmp-step-*"), *ckpt_root.glob(".step-*.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank: int = 0,
) -> dict:
    """Restore model, optimizer, scheduler and RNG in place; return the trainer state dict."""
    if not (path / MARKER).is_file():
        raise AlignkitError(f"checkpoint {path} is incomplete (no {MARKER} marker): it was interrupted")
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=True)
    if missing or unexpected:
        raise AlignkitError(f"checkpoint {path} does not match the model: missing {missing}, unexpected {unexpected}")
    opt_meta = json.loads((path / "optimizer.json").read_text())
    optimizer.load_state_dict(_optimizer_from_files(load_file(path / "optimizer.safetensors"), opt_meta))
    state = json.loads((path / "trainer_state.json").read_text())
    scheduler.load_state_dict(state["scheduler"])
    rng_file = path / f"rng-{rank}.safetensors"
    if not rng_file.is_file():
        rng_file = path / "rng-0.safetensors"
    set_rng_state(load_file(rng_file), json.loads(rng_file.with_suffix(".json").read_text()))
    return state
