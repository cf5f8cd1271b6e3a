"""`keep_freed_memory`: memory a step frees and asks for again is not faulted in afresh (glibc only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from alignkit.trainers import allocator

# Allocates and touches 64 blocks of 1 MiB, frees them, and does it again: prints how much the
# resident size fell at the first free (MiB) and the page faults of the second round.
_PROBE = """
import json, resource
import torch
from alignkit.trainers.allocator import keep_freed_memory
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
kept = keep_freed_memory()
blocks = [torch.empty(1 << 18).fill_(1.0) for _ in range(64)]
full = rss_mib()
del blocks
dropped = full - rss_mib()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
blocks = [torch.empty(1 << 18).fill_(1.0) for _ in range(64)]
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"kept": kept, "dropped_mib": dropped, "faults": faults}))
"""
PAGES = 64 * 256  # 4 KiB pages in 64 MiB


def _probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("ALIGNKIT_MALLOC_KEEP", "GLIBC_TUNABLES", "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", _PROBE], env={**clean, **env, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(allocator._glibc() is None or not os.path.exists("/proc/self/statm"), reason="not glibc")
def test_freed_memory_stays_and_is_reused_without_page_faults():
    kept = _probe()
    assert kept["kept"] is True
    assert kept["dropped_mib"] < 8  # the 64 MiB stay in the heap ...
    assert kept["faults"] < PAGES // 4  # ... and the second round uses them again
    default = _probe(ALIGNKIT_MALLOC_KEEP="0")  # glibc's own thresholds: the blocks are mapped afresh
    assert default["kept"] is False
    assert default["dropped_mib"] > 48
    assert default["faults"] > PAGES * 3 // 4


@pytest.mark.skipif(allocator._glibc() is None, reason="not glibc")
def test_a_users_malloc_settings_are_left_alone():
    assert _probe(MALLOC_TRIM_THRESHOLD_="1000000")["kept"] is False


class _FakeLibc:
    def __init__(self, accepts: set[int]):
        self.accepts, self.calls = accepts, []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return int(param in self.accepts)


@pytest.fixture
def fake_libc(monkeypatch):
    def install(accepts: set[int]) -> _FakeLibc:
        libc = _FakeLibc(accepts)
        monkeypatch.setattr(allocator, "_glibc", lambda: libc)
        monkeypatch.setattr(allocator, "_done", None)
        for name in [n for n in os.environ if n.startswith("MALLOC_")] + ["ALIGNKIT_MALLOC_KEEP", "GLIBC_TUNABLES",
                                                                           "LD_PRELOAD"]:
            monkeypatch.delenv(name, raising=False)
        return libc
    return install


def test_mmap_threshold_first_and_no_trim_threshold_without_it(fake_libc):
    libc = fake_libc({allocator.M_MMAP_THRESHOLD, allocator.M_TRIM_THRESHOLD})
    assert allocator.keep_freed_memory() is True
    assert libc.calls == [(allocator.M_MMAP_THRESHOLD, 32 << 20), (allocator.M_TRIM_THRESHOLD, 1 << 30)]
    assert allocator.keep_freed_memory() is True and len(libc.calls) == 2  # once per process
    # A trim threshold alone would turn off glibc's own raising of the mmap threshold: never set it alone.
    libc = fake_libc(set())
    assert allocator.keep_freed_memory() is False
    assert libc.calls == [(allocator.M_MMAP_THRESHOLD, 32 << 20)]


@pytest.mark.parametrize(("variable", "value"), [
    ("ALIGNKIT_MALLOC_KEEP", "0"), ("MALLOC_ARENA_MAX", "2"), ("MALLOC_TRIM_THRESHOLD_", "0"),
    ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0"), ("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")])
def test_opt_out_and_user_settings_call_nothing(variable, value, fake_libc, monkeypatch):
    libc = fake_libc({allocator.M_MMAP_THRESHOLD, allocator.M_TRIM_THRESHOLD})
    monkeypatch.setenv(variable, value)
    assert allocator.keep_freed_memory() is False and libc.calls == []


def test_unrelated_tunables_and_preloads_do_not_count(fake_libc, monkeypatch):
    libc = fake_libc({allocator.M_MMAP_THRESHOLD, allocator.M_TRIM_THRESHOLD})
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.cpu.hwcaps=-AVX2")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libfakeroot.so")
    assert allocator.keep_freed_memory() is True and len(libc.calls) == 2
