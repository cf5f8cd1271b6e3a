"""The run directory of a stage: where it is, its saved config, its metrics and its summary.

Layout: `config.yaml`, `metrics.jsonl` (one JSON object per logged step), `summary.json`,
`checkpoints/step-N/`, `final/` (Hugging Face format), `tensorboard/`.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import yaml

from alignkit.config import to_dict
from alignkit.errors import AlignkitError


def resolve_output_dir(stage: str, output_dir: str | None) -> Path:
    """`output_dir`, or `runs/<stage>-<timestamp>` when it is not set."""
    if output_dir:
        return Path(output_dir)
    return Path("runs") / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temp file, then rename it into place (never a half-written file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


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
    (out_dir / "config.yaml").write_text(config_yaml(cfg))


def _clean(value: Any) -> Any:
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    """Appends metrics to `metrics.jsonl`, and to TensorBoard / wandb when asked (main process only)."""

    def __init__(self, out_dir: Path, *, enabled: bool, tensorboard: bool, wandb: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self._truncate_after(resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out_dir / "tensorboard"))
        if wandb:
            try:
                import wandb as wandb_module
            except ImportError:
                raise AlignkitError("option `run.wandb` needs the `wandb` package: pip install wandb") from None
            self._wandb = wandb_module.init(project="alignkit", name=out_dir.name, dir=str(out_dir))

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
        for key, value in row.items():
            if key != "step" and isinstance(value, int | float):
                if self._tb is not None:
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(row, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(out_dir: Path) -> list[dict]:
    """All rows of a run's `metrics.jsonl`."""
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []
