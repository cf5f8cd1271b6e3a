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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    stage, rest = argv[0], argv[1:]
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
