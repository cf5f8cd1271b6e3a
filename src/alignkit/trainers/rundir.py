"""The run directory of a stage: where it is, its saved config, its metrics and its summary.

Layout: `config.yaml`, `metrics.jsonl` (one JSON object per logged step), `summary.json`,
`checkpoints/step-N/`, `final/` (Hugging Face format), and the files of local experiment trackers
(`run.report_to`): TensorBoard events under `alignkit/`.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import accelerate
import yaml
from accelerate import tracking

from alignkit.atomic import atomic_write_json, atomic_write_text
from alignkit.config import to_dict
from alignkit.errors import AlignkitError

PROJECT = "alignkit"
"""The tracker project (wandb / comet / trackio project, MLflow experiment, TensorBoard sub-directory)."""

_noted: set[str] = set()  # trackers already reported missing in this process


def resolve_output_dir(stage: str, output_dir: str | None) -> Path:
    """`output_dir`, or `runs/<stage>-<timestamp>` when it is not set."""
    if output_dir:
        return Path(output_dir)
    return Path("runs") / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON (indented; tensors' and numpy scalars' values, paths as strings) atomically and durably."""
    atomic_write_json(path, data)


def config_yaml(cfg: Any) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def prepare_run_dir(out_dir: Path, cfg: Any, *, resume: bool) -> None:
    """Create the run dir and save the config; refuse to overwrite a run's checkpoints silently."""
    ckpts = out_dir / "checkpoints"
    if not resume and ckpts.is_dir() and any(ckpts.glob("step-*")):
        raise AlignkitError(
            f"output dir {out_dir} already holds checkpoints: pass --resume to continue that run, "
            "or choose another --output-dir"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "config.yaml", config_yaml(cfg))


def _clean(value: Any) -> Any:
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as `{"optim.lr": 1e-4, ...}` with values trackers accept (lists, None as text)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, bool | int | float | str) else str(value)
    return flat


class MetricsLogger:
    """Appends metrics to `metrics.jsonl` and hands them to accelerate's experiment trackers (main process only).

    `metrics.jsonl` is alignkit's own record (resume truncates it to the checkpoint's step, the report
    reads it). The trackers of `run.report_to` are those of `Accelerator(log_with=...)`, chosen with
    `MetricsLogger.trackers`; this starts them (`init_trackers`, with the flattened config), logs the
    numeric metrics of each row to them (`Accelerator.log`) and finishes them on `close`.
    """

    def __init__(self, out_dir: Path, *, enabled: bool, accelerator: Any = None, report_to: Sequence[str] = (),
                 config: Any = None, resume_step: int = 0):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self._acc = accelerator
        chosen = self.trackers(report_to)  # raises on every process, not only the main one
        missing = [name for name in dict.fromkeys(report_to) if name not in chosen]
        if not enabled:
            return
        for name in missing:
            if name not in _noted:
                _noted.add(name)
                print(f"note: `run.report_to` names {name}, but the `{name}` package is not installed: not "
                      f"logging to it (`pip install {name}`, or leave it out of `run.report_to`)", file=sys.stderr)
        self._truncate_after(resume_step)
        if accelerator is not None and accelerator.log_with:
            accelerator.init_trackers(
                PROJECT, config=_flat(to_dict(config)) if config is not None else None,
                init_kwargs={"wandb": {"name": out_dir.name, "dir": str(out_dir)}},
            )

    @staticmethod
    def trackers(report_to: Sequence[str]) -> list[str]:
        """The trackers of `report_to` to pass as `Accelerator(log_with=...)`: those whose package is installed.

        A missing `tensorboard` (the default) is left out (`MetricsLogger` says so once); any other
        missing tracker, or one this accelerate version does not know, is an error naming the option.
        """
        if not report_to:
            return []

        available = {str(getattr(t, "value", t)) for t in tracking.get_available_trackers()}
        chosen = []
        for name in dict.fromkeys(report_to):
            if name not in tracking.LOGGER_TYPE_TO_CLASS:

                raise AlignkitError(f"option `run.report_to`: accelerate {accelerate.__version__} has no tracker "
                                    f"{name!r} (it has {', '.join(sorted(tracking.LOGGER_TYPE_TO_CLASS))}); upgrade accelerate")
            if name in available:
                chosen.append(name)
            elif name != "tensorboard":
                raise AlignkitError(f"option `run.report_to` names {name}, which needs the `{name}` package: "
                                    f"pip install {name}")
        return chosen

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so the file reads as one run."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self._acc is not None and self._acc.trackers:
            numbers = {k: v for k, v in row.items() if k != "step" and isinstance(v, int | float)}
            self._acc.log(numbers, step=step)

    def close(self) -> None:
        """Finish the trackers (not `Accelerator.end_training`, which also ends the process group that a
        pipeline's next stage in this process still uses). Safe to call twice."""
        if self._acc is not None:
            for tracker in self._acc.trackers:
                tracker.finish()
            self._acc.trackers.clear()
