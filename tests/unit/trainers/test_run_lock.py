"""One run per directory (an OS lock naming the holder's pid), stale temporaries, resume with a changed config."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from tests.conftest import build_tiny_llama

from alignkit.config import resolve_config
from alignkit.errors import AlignkitError
from alignkit.trainers import rundir
from alignkit.trainers.loop import TrainLoop
from alignkit.trainers.pretrain import PretrainConfig
from alignkit.trainers.rundir import LOCK_NAME, prepare_run_dir, release_run_lock

BASE = ["--run.report_to", "[]", "--run.progress", "false", "--optim.max_steps", "3"]


def cfg_for(out, *extra):
    return resolve_config(PretrainConfig, None, ["--output-dir", str(out), *BASE, *extra])


def lock_is_free(out) -> bool:
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing the descriptor releases a lock it took


def test_a_second_run_on_a_locked_dir_names_the_holders_pid(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    # flock is per open file description: a second descriptor in this process is "another run".
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"424242\n")
    try:
        for resume in (False, True):
            with pytest.raises(AlignkitError, match=r"output dir .*run is in use by another run \(pid 424242"):
                prepare_run_dir(out, cfg_for(out), resume=resume)
    finally:
        os.close(fd)
    prepare_run_dir(out, cfg_for(out), resume=False)  # released: the dir is free again
    assert (out / LOCK_NAME).read_text().strip() == str(os.getpid())
    release_run_lock(out)
    assert not (out / LOCK_NAME).exists()


def test_the_lock_of_a_killed_run_is_released(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from alignkit.trainers.rundir import acquire_run_lock; "
        f"acquire_run_lock(Path({str(out)!r})); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(AlignkitError, match=rf"in use by another run \(pid {holder.pid},"):
            prepare_run_dir(out, cfg_for(out), resume=True)
    finally:
        holder.kill()  # kill -9: no clean-up code runs, the kernel drops the lock with the descriptor
        holder.wait()
    assert (out / LOCK_NAME).exists()  # a stale file, but no lock
    prepare_run_dir(out, cfg_for(out), resume=True)
    release_run_lock(out)


def test_a_run_holds_the_lock_until_it_finishes(tmp_path):
    out = tmp_path / "run"
    loop = TrainLoop("test", cfg_for(out), build_tiny_llama(50, seed=0))
    loop.resume()
    assert not lock_is_free(out)
    loop.finish(None, {})
    assert lock_is_free(out)


def test_stale_temporaries_of_a_killed_run_are_removed_at_the_next_start(tmp_path):
    out = tmp_path / "run"
    (out / ".final.tmp-99-deadbeef").mkdir(parents=True)  # a kill during the `final/` write
    (out / ".final.tmp-99-deadbeef" / "model.safetensors").write_bytes(b"x" * 100)
    (out / ".summary.json.tmp-99-0123abcd").write_text("{")
    (out / "checkpoints" / ".tmp-step-4").mkdir(parents=True)
    (out / "checkpoints" / ".step-2.old-prune-99").mkdir()
    (out / "checkpoints" / ".step-2.old-prune-99" / "COMPLETE").write_text("2")
    (out / ".final.old-99-feedface").mkdir()  # killed between moving the old final/ aside and renaming the new in
    (out / ".final.old-99-feedface" / "config.json").write_text("{}")
    (out / ".notes.tmp-mine").write_text("a user's file, not a name alignkit makes")
    prepare_run_dir(out, cfg_for(out), resume=True)
    release_run_lock(out)
    assert sorted(p.name for p in out.iterdir()) == [".notes.tmp-mine", "checkpoints", "config.yaml", "final"]
    assert (out / "final" / "config.json").is_file()  # moved back, not deleted
    assert list((out / "checkpoints").iterdir()) == []


def _run_with_checkpoint(out, *extra):
    prepare_run_dir(out, cfg_for(out, *extra), resume=False, check_config=True)
    (out / "checkpoints" / "step-1").mkdir(parents=True)
    (out / "checkpoints" / "step-1" / "COMPLETE").write_text("1")
    release_run_lock(out)


def test_resume_with_a_changed_config_is_refused_naming_the_fields(tmp_path):
    out = tmp_path / "run"
    _run_with_checkpoint(out)
    saved = (out / "config.yaml").read_text()
    changed = cfg_for(out, "--run.resume", "true", "--optim.lr", "0.5", "--run.seed", "7",
                      "--optim.per_device_batch_size", "3")
    with pytest.raises(AlignkitError) as err:
        prepare_run_dir(out, changed, resume=True, check_config=True)
    msg = str(err.value)
    assert "\n" not in msg and "optim.lr:" in msg and "run.seed: 0 -> 7" in msg and "optim.per_device_batch_size" in msg
    assert "--run.resume_override run.seed,optim.lr,optim.per_device_batch_size" in msg
    assert (out / "config.yaml").read_text() == saved  # not rewritten
    assert lock_is_free(out)


def test_fields_that_may_change_on_resume_need_no_override(tmp_path):
    out = tmp_path / "run"
    _run_with_checkpoint(out)
    cfg = cfg_for(out, "--run.resume", "true", "--run.log_every", "1", "--run.save_every", "5",
                  "--run.keep_last", "4", "--run.accel", "plain", "--run.progress", "true")
    assert prepare_run_dir(out, cfg, resume=True, check_config=True) == {}
    release_run_lock(out)
    assert not (out / "resume_history.jsonl").exists()


def test_an_explicit_override_applies_and_is_recorded(tmp_path, capsys):
    out = tmp_path / "run"
    _run_with_checkpoint(out)
    saved = (out / "config.yaml").read_text()
    cfg = cfg_for(out, "--run.resume", "true", "--optim.lr", "0.5", "--run.seed", "7",
                  "--run.resume_override", "optim.lr,run.seed")
    changes = prepare_run_dir(out, cfg, resume=True, check_config=True)
    assert set(changes) == {"optim.lr", "run.seed"}
    # nothing is written until a checkpoint has loaded (the loop's `resume` then calls `record_resume`)
    assert (out / "config.yaml").read_text() == saved and not (out / "resume_history.jsonl").exists()
    rundir.record_resume(out, cfg, changes)
    release_run_lock(out)
    rows = [json.loads(line) for line in (out / "resume_history.jsonl").read_text().splitlines()]
    assert rows[0]["overridden"]["run.seed"] == {"saved": 0, "new": 7}
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"] == 0.5
    assert "overridden fields run.seed (0 -> 7), optim.lr (0.001 -> 0.5)" in capsys.readouterr().err


def test_an_overridden_lr_rescales_the_restored_schedule(tmp_path):
    out = tmp_path / "run"
    loop = TrainLoop("test", cfg_for(out, "--optim.lr", "0.001", "--run.save_every", "1"), build_tiny_llama(50))
    loop.resume()
    loop.step = 1
    loop.save_checkpoint()
    old_lrs = [g["lr"] for g in loop.optimizer.param_groups]
    loop.finish(None, {})
    cfg = cfg_for(out, "--optim.lr", "0.004", "--run.save_every", "1", "--run.resume", "true",
                  "--run.resume_override", "optim.lr")
    again = TrainLoop("test", cfg, build_tiny_llama(50))
    assert again.resume() == 1
    assert [g["lr"] for g in again.optimizer.param_groups] == pytest.approx([4 * lr for lr in old_lrs])
    assert again.scheduler.base_lrs == pytest.approx([0.004] * len(old_lrs))
    again.finish(None, {})


def _trained_run(out, *extra, steps=(1,)):
    """A run dir with a loadable checkpoint at each of `steps` (a tiny Llama of hidden size 32)."""
    loop = TrainLoop("test", cfg_for(out, "--model.name_or_path", "small", "--run.save_every", "1", *extra),
                     build_tiny_llama(50))
    loop.resume()
    for step in steps:
        loop.step = step
        loop.save_checkpoint()
    loop.finish(None, {})


def test_resume_with_a_model_of_another_shape_is_one_error_and_changes_nothing(tmp_path):
    out = tmp_path / "run"
    _trained_run(out)
    saved = (out / "config.yaml").read_text()
    cfg = cfg_for(out, "--model.name_or_path", "big", "--run.save_every", "1", "--run.resume", "true",
                  "--run.resume_override", "model.name_or_path")  # the override the changed-config error suggests
    again = TrainLoop("test", cfg, build_tiny_llama(50, hidden_size=64))
    with pytest.raises(AlignkitError) as err:
        again.resume()
    release_run_lock(out)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"checkpoint {out / 'checkpoints' / 'step-1'} does not fit the model big (LlamaForCausalLM)")
    assert ("20 tensor(s) have other shapes, e.g. `model.layers.0.self_attn.q_proj.weight` is [32, 32] in the "
            "checkpoint but [64, 64] in the model") in msg
    assert (out / "config.yaml").read_text() == saved and not (out / "resume_history.jsonl").exists()


def test_a_failed_resume_leaves_the_config_and_its_history_as_they_were(tmp_path, capsys):
    out = tmp_path / "run"
    _trained_run(out, steps=(1, 2))
    saved = (out / "config.yaml").read_text()
    for step in (1, 2):  # every checkpoint torn
        (out / "checkpoints" / f"step-{step}" / "trainer_state.json").write_text('{"step": ')
    cfg = cfg_for(out, "--model.name_or_path", "small", "--run.save_every", "1", "--run.resume", "true",
                  "--optim.max_steps", "8", "--run.resume_override", "optim.max_steps")
    again = TrainLoop("test", cfg, build_tiny_llama(50))
    with pytest.raises(AlignkitError, match="no readable checkpoint"):
        again.resume()
    release_run_lock(out)
    assert (out / "config.yaml").read_text() == saved and not (out / "resume_history.jsonl").exists()
    assert "overridden fields" not in capsys.readouterr().err  # nothing was resumed, so nothing is said to be
    # the same resume once a checkpoint loads: the override applies and is recorded
    _trained_run(tmp_path / "ok", steps=(1,))
    cfg = cfg_for(tmp_path / "ok", "--model.name_or_path", "small", "--run.save_every", "1", "--run.resume", "true",
                  "--optim.max_steps", "8", "--run.resume_override", "optim.max_steps")
    ok = TrainLoop("test", cfg, build_tiny_llama(50))
    assert ok.resume() == 1
    ok.finish(None, {})
    assert yaml.safe_load((tmp_path / "ok" / "config.yaml").read_text())["optim"]["max_steps"] == 8
    assert "optim.max_steps" in (tmp_path / "ok" / "resume_history.jsonl").read_text()


def test_lock_file_pid_is_rewritten_by_each_holder(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text("1\n")  # a stale file from a dead run
    monkeypatch.setattr(rundir, "_held", {})
    rundir.acquire_run_lock(out)
    assert (out / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    rundir.acquire_run_lock(out)  # re-entrant in one process (a pipeline's stages, a test's second loop)
    rundir.release_run_lock(out)
    assert lock_is_free(out)


def test_a_run_dir_deleted_and_made_again_in_one_process_is_locked_anew(tmp_path):
    out = tmp_path / "run"
    prepare_run_dir(out, cfg_for(out), resume=False)
    shutil.rmtree(out)  # e.g. the pipeline removing a stale stage's directory
    prepare_run_dir(out, cfg_for(out), resume=False)
    assert (out / LOCK_NAME).read_text().strip() == str(os.getpid()) and not lock_is_free(out)
    release_run_lock(out)
