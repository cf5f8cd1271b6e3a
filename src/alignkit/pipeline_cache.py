"""Steps of a pipeline: templating of upstream paths, sweep expansion, fingerprints and done markers.

A step's values may refer to other steps and to the world with `${...}` templates:

    ${pipeline.dir}           runs/<pipeline name>
    ${steps.<step>.dir}       runs/<pipeline name>/<step>          (also `${steps.<step>}`)
    ${steps.<step>.final}     runs/<pipeline name>/<step>/final    (the step's trained model)
    ${world.root}             $ALIGNKIT_CACHE/worlds/<world>       (`${world.name}`: the world's name)

A reference to a step makes it an input: the step runs after it, and its fingerprint

    fingerprint = sha256(stage, resolved config, fingerprints of the steps it refers to)

changes whenever the step's own options or any upstream step's options change. After a step
succeeds, `<step dir>/.done.json` records its fingerprint, wall time and one-line result; a step
whose marker holds its current fingerprint is skipped.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit.errors import AlignkitError

DONE_FILE = ".done.json"
TEMPLATE = re.compile(r"\$\{([^}]+)\}")


@dataclass
class Step:
    """One run of one stage: its name, stage, merged option values and the steps it reads from."""

    name: str
    stage: str
    values: dict[str, Any]
    """Options as a nested dict (base YAML + `set`), templates already resolved."""
    run_dir: Path
    needs: list[str] = field(default_factory=list)
    """Upstream steps (referenced in templates or listed in `after`), in pipeline order."""
    fingerprint: str = ""
    outputs: list[Path] = field(default_factory=list)
    """Files that must exist for a finished step to count as cached (e.g. outside the run dir)."""


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """`tree[a][b][c] = value` for `dotted = "a.b.c"`, creating the mappings on the way."""
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise AlignkitError(f"option `{dotted}`: `{part}` is not a group of options")
    node[leaf] = value


def sweep_variants(name: str, sweep: dict[str, list[Any]]) -> list[tuple[str, dict[str, Any]]]:
    """`(variant name, {dotted key: value})` of every combination of a sweep; e.g. `dpo-beta0.1`."""
    if not sweep:
        return [(name, {})]
    keys = list(sweep)
    for key in keys:
        if not isinstance(sweep[key], list) or not sweep[key]:
            raise AlignkitError(f"step {name}: `sweep.{key}` must be a non-empty list of values")
    variants = []
    for combo in itertools.product(*(sweep[k] for k in keys)):
        suffix = "-".join(f"{k.rsplit('.', 1)[-1]}{v}" for k, v in zip(keys, combo, strict=True))
        variants.append((f"{name}-{suffix}", dict(zip(keys, combo, strict=True))))
    return variants


class Templater:
    """Resolves `${...}` templates of one step and records which steps it refers to."""

    def __init__(self, runs_dir: Path, world_root: Path, world: str, known: dict[str, Path], sweeps: dict[str, list]):
        self.runs_dir, self.world_root, self.world = runs_dir, world_root, world
        self.known, self.sweeps = known, sweeps
        self.used: list[str] = []

    def _lookup(self, expr: str, where: str) -> str:
        head, _, rest = expr.partition(".")
        if head == "pipeline" and rest == "dir":
            return str(self.runs_dir)
        if head == "world" and rest in ("root", "name"):
            return str(self.world_root) if rest == "root" else self.world
        if head == "steps" and rest:
            step, attr = rest, "dir"
            for suffix in (".dir", ".final"):
                if rest.endswith(suffix):
                    step, attr = rest[: -len(suffix)], suffix[1:]
            if step in self.sweeps:
                raise AlignkitError(f"{where}: `${{{expr}}}`: step {step} is a sweep; refer to one of its runs: "
                                    f"{', '.join(self.sweeps[step])}")
            if step not in self.known:
                raise AlignkitError(f"{where}: `${{{expr}}}` refers to step {step!r}, which is not an earlier step "
                                    f"(earlier: {', '.join(self.known) or 'none'})")
            if step not in self.used:
                self.used.append(step)
            return str(self.known[step] / "final" if attr == "final" else self.known[step])
        raise AlignkitError(f"{where}: unknown template `${{{expr}}}`; use ${{steps.<step>.dir}}, "
                            "${steps.<step>.final}, ${pipeline.dir}, ${world.root} or ${world.name}")

    def resolve(self, value: Any, where: str) -> Any:
        """`value` with every template in its strings replaced (recursively in lists and mappings)."""
        if isinstance(value, str):
            return TEMPLATE.sub(lambda m: self._lookup(m.group(1).strip(), where), value)
        if isinstance(value, list):
            return [self.resolve(v, where) for v in value]
        if isinstance(value, dict):
            return {k: self.resolve(v, f"{where}.{k}") for k, v in value.items()}
        return value


def fingerprint(stage: str, config: dict[str, Any], upstream: list[str]) -> str:
    """sha256 of the stage, its resolved config and its upstream fingerprints (hex, 16 chars)."""
    blob = json.dumps({"stage": stage, "config": config, "upstream": sorted(upstream)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_marker(run_dir: Path) -> dict[str, Any] | None:
    """The `.done.json` marker of a step, or None (missing or unreadable)."""
    try:
        return json.loads((run_dir / DONE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_done(step: Step) -> bool:
    """Whether the step finished before with the same fingerprint."""
    marker = read_marker(step.run_dir)
    fresh = bool(marker) and marker.get("fingerprint") == step.fingerprint
    return fresh and all(path.exists() for path in step.outputs)


def write_marker(step: Step, seconds: float, result: str) -> None:
    """Record a successful run of `step` (written last, atomically)."""
    step.run_dir.mkdir(parents=True, exist_ok=True)
    marker = {"step": step.name, "stage": step.stage, "fingerprint": step.fingerprint, "seconds": round(seconds, 2),
              "result": result, "needs": step.needs, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    tmp = step.run_dir / f"{DONE_FILE}.tmp"
    tmp.write_text(json.dumps(marker, indent=2) + "\n")
    tmp.replace(step.run_dir / DONE_FILE)


def select(steps: list[Step], only: list[str], start: str, force: bool) -> dict[str, str]:
    """What to do with each step: `run` (stale or forced), `cached` or `skip` (not selected).

    `only`: run just these steps (re-run even when cached; their inputs must exist). `start`: re-run
    this step and every later one. `force`: re-run everything. Otherwise a step runs when its
    fingerprint differs from its marker's.
    """
    names = [s.name for s in steps]
    for name in [*only, *([start] if start else [])]:
        if name not in names:
            raise AlignkitError(f"no step {name!r} in this pipeline; steps: {', '.join(names)}")
    first = names.index(start) if start else len(names)
    plan = {}
    for i, step in enumerate(steps):
        if only:
            plan[step.name] = "run" if step.name in only else "skip"
        elif force or i >= first or not is_done(step):
            plan[step.name] = "run"
        else:
            plan[step.name] = "cached"
    return plan
