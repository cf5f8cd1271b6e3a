"""`alignkit <stage> [CONFIG.yaml | --config CONFIG.yaml] [--<field> VALUE ...]`.

Every field of a stage's config dataclass is settable in YAML and on the command line (the
command line wins; nested fields with dots, e.g. `--optim.lr 1e-5`). `alignkit <stage> --help`
lists every field with its default and documentation.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from alignkit.config import format_help, resolve_config
from alignkit.errors import AlignkitError
from alignkit.stages import STAGES

WORLD_COMMANDS = ("build", "info")


def _usage() -> str:
    lines = [
        "usage: alignkit <stage> [CONFIG.yaml] [--<field> VALUE ...]",
        "       alignkit world <name> build|info [--<field> VALUE ...]",
        "",
        "Align language models with human preferences. Stages:",
    ]
    width = max(len(s) for s in STAGES)
    lines += [f"  {name:<{width}}  {desc}" for name, (_, _, desc) in STAGES.items()]
    lines += [f"  {'world':<{width}}  build or inspect an embedded offline world (e.g. `sentiment`)",
              "", "`alignkit <stage> --help` lists every option with its default."]
    return "\n".join(lines)


def _split_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """Take `--config FILE` (or a leading FILE.yaml) out of argv."""
    config = None
    rest = list(argv)
    if rest and not rest[0].startswith("-") and rest[0].endswith((".yaml", ".yml")):
        config = rest.pop(0)
    for i, arg in enumerate(rest):
        if arg == "--config":
            if i + 1 >= len(rest):
                raise AlignkitError("option `--config` needs a YAML file")
            config = rest[i + 1]
            del rest[i : i + 2]
            break
        if arg.startswith("--config="):
            config = arg.split("=", 1)[1]
            del rest[i]
            break
    return config, rest


def _load(module: str, attr: str) -> Any:
    return getattr(importlib.import_module(module), attr)


def run_stage(stage: str, argv: list[str]) -> Any:
    module, cls_name, desc = STAGES[stage]
    cls = _load(module, cls_name)
    if "-h" in argv or "--help" in argv:
        print(f"usage: alignkit {stage} [CONFIG.yaml] [--<field> VALUE ...]\n\n{desc}\n{format_help(cls)}")
        return None
    config, rest = _split_config(argv)
    rest = [a.replace("--from", "--from_step", 1) if a.split("=")[0] == "--from" else a for a in rest]
    cfg = resolve_config(cls, config, rest)
    from alignkit.pipeline import run_stage as run_with_world  # start-up cost: torch only when a stage runs

    return run_with_world(stage, cfg)


def run_world(argv: list[str]) -> Any:
    """`alignkit world <name> build|info [--<field> VALUE ...]`."""
    from alignkit.worlds import WORLD_BUILDERS, get_world  # start-up cost: `alignkit --help` imports no torch

    names = "|".join(WORLD_BUILDERS)
    if len(argv) < 2 or argv[0] in ("-h", "--help") or argv[1] not in WORLD_COMMANDS:
        print(f"usage: alignkit world <{names}> build|info [--<field> VALUE ...]\n\n"
              "  build  build (or finish building) the world and cache it in $ALIGNKIT_CACHE\n"
              "  info   print the built world's paths and figures")
        return None
    name, command, rest = argv[0], argv[1], argv[2:]
    if name not in WORLD_BUILDERS:
        raise AlignkitError(f"unknown world {name!r}; known worlds: {', '.join(WORLD_BUILDERS)}")
    build_config, build = WORLD_BUILDERS[name]()
    if "-h" in rest or "--help" in rest:
        print(f"usage: alignkit world {name} {command} [--<field> VALUE ...]\n{format_help(build_config)}")
        return None
    config, rest = _split_config(rest)
    cfg = resolve_config(build_config, config, rest)
    if command == "build":
        return build(cfg)
    world = get_world(name, getattr(cfg, "cache_dir", None))
    paths = {"root": world.root, "tokenizer": world.tokenizer_path, "base_model": world.base_model_path}
    print(json.dumps({"paths": paths, **world.summary()}, indent=2, default=str))
    return world


# How many processes a launcher started: torchrun (`accelerate launch --multi_gpu`), then MPI's.
_WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def _parent_argv() -> list[str]:
    """The command line of the process that started this one (e.g. `accelerate launch ...`); [] if unknown."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()  # Linux; elsewhere the count is not named
    except OSError:
        return []
    return raw.decode(errors="replace").split("\0")


def process_count_mismatch() -> tuple[int | None, int] | None:
    """(processes asked for or None if unknown, processes started) when `accelerate launch` asked for more
    processes than it started; None otherwise.

    Without `--multi_gpu` (and without several GPUs) `accelerate launch --num_processes N` runs its
    "simple" launcher: ONE process, whatever N is. That launcher always sets ACCELERATE_USE_CPU, and
    MASTER_ADDR only when N > 1 (or several machines); it puts N nowhere in the environment, so N is
    read from the launcher's own command line when it is there. torchrun (`--multi_gpu`) and mpirun
    set the real count (WORLD_SIZE, PMI_SIZE, ...), which is what the run gets.
    """
    env = os.environ
    started = next((int(env[k]) for k in _WORLD_SIZE_VARS if env.get(k, "").isdigit()), 1)
    if "ACCELERATE_USE_CPU" not in env or "MASTER_ADDR" not in env or started > 1:
        return None
    parent = _parent_argv()
    asked = None
    for i, arg in enumerate(parent):
        name, _, value = arg.partition("=")
        if name in ("--num_processes", "--num-processes"):
            value = value or (parent[i + 1] if i + 1 < len(parent) else "")
            asked = int(value) if value.isdigit() else None
            break
    if asked is not None and asked <= started:
        return None
    return asked, started


def launch_warning() -> str | None:
    """The warning line for `process_count_mismatch()`, or None."""
    found = process_count_mismatch()
    if found is None:
        return None
    asked, started = found
    wanted = f"{asked} processes" if asked else "more than 1 process"
    n = f" {asked}" if asked else " N"
    return (f"warning: accelerate launch asked for {wanted} but this run has {started} process: without "
            "--multi_gpu, `accelerate launch` starts a single process unless it finds several GPUs. Add "
            f"--multi_gpu (`accelerate launch --multi_gpu --num_processes{n} -m alignkit.cli ...`); on a machine "
            "without a GPU it then runs the processes on the CPU, with gloo")


def main(argv: list[str] | None = None) -> int:
    """Run `alignkit ...`; returns the exit status (2: a user error, printed as one line without a traceback).

    A reader that stops early (`alignkit sft --help | head`) ends the run quietly with status 141
    (128 + SIGPIPE, what a shell reports for a writer killed by the signal), as in the Python docs'
    "Note on SIGPIPE": stdout is pointed at /dev/null so the flush at exit does not fail again.
    """
    try:
        status = _main(argv)
        sys.stdout.flush()  # a pipe closed early fails here rather than at interpreter exit
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return status


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    stage, rest = argv[0], argv[1:]
    warning = None if "-h" in rest or "--help" in rest else launch_warning()
    if warning:
        print(warning, file=sys.stderr, flush=True)
    try:
        if stage == "world":
            run_world(rest)
        elif stage in STAGES:
            run_stage(stage, rest)
        else:
            import difflib

            hint = difflib.get_close_matches(stage, [*STAGES, "world"], n=1)
            raise AlignkitError(f"unknown stage {stage!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                                + " (see `alignkit --help`)")
    except AlignkitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
