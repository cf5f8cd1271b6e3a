"""Checkpoints under faults: torn files in the newest one, kills while pruning and during `final/`, full disks."""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from tests.conftest import build_tiny_llama

import alignkit.atomic as atomic
import alignkit.trainers.checkpoint as ckpt
import alignkit.trainers.rundir as rundir
from alignkit.config import resolve_config
from alignkit.errors import AlignkitError
from alignkit.trainers.loop import TrainLoop
from alignkit.trainers.pretrain import PretrainConfig


def make_state(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, opt, sched


def train_step(model, opt, sched):
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    opt.zero_grad()
    sched.step()


def write(root: Path, step: int, model, opt, sched) -> Path:
    return ckpt.save_checkpoint(root, step, model=model, optimizer=opt, scheduler=sched, stage_state={"k": step},
                                config_yaml="optim:\n  lr: 0.01\n")


def two_checkpoints(root: Path):
    model, opt, sched = make_state()
    train_step(model, opt, sched)
    write(root, 1, model, opt, sched)
    at_1 = {k: v.clone() for k, v in model.state_dict().items()}
    train_step(model, opt, sched)
    write(root, 2, model, opt, sched)
    return at_1


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# -- a newest checkpoint marked complete but torn: fall back, with a warning naming it -------------
@pytest.mark.parametrize("bad_file", ["model.safetensors", "optimizer.safetensors", "rng-0.safetensors",
                                      "trainer_state.json", "optimizer.json", "rng-0.json"])
def test_a_torn_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, bad_file):
    root = tmp_path / "checkpoints"
    at_1 = two_checkpoints(root)
    truncate(root / "step-2" / bad_file)
    model, opt, sched = make_state(seed=5)
    path, state = ckpt.load_newest(root, model=model, optimizer=opt, scheduler=sched)
    assert path == root / "step-1" and state["step"] == 1 and state["stage"] == {"k": 1}
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, at_1[k])
    err = capsys.readouterr().err
    assert f"warning: skipping checkpoint {root / 'step-2'}" in err and bad_file in err


def test_every_checkpoint_torn_is_one_error_not_a_fresh_start(tmp_path, capsys):
    root = tmp_path / "checkpoints"
    two_checkpoints(root)
    truncate(root / "step-1" / "trainer_state.json")
    truncate(root / "step-2" / "model.safetensors", keep=0.1)
    model, opt, sched = make_state()
    with pytest.raises(AlignkitError, match=r"no readable checkpoint in .*checkpoints: all 2 are torn"):
        ckpt.load_newest(root, model=model, optimizer=opt, scheduler=sched)
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 2
    assert f"skipping checkpoint {root / 'step-2'}" in warnings[0] and warnings[0].endswith("trying the one before it")
    assert f"skipping checkpoint {root / 'step-1'}" in warnings[1]  # the oldest: there is none before it
    assert warnings[1].endswith("there is no earlier one to try")


def test_the_loop_resumes_from_the_previous_checkpoint_when_the_newest_is_torn(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--output-dir", str(out), "--optim.max_steps", "3", "--run.report_to", "[]", "--run.progress", "false",
            "--run.save_every", "1"]
    loop = TrainLoop("test", resolve_config(PretrainConfig, None, args), build_tiny_llama(50))
    loop.resume()
    for step in (1, 2):
        loop.step = step
        loop.save_checkpoint()
    loop.finish(None, {})
    (out / "checkpoints" / "step-2" / "trainer_state.json").write_text('{"step": 2, "sched')
    again = TrainLoop("test", resolve_config(PretrainConfig, None, [*args, "--run.resume", "true"]),
                      build_tiny_llama(50))
    assert again.resume() == 1
    again.finish(None, {})
    assert "skipping checkpoint" in capsys.readouterr().err


# -- pruning: a kill mid-delete never leaves a half-deleted `step-N` with its marker ----------------
def test_a_prune_cut_short_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    two_checkpoints(root)
    real_rmtree = shutil.rmtree

    def killed_midway(path, ignore_errors=False):  # deletes one file, then the process "dies"
        path = Path(path)
        victims = sorted(p for p in path.iterdir() if p.name != ckpt.MARKER)
        victims[0].unlink()
        raise KeyboardInterrupt("killed while pruning")

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.prune_checkpoints(root, keep_last=1)
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-2"]  # step-1 is not taken as complete
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == [f".step-1.old-prune-{os.getpid()}"]
    ckpt.clean_stale(root)
    assert sorted(p.name for p in root.iterdir()) == ["step-2"]


