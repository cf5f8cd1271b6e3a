"""`alignkit ... --help | head`: a reader that stops early ends the CLI quietly (no BrokenPipeError traceback)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("args", [["sft", "--help"], ["--help"], ["world", "--help"]])
def test_closed_stdout_exits_quietly_with_sigpipe_status(args):
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the CLI writes: every write to stdout fails with EPIPE
    try:
        res = subprocess.run([sys.executable, "-m", "alignkit.cli", *args], stdout=write, stderr=subprocess.PIPE,
                             text=True, timeout=120)
    finally:
        os.close(write)
    assert res.stderr == ""
    assert res.returncode == 141  # 128 + SIGPIPE, what a shell reports for `yes | head`


def test_help_through_head_prints_its_first_line():
    res = subprocess.run(f"{sys.executable} -m alignkit.cli sft --help | head -n 1", shell=True,
                         capture_output=True, text=True, timeout=120)
    assert res.stdout.startswith("usage: alignkit sft") and res.stderr == ""
