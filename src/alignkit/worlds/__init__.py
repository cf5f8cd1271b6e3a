"""The embedded offline worlds: `get_world(name)` loads a built one, `WORLD_BUILDERS` builds one.

A world is resolved at the edge (the CLI, the pipeline, a user's script) and passed to the stages,
which use it only through `alignkit.worlds.base.World` (prompts, a gold scorer, a base model).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alignkit.config import world_names
from alignkit.errors import AlignkitError
from alignkit.worlds import sentiment
from alignkit.worlds.base import SUMMARY_FILE, World, world_root

WORLDS: dict[str, Callable[[Path], World]] = {"sentiment": sentiment.load_world}
"""World name -> loader of a built world from its root directory."""

WORLD_BUILDERS: dict[str, Callable[[], tuple[type, Callable[[Any], dict[str, Any]]]]] = {
    "sentiment": lambda: (sentiment.SentimentBuildConfig, sentiment.build),
}
"""World name -> () -> (build config dataclass, build function); for `alignkit world <name> build`."""


def _check_name(name: str) -> None:
    if name not in WORLDS:
        hints = difflib.get_close_matches(name, list(WORLDS), n=1)
        extra = f"; did you mean {hints[0]!r}?" if hints else ""
        raise AlignkitError(f"unknown world {name!r}: known worlds are {sorted(WORLDS)}{extra}")


def get_world(name: str, cache_dir: str | Path | None = None) -> World:
    """Load a built world.

    Args:
        name: World name (a key of `WORLDS`).
        cache_dir: alignkit cache directory; default `$ALIGNKIT_CACHE` or `~/.cache/alignkit`.

    Raises:
        AlignkitError: the name is unknown or the world is not built yet.
    """
    _check_name(name)
    root = world_root(name, cache_dir)
    if not (root / SUMMARY_FILE).is_file():
        hint = f" --cache_dir {cache_dir}" if cache_dir else ""
        raise AlignkitError(
            f"world {name!r} is not built (no {root / SUMMARY_FILE}): run `alignkit world {name} build{hint}`"
        )
    return WORLDS[name](root)


def world_for(cfg: Any) -> World | None:
    """The built world a stage config names (`alignkit.config.world_names`), loaded; None if it names none."""
    names = world_names(cfg)
    if len(names) > 1:
        raise AlignkitError(f"the options name {len(names)} worlds ({', '.join(names)}); a stage runs in one")
    return get_world(names[0]) if names else None