KILL_SCRIPT = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from alignkit.atomic import atomic_dir
    from alignkit.trainers import checkpoint as ckpt
    from alignkit.trainers.rundir import acquire_run_lock, clean_stale_temporaries
    out = Path(sys.argv[1]); steps = int(sys.argv[2])
    out.mkdir(exist_ok=True)
    acquire_run_lock(out)
    clean_stale_temporaries(out)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    found = ckpt.load_newest(out / "checkpoints", model=model, optimizer=opt, scheduler=sched)
    start = found[1]["step"] if found else 0
    print("started", start, flush=True)
    for step in range(start + 1, steps + 1):
        model(torch.randn(2, 256)).sum().backward(); opt.step(); opt.zero_grad(); sched.step()
        ckpt.save_checkpoint(out / "checkpoints", step, model=model, optimizer=opt, scheduler=sched,
                             stage_state={}, config_yaml="")
        ckpt.prune_checkpoints(out / "checkpoints", keep_last=1)
        if step % 4 == 0 or step == steps:  # a `final/` of a few files, written atomically, now and then
            with atomic_dir(out / "final") as tmp:
                for j in range(4):
                    (tmp / f"part-{j}.bin").write_bytes(bytes(2_000_000))
    print("done", flush=True)
""")


@pytest.mark.slow  # ~20-40 s: a handful of Python + torch start-ups
def test_repeated_kill_9_during_pruning_and_final_then_resume(tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "train.py"
    script.write_text(KILL_SCRIPT)
    rng = random.Random(0)
    steps = 60
    leftovers: list[str] = []  # what kills cut short: evidence that they landed mid-write
    for _ in range(8):
        proc = subprocess.Popen([sys.executable, str(script), str(out), str(steps)], stdout=subprocess.PIPE, text=True)
        line = proc.stdout.readline()
        assert line.startswith("started"), line
        time.sleep(rng.uniform(0.02, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        leftovers += [p.name for p in [*out.glob(".final.*"), *(out / "checkpoints").glob(".*")]]
        # What a resume would take as complete must be whole (checked file by file), never half-deleted.
        for path in ckpt.list_checkpoints(out / "checkpoints"):
            ckpt.verify_checkpoint(path)
    res = subprocess.run([sys.executable, str(script), str(out), str(steps)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    print("cut short by the kills:", leftovers)
    assert leftovers, "no kill landed during a write: the test proved nothing"
    assert "done" in res.stdout and "skipping" not in res.stderr
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == [f"step-{steps}"]
    assert sorted(p.name for p in out.iterdir()) == [".lock", "checkpoints", "final"]  # no `.final.tmp-*` left
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step-{steps}"]


FINAL_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from alignkit.atomic import atomic_dir
    from alignkit.trainers.rundir import acquire_run_lock, clean_stale_temporaries
    out = Path(sys.argv[1]); generations = int(sys.argv[2])
    out.mkdir(exist_ok=True)
    acquire_run_lock(out)
    clean_stale_temporaries(out)
    print("started", flush=True)
    for gen in range(generations):  # nothing but `final/` writes: every kill lands in or between them
        with atomic_dir(out / "final") as tmp:
            for j in range(4):
                (tmp / f"part-{j}.bin").write_bytes(bytes([gen % 256]) * 1_000_000)
    print("done", flush=True)
""")


def assert_final_whole(final: Path) -> None:
    """`final/` is one generation's four whole files (or absent): never a mix, never a torn file."""
    if not final.exists():
        return
    parts = sorted(final.iterdir())
    assert [p.name for p in parts] == [f"part-{j}.bin" for j in range(4)]
    contents = {p.read_bytes() for p in parts}
    assert len(contents) == 1 and len(next(iter(contents))) == 1_000_000


