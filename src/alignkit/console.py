"""Warnings and notes printed once per run, not once per process.

Under `accelerate launch` every process loads the same data and models and would print the same
warning N times. `main_print` prints on the main process only, read from the launcher's `RANK`
environment variable (set before any process group exists, so it works while data loads, before the
trainer's `Accelerator` is created); a single-process run has no `RANK` and prints.
"""

from __future__ import annotations

import os
from typing import Any


def is_main_process() -> bool:
    """True on the launcher's rank 0, and in a run not started by a launcher."""
    return os.environ.get("RANK", "0") == "0"


def main_print(*args: Any, **kwargs: Any) -> None:
    """`print(*args, **kwargs)` (flushed) on the main process only."""
    if is_main_process():
        print(*args, flush=True, **kwargs)
