"""`alignkit pipeline CONFIG.yaml`: run stages in order, each in `runs/<name>/<step>/`, with caching.

A pipeline file lists steps in order; each runs one CLI stage (`alignkit <stage>`) with a base YAML
and overrides, exactly as a user could run it alone:

    name: sentiment                       # run directories: runs/sentiment/<step>/
    world: sentiment
    steps:
      - {name: world, stage: world}       # `alignkit world <world> build` (+ the world's SFT data)
      - name: sft
        stage: sft
        config: configs/sentiment/sft.yaml
        set: {model.name_or_path: "${world.root}/pretrain/final"}
      - name: label
        stage: label
        config: configs/sentiment/label.yaml
        set: {model.name_or_path: "${steps.sft.final}"}
      - name: dpo
        stage: dpo
        sweep: {beta: [0.05, 0.1]}        # two runs: dpo-beta0.05, dpo-beta0.1
        after: [reward]                   # extra ordering/inputs not visible in templates

Every step's `run.output_dir` becomes `runs/<name>/<step>`; templates (`${steps.sft.final}`, see
`alignkit.pipeline_cache`) refer to upstream steps and make them inputs. A step is skipped when its
fingerprint (resolved config + upstream fingerprints) matches its `.done.json` marker, so changing
an option re-runs that step and the steps downstream of it only. Each step runs in-process through
its stage's `run(config)`; its output goes to `runs/<name>/<step>/log.txt`, and progress bars to
the terminal.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit.config import build, read_yaml, to_dict
from alignkit.errors import AlignkitError
from alignkit.pipeline_cache import (
    Step,
    Templater,
    fingerprint,
    select,
    set_dotted,
    sweep_variants,
    write_marker,
)
from alignkit.stages import STAGES
from alignkit.worlds import WORLD_BUILDERS, world_for
from alignkit.worlds.base import world_root

STEP_KEYS = {"name", "stage", "config", "set", "sweep", "after"}


@dataclass
class PipelineConfig:
    """Chain stages with content-based caching: a step re-runs only when its config or inputs change."""

    name: str = "pipeline"
    """Pipeline name; steps run in `<runs_root>/<name>/<step>/`."""
    runs_root: str = "runs"
    """Directory holding the pipeline's run directory."""
    world: str = "sentiment"
    """The embedded world (`${world.root}`, `${world.name}`); built by a step with `stage: world`."""
    steps: list[Any] = field(default_factory=list)
    """Steps in order: {name, stage, config (base YAML), set ({dotted key: value}), sweep, after}."""
    only: list[str] = field(default_factory=list)
    """Run just these steps (comma-separated), even if cached; their inputs must already exist."""
    from_step: str = ""
    """Re-run this step and every later step (`--from` works too); earlier ones come from the cache."""
    force: bool = False
    """Re-run every step."""
    dry_run: bool = False
    """Print what would run and what is cached, then stop."""


def _stage_class(stage: str, world: str) -> type:
    if stage == "world":
        if world not in WORLD_BUILDERS:
            raise AlignkitError(f"option `world`: unknown world {world!r}; known: {', '.join(WORLD_BUILDERS)}")
        return WORLD_BUILDERS[world]()[0]
    if stage not in STAGES or stage == "pipeline":
        raise AlignkitError(f"unknown stage {stage!r}; stages: world, {', '.join(s for s in STAGES if s != 'pipeline')}")
    module, cls_name, _ = STAGES[stage]
    return getattr(importlib.import_module(module), cls_name)


def _check_spec(spec: Any, index: int) -> dict[str, Any]:
    if not isinstance(spec, dict) or "name" not in spec or "stage" not in spec:
        raise AlignkitError(f"pipeline step {index + 1}: expected a mapping with `name` and `stage`, got {spec!r}")
    unknown = set(spec) - STEP_KEYS
    if unknown:
        raise AlignkitError(f"pipeline step {spec['name']}: unknown keys {sorted(unknown)}; allowed: {sorted(STEP_KEYS)}")
    return spec


