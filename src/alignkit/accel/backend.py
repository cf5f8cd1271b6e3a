"""The acceleration seam: one interface through which trainers and rollout run models fast.

Everything that decides *how fast* a model samples, scores or computes log-probs sits behind
`Backend`; the rest of alignkit states *what* to compute (which tokens, which groups) and gets the
same numbers to float rounding from every backend:

    decoder(model, prompt_ids, prompt_mask, key_mask, width) -> (prefill, step)   sampling
    rollout_logits(model, rollout)         -> logits, rows, columns   policy / reference log-probs
    group_logits(model, batch)             -> logits, labels          DPO-family sequence log-probs
    group_scores(model, ids, mask, groups) -> N scores                reward-model scores of groups
    freeze(model)                          -> model                   a model used for inference only
    prepare_process()                                                 process-wide settings

`plain` (`alignkit.accel.plain`) is the Hugging Face forward with a KV cache: any architecture, any
device and dtype. `cpu` (`alignkit.accel.cpu`) adds alignkit's CPU machinery and falls back to
`plain` for whatever it does not cover. `resolve(choice)` picks one: the `run.accel` option of
every stage (`auto`: `cpu` on a CPU, `plain` on an accelerator; `ALIGNKIT_ACCEL` overrides it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Protocol

import torch

from alignkit.accel.cpu import CpuBackend
from alignkit.accel.plain import PlainBackend
from alignkit.errors import AlignkitError

ACCEL_CHOICES = ("auto", "cpu", "plain")

Prefill = Callable[[torch.Tensor], torch.Tensor]  # positions B×P -> next-token logits B×V
Step = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # (tokens B, positions B, column) -> B×V


class Backend(Protocol):
    """What trainers and rollout ask of an acceleration backend (see the module docstring)."""

    name: str

    def describe(self) -> str:
        """One line for the run plan: the backend and what it turned on."""
        ...

    def prepare_process(self) -> None:
        """Process-wide settings a training run wants (called once per run; idempotent)."""
        ...

    def freeze(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` in eval mode without gradients, prepared for many inference passes."""
        ...

    def decoder(self, model: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, key_mask: torch.Tensor,
                width: int) -> tuple[Prefill, Step]:
        """(prefill, step) closures that decode `model` with a KV cache of `width` columns.

        `key_mask` B×W (bool) is the sampler's own record of live columns; a step may read it.
        """
        ...

    def rollout_logits(self, model: Any, rollout: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits N×C×V, rows B×R, columns B×R): response token (b, j) of `rollout` is predicted by
        logits[rows[b, j], columns[b, j]] (one forward pass, with gradients when enabled)."""
        ...

    def group_logits(self, model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits N×C×V, labels N×C) of a preference batch's rows: column c of row n predicts labels[n, c]
        (IGNORE_INDEX where not trained)."""
        ...

    def group_scores(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     group_index: torch.Tensor | None) -> torch.Tensor:
        """Head outputs N of a reward model at each row's last token (rows right-padded).

        `group_index` G×K (-1: empty slot) says which rows share a prompt; None: no groups.
        """
        ...


def default_device_type() -> str:
    """The device type a stage trains on: `cuda` when one is visible (as accelerate picks), else `cpu`."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve(choice: str = "auto", device_type: str | None = None) -> Backend:
    """The backend for `run.accel` (`auto`, `cpu`, `plain`; the `ALIGNKIT_ACCEL` variable overrides it).

    `auto` takes `cpu` on a CPU and `plain` on any accelerator (the CPU machinery is built and
    measured for CPU kernels). `cpu` on an accelerator still runs, but only its model-independent
    parts apply (its decoder and reordered weights are CPU-only and fall back to `plain`).

    Raises:
        AlignkitError: An unknown choice (naming the option and the choices).
    """
    choice = os.environ.get("ALIGNKIT_ACCEL") or choice
    if choice not in ACCEL_CHOICES:
        raise AlignkitError(f"option `run.accel`: {choice!r} is not one of {', '.join(ACCEL_CHOICES)}")
    if choice == "auto":
        choice = "cpu" if (device_type or default_device_type()) == "cpu" else "plain"
    return PlainBackend() if choice == "plain" else CpuBackend.from_environment()
