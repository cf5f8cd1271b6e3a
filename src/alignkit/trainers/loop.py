"""The shared training loop pieces: optimizer step with exact accumulation, checkpoints, logging.

Every stage owns a plain loop built from `TrainLoop`:

    loop = TrainLoop("sft", cfg, model, n_examples=len(examples))
    loop.print_plan(n_examples=..., tokens_per_step=...)
    start = loop.resume()                         # 0, or the checkpoint's step
    for step in range(start, loop.total_steps):
        micro = [collate(ids) for ids in loop.micro_batch_indices(n_examples, step)]
        metrics = loop.update(micro, loss_fn)     # one optimizer step
        loop.end_step(metrics)                    # log, checkpoint, progress bar
    loop.finish(tokenizer, summary)

Batches: `loss_fn(model, batch) -> (loss_sum, metrics)` returns the SUM of the per-term losses of
the micro-batch and `batch["n_terms"]` says how many terms (e.g. response tokens) it holds. The
optimizer step divides by the number of terms of the whole accumulated batch over all processes,
so 1 x 8, 4 x 2 and 8 x 1 (micro-batch x accumulation) give the same gradient, and so does the
same global batch split over several processes.

Data position: the example order is a seeded permutation per epoch, and the examples of optimizer
step `s` are a pure function of `s` (see `global_batch_indices`), so a checkpoint's step fixes
where the data resumes.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

from alignkit.accel import resolve
from alignkit.data.collate import to_device
from alignkit.errors import AlignkitError
from alignkit.models.load import remote_code_plan
from alignkit.models.save import save_pretrained_atomic
from alignkit.trainers import checkpoint as ckpt
from alignkit.trainers.rundir import (
    MetricsLogger,
    config_yaml,
    prepare_run_dir,
    record_resume,
    release_run_lock,
    resolve_output_dir,
    save_final,
    write_json_atomic,
)


def clip_grad_norm(acc: Accelerator, parameters: Any, max_norm: float) -> torch.Tensor:
    """`acc.clip_grad_norm_`, without its multiply by 1 when the norm is within `max_norm`.

    torch scales every gradient by min(max_norm / (norm + 1e-6), 1) even when that is exactly 1 (to
    avoid a device sync); on CPU that multiply reads and writes every gradient for nothing (~3 ms
    of a 76 ms bench SFT step). Plain gradients outside FSDP/DeepSpeed/XLA get the same norm from
    `torch.nn.utils.get_total_norm` and the same scaling when the factor is not 1 (NaN included),
    so the gradients are bit-identical; anything else goes to accelerate.
    """
    parameters = list(parameters)  # accelerate gets them all: FSDP compares them with the model's
    params = [p for p in parameters if p.grad is not None]
    plain = acc.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
    if not plain or any(type(p.grad) is not torch.Tensor for p in params):  # e.g. DTensor gradients
        return acc.clip_grad_norm_(parameters, max_norm)
    acc.unscale_gradients()  # fp16 loss scaling, as accelerate does first
    total = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
    if not bool(torch.clamp(max_norm / (total + 1e-6), max=1.0) == 1.0):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def global_batch_indices(n_examples: int, global_batch: int, step: int, seed: int) -> list[int]:
    """Example indices of optimizer step `step`: a window over concatenated seeded permutations."""
    if n_examples <= 0:
        raise AlignkitError("no training examples")
    start = step * global_batch
    out: list[int] = []
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), n_examples)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n_examples, generator=gen).tolist()
        out.extend(perm[offset : offset + global_batch - len(out)])
    return out


def shard_indices(indices: list[int], micro: int, accum: int, world: int, rank: int) -> list[list[int]]:
    """This process's micro-batches: chunk `a * world + rank` of the global batch for each a."""
    return [indices[(a * world + rank) * micro : (a * world + rank + 1) * micro] for a in range(accum)]


def eval_batch_indices(n_items: int, batch_size: int, world: int, rank: int) -> list[tuple[list[int], bool]]:
    """This process's held-out batches as (item indices, counted), the same number on every process.

    Items rank, rank + world, ... are this process's, in batches of `batch_size`. Every process gets
    ceil(ceil(n_items / world) / batch_size) batches: one whose share is shorter (fewer items than
    processes, or an uneven split) gets padding batches `([0], False)` for the rest. They run the
    forward pass like the others but their loss is not counted, because a forward pass of a wrapped
    model holds collectives (DDP's buffer broadcast, FSDP's and ZeRO-3's parameter gathers) that
    every process must reach, as it must the final reduction. No items: no batches anywhere.
    """
    if n_items <= 0:
        return []
    n_batches = math.ceil(math.ceil(n_items / world) / batch_size)
    mine = list(range(rank, n_items, world))
    out = [(mine[i : i + batch_size], True) for i in range(0, len(mine), batch_size)]
    return out + [([0], False)] * (n_batches - len(out))