@pytest.mark.slow  # ~20 s: ten Python start-ups
def test_repeated_kill_9_during_final_never_leaves_a_torn_final(tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "final.py"
    script.write_text(FINAL_SCRIPT)
    rng = random.Random(1)
    cut_short = 0
    for _ in range(10):
        proc = subprocess.Popen([sys.executable, str(script), str(out), "100000"], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().startswith("started")
        time.sleep(rng.uniform(0.05, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        cut_short += any(out.glob(".final.*"))
        assert_final_whole(out / "final")
    assert cut_short >= 5, f"only {cut_short} of 10 kills landed during a `final/` write: the test proved little"
    res = subprocess.run([sys.executable, str(script), str(out), "1"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "done" in res.stdout, res.stderr
    assert_final_whole(out / "final")
    assert sorted(p.name for p in out.iterdir()) == [".lock", "final"]  # no `.final.tmp-*` / `.final.old-*`


def test_every_processs_rng_file_decides_which_checkpoint_all_processes_load(tmp_path, capsys):
    root = tmp_path / "checkpoints"
    two_checkpoints(root)
    for step in (1, 2):  # a second process's RNG state in each
        for suffix in (".safetensors", ".json"):
            shutil.copy(root / f"step-{step}" / f"rng-0{suffix}", root / f"step-{step}" / f"rng-1{suffix}")
    truncate(root / "step-2" / "rng-1.safetensors")
    for rank in (0, 1):  # process 0 skips step-2 too, though its own file is whole
        model, opt, sched = make_state(seed=5)
        path, _ = ckpt.load_newest(root, model=model, optimizer=opt, scheduler=sched, rank=rank)
        assert path == root / "step-1"
    assert "rng-1.safetensors" in capsys.readouterr().err


# -- a full disk: one line, the previous checkpoint intact, resume works once space is freed -------
def enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    model, opt, sched = make_state()
    train_step(model, opt, sched)
    write(root, 1, model, opt, sched)
    train_step(model, opt, sched)
    real_save_file = ckpt.save_file

    def full_at_optimizer(tensors, filename, *args, **kwargs):
        if Path(filename).name == "optimizer.safetensors":
            enospc()
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", full_at_optimizer)
    with pytest.raises(AlignkitError) as err:
        write(root, 2, model, opt, sched)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"disk full while writing checkpoint step-2 to {root / '.tmp-step-2'}")
    assert "it needs about 1.1 KiB" in msg and "free there" in msg  # 90 float32 weights and their 2 Adam moments
    assert f"the previous checkpoint {root / 'step-1'} is intact" in msg and "--run.resume" in msg
    assert sorted(p.name for p in root.iterdir()) == ["step-1"]  # the temporary directory is gone
    monkeypatch.setattr(ckpt, "save_file", real_save_file)  # space freed
    write(root, 2, model, opt, sched)
    path, state = ckpt.load_newest(root, model=model, optimizer=opt, scheduler=sched)
    assert path.name == "step-2" and state["step"] == 2


def test_a_full_disk_reported_without_errno_is_recognised(tmp_path, monkeypatch):
    # safetensors' own writer raises its Rust error with the OS message and no errno.
    root = tmp_path / "checkpoints"
    model, opt, sched = make_state()

    def rust_error(*_a, **_k):
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                           "message: \"No space left on device\" })")

    monkeypatch.setattr(ckpt, "save_model", rust_error)
    with pytest.raises(AlignkitError, match=r"^disk full while writing checkpoint step-1 .*no earlier checkpoint"):
        write(root, 1, model, opt, sched)


def test_a_full_disk_while_logging_metrics_is_one_line(tmp_path, monkeypatch):
    logger = rundir.MetricsLogger(tmp_path, enabled=True)
    logger.log(1, {"loss": 1.0})
    two_checkpoints(tmp_path / "checkpoints")
    monkeypatch.setattr(rundir, "open", enospc, raising=False)
    with pytest.raises(AlignkitError) as err:
        logger.log(2, {"loss": 0.5})
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"disk full while writing the metrics of step 2 to {logger.path}: ")
    assert msg.endswith(f"free there; the newest checkpoint {tmp_path / 'checkpoints' / 'step-2'} is intact: free "
                        "space and rerun with --run.resume")


def test_a_full_disk_at_metrics_before_any_checkpoint_says_the_run_cannot_be_resumed(tmp_path, monkeypatch, capsys):
    logger = rundir.MetricsLogger(tmp_path, enabled=True)  # e.g. run.save_every 0: no checkpoint, ever
    logger.log(1, {"loss": 1.0})
    (tmp_path / "checkpoints" / ".tmp-step-2").mkdir(parents=True)  # an unfinished one is no checkpoint
    monkeypatch.setattr(rundir, "open", enospc, raising=False)
    with pytest.raises(AlignkitError) as err:
        logger.log(2, {"loss": 0.5})
    msg = str(err.value)
    assert "checkpoints are intact" not in msg and "--run.resume" not in msg
    assert msg.endswith("free there; no checkpoint has been written yet (see --run.save_every), so the run cannot be "
                        "resumed: free space and run it again")
    monkeypatch.undo()
    with open(logger.path, "a") as fh:
        fh.write('{"step": 2, "lo')  # the torn line the full disk left
    rundir.MetricsLogger(tmp_path, enabled=True, resume_step=0)  # `--run.resume` finds no checkpoint
    err = capsys.readouterr().err
    assert "dropped 1 unreadable line(s)" in err and "checkpoint's steps are kept" not in err
    assert "no checkpoint to resume from, so the file starts again" in err
    assert logger.path.read_text() == ""


def test_a_full_disk_at_final_saves_the_weights_to_the_fallback(tmp_path, monkeypatch):
    out = tmp_path / "run"
    spare = tmp_path / "spare"
    spare.mkdir()
    monkeypatch.setattr(rundir.tempfile, "tempdir", str(spare))
    args = ["--output-dir", str(out), "--optim.max_steps", "1", "--run.report_to", "[]", "--run.progress", "false"]
    model = build_tiny_llama(50)
    loop = TrainLoop("test", resolve_config(PretrainConfig, None, args), model)
    loop.resume()
    real_fsync_tree = atomic.fsync_tree

    def full_in_run_dir(path):  # the run dir's filesystem is full; the fallback's is not
        if Path(path).is_relative_to(out):
            enospc()
        real_fsync_tree(path)

    monkeypatch.setattr(atomic, "fsync_tree", full_in_run_dir)
    with pytest.raises(AlignkitError) as err:
        loop.finish(None, {})
    fallback = rundir.final_fallback_dir(out)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"disk full while writing the final model to {out / 'final'}")
    assert f"saved instead to {fallback}" in msg and f"mv {fallback} {out / 'final'}" in msg
    assert fallback.parent == spare and (fallback / "model.safetensors").is_file()
    assert not (out / "final").exists() and not list(out.glob(".final.*"))

    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(fallback)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_a_full_disk_everywhere_at_final_says_the_weights_are_lost(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir.tempfile, "tempdir", str(tmp_path))
    with pytest.raises(AlignkitError, match=r"^disk full while writing the final model .*fallback .* failed too.*"
                                            r"--run.save_every"):
        rundir.save_final(enospc, tmp_path / "run")


class _Payload:
    """Unpickling this creates `path`: the proof that a pickle ran."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_pickles_dropped_into_a_checkpoint_never_run_on_resume(tmp_path):
    """A checkpoint is safetensors + JSON only: pickle files planted in it are never opened."""
    import pickle

    root = tmp_path / "checkpoints"
    two_checkpoints(root)
    marker = tmp_path / "PICKLE_RAN"
    for name in ("optimizer.pt", "pytorch_model.bin", "scheduler.pt", "rng_state.pth", "trainer_state.pkl"):
        (root / "step-2" / name).write_bytes(pickle.dumps(_Payload(marker)))
    torch.save({"x": _Payload(marker)}, root / "step-2" / "training_args.bin")
    model, opt, sched = make_state(seed=5)
    path, state = ckpt.load_newest(root, model=model, optimizer=opt, scheduler=sched)
    assert path == root / "step-2" and state["step"] == 2
    assert not marker.exists()
    pickle.loads((root / "step-2" / "optimizer.pt").read_bytes())  # the payload is live: unpickled, it runs
    assert marker.exists()