def _step_values(spec: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Base YAML values with `set` and sweep overrides applied (dotted keys)."""
    values = read_yaml(spec["config"]) if spec.get("config") else {}
    for key, value in {**(spec.get("set") or {}), **overrides}.items():
        set_dotted(values, str(key), value)
    return values


def expand_steps(cfg: PipelineConfig) -> list[Step]:
    """The concrete steps (sweeps expanded), with resolved values, upstream steps and fingerprints."""
    runs_dir = Path(cfg.runs_root) / cfg.name
    known: dict[str, Path] = {}
    sweeps: dict[str, list[str]] = {}
    prints: dict[str, str] = {}
    steps: list[Step] = []
    for index, raw in enumerate(cfg.steps):
        spec = _check_spec(raw, index)
        variants = sweep_variants(spec["name"], spec.get("sweep") or {})
        for name, overrides in variants:
            if name in known:
                raise AlignkitError(f"pipeline: two steps are named {name!r}")
            where = f"pipeline step {name}"
            templater = Templater(runs_dir, world_root(cfg.world), cfg.world, known, sweeps)
            values = templater.resolve(_step_values(spec, overrides), where)
            if spec["stage"] != "world":
                values.setdefault("run", {})["output_dir"] = str(runs_dir / name)
            config = build(_stage_class(spec["stage"], cfg.world), values, where)
            needs = list(templater.used)
            for dep in spec.get("after") or []:
                deps = sweeps.get(dep, [dep])
                if any(d not in known for d in deps):
                    raise AlignkitError(f"{where}: `after` names {dep!r}, which is not an earlier step")
                needs += [d for d in deps if d not in needs]
            step = Step(name, spec["stage"], to_dict(config), runs_dir / name, needs)
            step.fingerprint = fingerprint(step.stage, step.values, [prints[d] for d in needs])
            if step.stage == "world":
                step.outputs = [world_root(cfg.world) / "summary.json"]
            steps.append(step)
            known[name], prints[name] = step.run_dir, step.fingerprint
        if len(variants) > 1:
            sweeps[spec["name"]] = [n for n, _ in variants]
    return steps


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


class _ProgressTee:
    """stderr of a running step: everything to the log; progress-bar redraws (`\\r`) also to the terminal."""

    def __init__(self, terminal: Any, log: Any):
        self.terminal, self.log, self._bar = terminal, log, False

    def write(self, text: str) -> int:
        self.log.write(text)
        if "\r" in text or (self._bar and text == "\n"):
            self.terminal.write(text)
            self.terminal.flush()
            self._bar = text != "\n"
        return len(text)

    def flush(self) -> None:
        self.log.flush()

    def isatty(self) -> bool:
        return False


def run_stage(stage: str, cfg: Any) -> Any:
    """`run(cfg)` of a stage (a name of `alignkit.stages.STAGES`), with the world its config names loaded
    and passed in (`alignkit.worlds.world_for`): the one place where stages get their world."""
    run = importlib.import_module(STAGES[stage][0]).run
    world = world_for(cfg) if "world" in inspect.signature(run).parameters else None
    return run(cfg, world=world) if world is not None else run(cfg)


def _run_stage(step: Step, world: str) -> dict[str, Any]:
    cls = _stage_class(step.stage, world)
    config = build(cls, step.values, f"pipeline step {step.name}")
    if step.stage == "world":
        return WORLD_BUILDERS[world]()[1](config)
    return run_stage(step.stage, config)



RESULT_KEYS = ("eval/gold", "eval/kl", "eval/pairwise_accuracy", "eval/spearman_gold", "eval/loss", "train_records",
               "winners", "n_methods", "world", "report")


def result_line(summary: Any) -> str:
    """A few headline figures of a stage's summary, e.g. `eval/gold 0.61, eval/kl 4.2`."""
    if not isinstance(summary, dict):
        return ""
    flat = {**summary, **{k: v for part in ("after", "final") if isinstance(summary.get(part), dict)
                          for k, v in summary[part].items()}}
    parts = []
    for key in RESULT_KEYS:
        value = flat.get(key)
        if isinstance(value, float):
            parts.append(f"{key} {value:.3g}")
        elif isinstance(value, int | str) and not isinstance(value, bool):
            parts.append(f"{key} {value}")
    return ", ".join(parts[:4])


def _fmt_time(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 60 else f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def run_step(step: Step, world: str) -> tuple[float, str]:
    """Run one step in-process (fresh run directory, output in `log.txt`); return (seconds, result line)."""
    if step.stage != "world" and step.run_dir.exists():
        shutil.rmtree(step.run_dir)  # a stale run: its checkpoints must not be resumed
    step.run_dir.mkdir(parents=True, exist_ok=True)
    log_path = step.run_dir / "log.txt"
    t0 = time.perf_counter()
    with open(log_path, "w", buffering=1) as log:
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(_ProgressTee(sys.stderr, log)):
                summary = _run_stage(step, world)
        except KeyboardInterrupt:
            raise
        except Exception as err:  # noqa: BLE001 - any failure of a stage is reported with its log
            log.write(traceback.format_exc())
            message = str(err) if isinstance(err, AlignkitError) else f"{type(err).__name__}: {err}"
            raise AlignkitError(f"stage {step.name} failed: {message}; log: {log_path}") from None
    seconds = time.perf_counter() - t0
    result = result_line(summary)
    write_marker(step, seconds, result)
    return seconds, result


def run(cfg: PipelineConfig) -> dict[str, Any]:
    """Run the stale (or selected) steps in order; return `{step: status}` and the total time."""
    steps = expand_steps(cfg)
    plan = select(steps, cfg.only, cfg.from_step, cfg.force)
    runs_dir = Path(cfg.runs_root) / cfg.name
    n_run = sum(v == "run" for v in plan.values())
    print(f"alignkit pipeline {cfg.name}: {len(steps)} steps in {runs_dir}/ ({n_run} to run, "
          f"{sum(v == 'cached' for v in plan.values())} cached); each step's log: {runs_dir}/<step>/log.txt", flush=True)
    width, t0 = max(len(s.name) for s in steps) if steps else 0, time.perf_counter()
    for i, step in enumerate(steps, start=1):
        head = f"[{i:>2}/{len(steps)}] {step.name:<{width}}"
        if plan[step.name] != "run":
            print(f"{head}  {plan[step.name]}", flush=True)
            continue
        if cfg.dry_run:
            print(f"{head}  would run ({step.stage}, fingerprint {step.fingerprint})", flush=True)
            continue
        print(f"{head}  running `{step.stage}` ...", flush=True)
        seconds, result = run_step(step, cfg.world)
        print(f"{head}  done in {_fmt_time(seconds)}" + (f": {result}" if result else ""), flush=True)
    total = time.perf_counter() - t0
    if cfg.dry_run:
        return {"steps": plan, "seconds": 0.0, "runs_dir": str(runs_dir)}
    print(f"pipeline {cfg.name}: finished in {_fmt_time(total)}"
          + (f"; report: {runs_dir / 'report.html'}" if (runs_dir / "report.html").is_file() else ""), flush=True)
    return {"steps": plan, "seconds": total, "runs_dir": str(runs_dir)}
