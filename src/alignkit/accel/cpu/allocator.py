"""Keep freed memory in the process instead of returning it to the OS between steps (glibc).

PyTorch allocates CPU tensors with the C library's `malloc` and does not cache them. glibc serves a
block above its mmap threshold (128 KiB at start, raised on the fly up to 32 MiB) with a fresh
`mmap`, and gives the top of the heap back to the OS when more than its trim threshold is free
there. A training step frees its gradients, activations and logits and asks for the same sizes
again at the next step, so the memory comes back as new pages that the kernel must fault in and
zero, one 4 KiB page at a time. Measured on the benchmark's GRPO step (bench/, 2 cores): 1,000 to
10,000 page faults per policy update, which cost ~4-7 ms of a ~70 ms update; none with the
thresholds below.

`keep_freed_memory()` fixes the mmap threshold at 32 MiB, the most glibc raises it to by itself, and
the trim threshold at 1 GiB. Both: setting the trim threshold alone turns off glibc's raising of the
mmap threshold, and then every block above 128 KiB is mapped afresh (measured: 5x more faults).
Freed memory then stays in the heap for the next step; the resident size does not shrink after the
peak. Blocks above 32 MiB are mapped and unmapped as glibc does by default (a higher threshold let
the heap grow by a whole block at each of several rounds of 40 MiB aligned allocations).

The CPU backend calls it unless `malloc_keep=False` (`ALIGNKIT_MALLOC_KEEP=0`). It does nothing
when the C library is not glibc, when the user tuned
glibc's malloc already (a `MALLOC_*` variable, or `glibc.malloc.*` in `GLIBC_TUNABLES`: a later
`mallopt` would override them), or when another allocator is preloaded (jemalloc, tcmalloc,
mimalloc in `LD_PRELOAD`, where glibc's settings would do nothing). The settings are process-wide
and stay for the life of the process.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30
_PRELOADED_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_done: bool | None = None  # the result of the first call (the settings are process-wide)


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it; musl's mallopt does nothing)
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def _tuned_elsewhere(env: dict[str, str]) -> bool:
    """Whether the user set glibc's malloc up already or preloaded another allocator."""
    return (any(name.startswith("MALLOC_") for name in env) or "glibc.malloc." in env.get("GLIBC_TUNABLES", "")
            or any(name in env.get("LD_PRELOAD", "") for name in _PRELOADED_ALLOCATORS))


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; whether they were set (once per process)."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if _tuned_elsewhere(os.environ):
        return False
    libc = _glibc()
    if libc is None:
        return False
    # The mmap threshold first: if it were refused, a raised trim threshold alone would make things worse.
    if libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        return False
    _done = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return _done
