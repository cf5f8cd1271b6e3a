"""The run directory's metrics: `metrics.jsonl` plus accelerate's experiment trackers (`run.report_to`)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from tests.conftest import build_tiny_llama

import alignkit.trainers.rundir as rundir
from alignkit.config import resolve_config
from alignkit.errors import AlignkitError
from alignkit.trainers.loop import TrainLoop
from alignkit.trainers.pretrain import PretrainConfig
from alignkit.trainers.rundir import MetricsLogger

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def test_report_to_is_a_checked_list_of_tracker_names():
    assert resolve_config(PretrainConfig, None, []).run.report_to == ["tensorboard"]
    assert resolve_config(PretrainConfig, None, ["--run.report_to", "[]"]).run.report_to == []
    assert resolve_config(PretrainConfig, None, ["--run.report_to", ""]).run.report_to == []
    cfg = resolve_config(PretrainConfig, None, ["--run.report_to", "tensorboard,wandb,mlflow"])
    assert cfg.run.report_to == ["tensorboard", "wandb", "mlflow"]
    with pytest.raises(AlignkitError, match=r"option `run.report_to`: 'wandbb' is not one of \[.*'mlflow'.*"
                                            r"did you mean 'wandb'"):
        resolve_config(PretrainConfig, None, ["--run.report_to", "tensorboard,wandbb"])


def test_missing_tracker_packages(monkeypatch, capsys, tmp_path):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    monkeypatch.setattr(rundir, "_noted", set())
    assert MetricsLogger.trackers([]) == []
    assert MetricsLogger.trackers(["tensorboard"]) == []  # the default: skipped, with a note
    with pytest.raises(AlignkitError, match=r"`run.report_to` names wandb, which needs .*pip install wandb"):
        MetricsLogger.trackers(["tensorboard", "wandb"])
    for _ in range(2):
        MetricsLogger(tmp_path, enabled=True, report_to=["tensorboard"]).close()
    err = capsys.readouterr().err
    assert err.count("note: `run.report_to` names tensorboard") == 1 and "pip install tensorboard" in err


def test_a_tracker_this_accelerate_lacks_is_an_error(monkeypatch):
    import accelerate.tracking

    monkeypatch.delitem(accelerate.tracking.LOGGER_TYPE_TO_CLASS, "trackio")
    with pytest.raises(AlignkitError, match=r"accelerate .* has no tracker 'trackio'.*upgrade accelerate"):
        MetricsLogger.trackers(["trackio"])


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed")
def test_the_loop_logs_to_tensorboard_through_accelerate(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    cfg = resolve_config(PretrainConfig, None, [
        "--output-dir", str(out), "--optim.max_steps", "3", "--run.report_to", "tensorboard",
        "--run.progress", "false"])
    loop = TrainLoop("test", cfg, build_tiny_llama(50, seed=0))
    loop.resume()
    for step in range(3):
        loop.logger.log(step + 1, {"loss": torch.tensor(2.0 - step), "lr": 1e-3, "note": "text", "bad": float("nan")})
    loop.close()
    loop.close()  # a second close (finish after an error path) does nothing

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [2.0, 1.0, 0.0] and rows[0]["note"] == "text" and rows[0]["bad"] == "nan"
    events = EventAccumulator(str(out / rundir.PROJECT))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["loss", "lr"]  # numbers only, non-finite values left out
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 2.0), (2, 1.0), (3, 0.0)]
    hparams = list((out / rundir.PROJECT).glob("*/hparams.yml"))  # the flattened config, for the trackers
    assert len(hparams) == 1 and "optim.max_steps: 3" in hparams[0].read_text()


def test_no_trackers_writes_only_metrics_jsonl(tmp_path):
    out = tmp_path / "run"
    cfg = resolve_config(PretrainConfig, None, [
        "--output-dir", str(out), "--optim.max_steps", "1", "--run.report_to", "[]", "--run.progress", "false"])
    loop = TrainLoop("test", cfg, build_tiny_llama(50, seed=0))
    loop.resume()
    loop.logger.log(1, {"loss": 1.5})
    loop.close()
    # `.lock`: the run's directory lock (released when the run finishes or its process ends)
    assert sorted(p.name for p in out.iterdir() if p.name != ".lock") == ["config.yaml", "metrics.jsonl"]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resume_drops_a_torn_last_line_and_rows_after_the_checkpoint(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "eval/loss": 2.0}\n{"step": 5, "loss": 1.5}\n{"step": 10, "loss": 1.2}\n'
                    '{"step": 12, "lo')  # killed (or the disk filled) in the middle of a write
    MetricsLogger(tmp_path, enabled=True, resume_step=10).close()
    assert [r["step"] for r in _rows(path)] == [0, 5, 10]
    assert "dropped 1 unreadable line" in capsys.readouterr().err


def test_resume_before_the_first_checkpoint_starts_the_metrics_again(tmp_path):
    """A run killed before its first checkpoint resumes from step 0 and logs step 0 again: one step-0 row."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "eval/loss": 2.0}\n{"step": 1, "loss": 1.9}\n')
    logger = MetricsLogger(tmp_path, enabled=True, resume_step=0)
    logger.log(0, {"eval/loss": 2.0})
    logger.close()
    assert [r["step"] for r in _rows(path)] == [0]