def build_optimizer(model: torch.nn.Module, optim: Any) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; a model with `optimizer_groups(lr)` (a list of AdamW
    parameter groups, e.g. a value model with its own learning rate) chooses its groups."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise AlignkitError("the model has no trainable parameters")
    groups = model.optimizer_groups(optim.lr) if hasattr(model, "optimizer_groups") else params
    # The fused kernel (one pass per parameter instead of ~10 foreach passes over all of them) is
    # 3-5x faster on CPU and the same update up to float rounding; torch has it for float params on
    # CPU and CUDA.
    fused = all(p.dtype.is_floating_point and p.device.type in {"cpu", "cuda"} for p in params)
    return torch.optim.AdamW(
        groups, lr=optim.lr, betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_eps,
        weight_decay=optim.weight_decay, fused=fused or None,
    )


def lr_factor(step: int, *, warmup: int, total: int, kind: str) -> float:
    """Learning-rate multiplier: linear warm-up from 0, then constant / linear / cosine decay to 0."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class TrainLoop:
    """Owns the accelerator, optimizer, scheduler, checkpoints, logging and progress of one run."""

    def __init__(self, stage: str, cfg: Any, model: torch.nn.Module, *, n_examples: int = 0,
                 total_steps: int | None = None):
        self.stage, self.cfg = stage, cfg
        self.out_dir: Path = resolve_output_dir(stage, cfg.run.output_dir)
        # Without a GPU, cpu=True makes `accelerate launch --multi_gpu --num_processes N` (or torchrun)
        # run N CPU processes with the gloo backend instead of N independent single-process runs.
        # Experiment trackers (`run.report_to`) keep their local files in the run dir; the logger starts them.
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), project_dir=str(self.out_dir),
                                       log_with=MetricsLogger.trackers(cfg.run.report_to) or None)
        acc = self.accelerator
        self.backend = resolve(cfg.run.accel, acc.device.type)  # how fast: alignkit.accel
        self.backend.prepare_process()
        if total_steps is None:  # optim.max_steps, else optim.epochs over the global batch
            total_steps = cfg.optim.max_steps or max(1, math.ceil(cfg.optim.epochs * n_examples / self.global_batch))
        self.total_steps = total_steps
        self._resume_changes: dict[str, tuple[Any, Any]] = {}  # the overrides to record once resumed
        if acc.is_main_process:  # locks the dir; on resume, config.yaml is written once a checkpoint loads
            self._resume_changes = prepare_run_dir(self.out_dir, cfg, resume=cfg.run.resume, check_config=True)
        acc.wait_for_everyone()
        set_seed(cfg.run.seed)
        optim = cfg.optim
        optimizer = build_optimizer(model, optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: lr_factor(s, warmup=optim.warmup_steps, total=self.total_steps, kind=optim.scheduler),
        )
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.step = 0
        self.stage_state: dict = {}
        self.logger: MetricsLogger | None = None
        self._bar = None
        self._t0 = time.perf_counter()

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def global_batch(self) -> int:
        o = self.cfg.optim
        return o.per_device_batch_size * o.grad_accum_steps * self.world

    def micro_batch_indices(self, n_examples: int, step: int) -> list[list[int]]:
        o = self.cfg.optim
        indices = global_batch_indices(n_examples, self.global_batch, step, self.cfg.run.seed)
        return shard_indices(indices, o.per_device_batch_size, o.grad_accum_steps, self.world,
                             self.accelerator.process_index)

    def eval_batches(self, items: Sequence[Any], collate: Callable[[list], dict], batch_size: int) -> list[dict]:
        """This process's share of the held-out `items`, collated and on the device, for `evaluate`.

        Every process gets the same number of batches (`eval_batch_indices`); a padding batch has
        `n_terms` 0 and `padding` True, so `evaluate` runs its forward pass and does not count it.
        """
        out = []
        for indices, counted in eval_batch_indices(len(items), batch_size, self.world,
                                                   self.accelerator.process_index):
            batch = collate([items[i] for i in indices])
            if not counted:
                batch = {**batch, "n_terms": 0, "padding": True}
            out.append(to_device(batch, self.accelerator.device))
        return out

    def print_plan(self, *, n_examples: int, extra: dict[str, Any] | None = None) -> None:
        """Print batch sizes, steps, epochs and data size before step 0."""
        o = self.cfg.optim
        lines = [
            f"[{self.stage}] run dir: {self.out_dir}",
            f"  batch: {o.per_device_batch_size} per device x {o.grad_accum_steps} accumulation x "
            f"{self.world} device(s) = {self.global_batch} examples per optimizer step",
            f"  data: {n_examples} training examples; {self.total_steps} optimizer steps = "
            f"{self.total_steps * self.global_batch / max(1, n_examples):.2f} epochs",
        ]
        extra = dict(extra or {})
        model = getattr(self.cfg, "model", None)
        if "remote code" not in extra and model is not None:  # stages with more models say it themselves
            extra["remote code"] = remote_code_plan({"model": (model.name_or_path, model.trust_remote_code)})
        lines += [f"  {k}: {v}" for k, v in extra.items()]
        lines.append(f"  accel: {self.backend.describe()} (option run.accel={self.cfg.run.accel})")
        self.accelerator.print("\n".join(lines))

    # -- resume / checkpoint -------------------------------------------------------------------
    def resume(self) -> int:
        """Restore the newest complete checkpoint when `run.resume`; return the step to start at.

        Only once it has loaded are the run's `config.yaml` and its record of overridden fields written
        (`record_resume`): a resume that fails (every checkpoint torn, a model that does not fit) raises
        and leaves them as they were.
        """
        start = 0
        if self.cfg.run.resume:
            model = getattr(self.cfg, "model", None)
            found = ckpt.load_newest(  # skips (with a warning) a newest checkpoint whose files are torn
                self.out_dir / "checkpoints", model=self.accelerator.unwrap_model(self.model),
                optimizer=self.optimizer, scheduler=self.scheduler, rank=self.accelerator.process_index,
                model_name=getattr(model, "name_or_path", None),
            )
            if found:
                path, state = found
                start, self.stage_state = state["step"], state["stage"]
                ckpt.apply_lr_override(path, self.cfg.optim.lr, self.optimizer, self.scheduler)
            if self.accelerator.is_main_process:  # a fresh start records no override: nothing was resumed
                record_resume(self.out_dir, self.cfg, self._resume_changes if found else {})
            if found:
                self.accelerator.print(f"[{self.stage}] resumed from {path} (step {start})")
            else:
                self.accelerator.print(f"[{self.stage}] --resume: no checkpoint in {self.out_dir}, starting fresh")
        self.step = start
        self.logger = MetricsLogger(
            self.out_dir, enabled=self.accelerator.is_main_process, accelerator=self.accelerator,
            report_to=self.cfg.run.report_to, config=self.cfg, resume_step=start,
        )
        if self.cfg.run.progress and self.accelerator.is_local_main_process:
            self._bar = tqdm(total=self.total_steps, initial=start, desc=self.stage, dynamic_ncols=True)
        return start

    def save_checkpoint(self) -> None:
        acc = self.accelerator
        root = self.out_dir / "checkpoints"
        ckpt.save_checkpoint(
            root, self.step, model=acc.unwrap_model(self.model), optimizer=self.optimizer,
            scheduler=self.scheduler, stage_state=self.stage_state, config_yaml=config_yaml(self.cfg),
            rank=acc.process_index, is_main=acc.is_main_process, barrier=acc.wait_for_everyone,
        )
        if acc.is_main_process:
            ckpt.prune_checkpoints(root, self.cfg.run.keep_last)

    # -- the optimizer step --------------------------------------------------------------------
    def update(self, micro_batches: list[dict], loss_fn: Any, *, advance: bool = True) -> dict[str, float]:
        """Forward/backward every micro-batch, then one optimizer step; returns logged metrics.

        Metrics: `loss/total` (the token/term mean of the summed loss over all micro-batches and
        processes), `optim/grad_norm` (before clipping), `optim/lr`, `optim/skipped` (1.0 on a skipped
        non-finite step), and the loss function's own metrics (micro-batch means).

        With `advance=False` the step is one of several optimizer steps of a single training step
        (e.g. PPO's epochs x minibatches over one rollout batch): neither the step counter nor the
        learning-rate schedule moves; call `advance()` once after the last of them.
        """
        acc = self.accelerator
        local_terms = torch.tensor(float(sum(b["n_terms"] for b in micro_batches)), device=acc.device)
        total_terms = acc.reduce(local_terms, "sum").item()
        scale = self.world / max(total_terms, 1.0)  # DDP averages gradients over processes
        loss_total = torch.zeros((), device=acc.device)
        extra: dict[str, list[torch.Tensor]] = {}
        for i, batch in enumerate(micro_batches):
            sync = i == len(micro_batches) - 1
            with contextlib.nullcontext() if sync else acc.no_sync(self.model):
                loss_sum, metrics = loss_fn(self.model, batch)
                acc.backward(loss_sum * scale)
            loss_total += loss_sum.detach().float()
            for k, v in metrics.items():
                extra.setdefault(k, []).append(torch.as_tensor(v, dtype=torch.float32, device=acc.device))
        max_norm = self.cfg.optim.max_grad_norm or float("inf")
        grad_norm = clip_grad_norm(acc, self.model.parameters(), max_norm)
        loss = acc.reduce(loss_total, "sum").item() / max(total_terms, 1.0)
        bad = acc.reduce(torch.tensor(float(not (math.isfinite(loss) and torch.isfinite(grad_norm))),
                                      device=acc.device), "sum").item()
        out = {"loss/total": loss, "optim/grad_norm": float(grad_norm),
               "optim/lr": self.scheduler.get_last_lr()[0]}
        if advance:
            self.step += 1
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            self._on_nonfinite(loss, float(grad_norm))
            out["optim/skipped"] = 1.0
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if advance:
            self.scheduler.step()
        out.update({k: acc.reduce(torch.stack(v).mean(), "mean").item() for k, v in extra.items()})
        return out

    def advance(self) -> None:
        """End a step made of several `update(..., advance=False)` calls: the counter and LR schedule move on."""
        self.step += 1
        self.scheduler.step()

    def _on_nonfinite(self, loss: float, grad_norm: float) -> None:
        msg = (f"non-finite loss or gradient at step {self.step} (loss={loss}, grad_norm={grad_norm}); "
               "the parameters were not updated by this step")
        if self.cfg.run.on_nonfinite == "stop":
            self.close()
            raise AlignkitError(msg + ". Lower optim.lr, check the data, or pass --run.on_nonfinite skip")
        # counted in the checkpointed stage state, so a resumed run's summary still has every skip
        self.stage_state["skipped_steps"] = self.stage_state.get("skipped_steps", 0) + 1
        self.accelerator.print(f"[{self.stage}] warning: {msg}; step skipped")

    def end_step(self, metrics: dict[str, float], *, force_log: bool = False) -> None:
        """Log (every `log_every`), checkpoint (every `save_every`) and advance the progress bar."""
        run = self.cfg.run
        if force_log or self.step % max(1, run.log_every) == 0 or self.step == self.total_steps:
            metrics = {**metrics, "time/elapsed_s": time.perf_counter() - self._t0}
            self.logger.log(self.step, metrics)
        if run.save_every and self.step % run.save_every == 0 and self.step < self.total_steps:
            self.save_checkpoint()
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{metrics.get('loss/total', float('nan')):.4f}", refresh=False)

    def log(self, metrics: dict[str, Any]) -> None:
        """Log extra metrics (e.g. eval) at the current step."""
        self.logger.log(self.step, metrics)

    # -- the end -------------------------------------------------------------------------------
    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.logger is not None:
            self.logger.close()

    def finish(self, tokenizer: Any, summary: dict[str, Any], *, merge_lora: bool = True,
               model: torch.nn.Module | None = None) -> dict[str, Any]:
        """Save `final/` (HF format; LoRA adapters merged unless `merge_lora=False`) and `summary.json`.

        `model` is the model saved in `final/` (default: the trained model); e.g. the policy of an
        actor-critic pair whose wrapper is what the loop trains.
        """
        self.close()
        acc = self.accelerator
        acc.wait_for_everyone()
        summary = {"stage": self.stage, "steps": self.step, "output_dir": str(self.out_dir),
                   "final_dir": str(self.out_dir / "final"),
                   "wall_time_s": time.perf_counter() - self._t0, "accel": self.backend.describe(),
                   "skipped_steps": self.stage_state.get("skipped_steps", 0), **summary}
        if acc.is_main_process:
            final_model = model if model is not None else acc.unwrap_model(self.model)
            save_final(lambda d: save_pretrained_atomic(final_model, tokenizer, d, merge_lora=merge_lora),
                       self.out_dir, need_bytes=sum(p.numel() * p.element_size() for p in final_model.parameters()))
            write_json_atomic(self.out_dir / "summary.json", summary)
            release_run_lock(self.out_dir)
        acc.wait_for_everyone()
        return summary


def evaluate(loop: TrainLoop, batches: list[dict], loss_fn: Any) -> float:
    """Sum of per-term losses over `batches` / number of terms, over all processes.

    Every process must call it with the same number of batches (`TrainLoop.eval_batches` pads them):
    each forward pass and the final reduction are collectives. Padding batches are not counted.
    """
    acc = loop.accelerator
    model = loop.model
    model.eval()
    total = torch.zeros((), device=acc.device)
    terms = torch.zeros((), device=acc.device)
    with torch.no_grad():
        for batch in batches:
            loss_sum, _ = loss_fn(model, batch)
            if not batch.get("padding"):
                total += loss_sum.float()
                terms += batch["n_terms"]
    model.train()
    both = acc.reduce(torch.stack([total, terms]), "sum")  # one collective for both sums
    return (both[0] / both[1].clamp(min=1)).item()
