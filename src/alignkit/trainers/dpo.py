"""`alignkit dpo`: direct preference optimisation and its variants, offline or online (iterative).

DPO (Rafailov et al. 2023; Xiao & Zhu Sec. 10.4.2) trains the policy on preferences through the
implicit reward r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)) (Eq. 10.80), minimising the
Bradley-Terry loss -log Sigmoid(r(x, y_c) - r(x, y_r)) (Eq. 10.81-10.82). `loss` picks the variant
from `alignkit.losses.preference.PREFERENCE_LOSSES`: sigmoid (DPO), ipo, cdpo, simpo, orpo,
kto (unpaired desirable/undesirable examples) and plackett_luce (DPO over K-way rankings).

One step: the responses of a batch of groups (chosen and rejected, or a ranking) share their
tokenized prompt and go through the policy in one concatenated forward pass (`dpo_data`); their
sequence log-probs log pi(y|x) = sum_t log pi(y_t|x, y_<t) and the reference's (computed on the fly,
or once before training with `precompute_ref`) feed the loss. The reference is the initial policy,
or with LoRA the same model with its adapters disabled (no second copy in memory).

Online DPO (`rounds` > 0): each round samples `samples_per_prompt` responses to training prompts
from the current policy, has a labeler (a scorer: `gold:<world>` or a reward model, with
Bradley-Terry noise `label_tau`) answer them as pairs (rankings for plackett_luce), and trains on
them. Evaluation (before training, every `run.eval_every` steps and at the end): the held-out
preference loss and accuracy, and, with `world` set, the policy's gold reward, KL to the reference,
length and distinct-n on held-out prompts (`alignkit.rollout.evaluate`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from alignkit.accel import Backend
from alignkit.config import DataConfig, ModelConfig, OptimConfig, RunConfig, SamplingConfig, require_world
from alignkit.data.collate import to_device
from alignkit.data.formats import choose_format, print_report, validate_records
from alignkit.data.load import load_records, split_records
from alignkit.data.preference_groups import (
    collate_preference_groups,
    mismatched_groups,
    tokenize_preference_groups,
)
from alignkit.errors import AlignkitError
from alignkit.losses.preference import PREFERENCE_LOSSES
from alignkit.models.load import load_causal_lm, load_tokenizer, remote_code_plan
from alignkit.rollout.evaluate import evaluate_policy
from alignkit.rollout.score import load_scorer
from alignkit.trainers.dpo_forward import (
    Reference,
    kto_log_ratio_sum,
    kto_reference_point,
    response_logps,
    set_kto_reference_point,
)
from alignkit.trainers.loop import TrainLoop
from alignkit.trainers.online_dpo import online_inputs, sample_round

REFERENCE_FREE = ("simpo", "orpo")
"""Losses that never read the reference log-probs (so no reference forward pass is run)."""


@dataclass
class DPOConfig:
    """Direct preference optimisation (DPO, IPO, cDPO, SimPO, ORPO, KTO, Plackett-Luce), offline or online."""

    LIMITS: ClassVar[dict[str, str]] = {
        "beta": "> 0", "label_smoothing": "[0, 0.5)", "kto_desirable_weight": ">= 0", "kto_undesirable_weight": ">= 0",
        "eval_prompts": ">= 0", "rounds": ">= 0", "prompts_per_round": ">= 1", "samples_per_prompt": ">= 2",
        "label_tau": ">= 0"}

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(eval_fraction=0.05))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-6, warmup_steps=10))
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    loss: Literal["sigmoid", "ipo", "cdpo", "simpo", "orpo", "kto", "plackett_luce"] = "sigmoid"
    """The loss: sigmoid (DPO), ipo, cdpo, simpo, orpo, kto (unpaired data) or plackett_luce (rankings)."""
    beta: float = 0.1
    """KL strength beta of the implicit reward beta * log(pi / pi_ref) (IPO's tau; SimPO's beta; ORPO's lambda)."""
    ipo_per_token: bool = False
    """ipo: divide each response's log-probs by its token count (TRL's form), so the target gap 1/(2 beta) is
    per token; default: summed log-probs (Azar et al. 2023, Eq. 17; OpenRLHF), a gap in total nats."""
    label_smoothing: float = 0.0
    """cdpo: probability that a preference label is flipped (below 0.5: at 0.5 the labels carry nothing)."""
    simpo_gamma: float = 0.5
    """simpo: target reward margin gamma."""
    kto_desirable_weight: float = 1.0
    """kto: weight lambda_D of desirable examples."""
    kto_undesirable_weight: float = 1.0
    """kto: weight lambda_U of undesirable examples."""
    ref_model: str = ""
    """Reference model directory; default: the initial policy (with LoRA: the base, adapters disabled)."""
    ref_trust_remote_code: bool = False
    """Run the Python code shipped with `ref_model` (its own switch: `model.trust_remote_code` covers only the
    policy, and a reference that is the initial policy). Only for repositories you trust."""
    precompute_ref: bool = False
    """Compute the reference log-probs once over the data before training (then free the reference)."""
    truncation: Literal["left", "drop"] = "left"
    """Groups longer than `data.max_length`: cut the shared prompt from the left (then response ends), or drop."""
    world: str = ""
    """A built world (e.g. `sentiment`): held-out prompts and gold scorer for evaluation, train prompts online."""
    eval_prompts: int = 256
    """Held-out prompts sampled at each evaluation (gold reward, KL, length); 0: none."""
    rounds: int = 0
    """Online DPO rounds (0: offline, on `data.path`); each round trains `optim.max_steps` (or `optim.epochs`)."""
    prompts_per_round: int = 512
    """Online: training prompts sampled per round (from `prompts_path`, else the world's train prompts)."""
    samples_per_prompt: int = 2
    """Online: responses sampled per prompt (2 for pairs; K >= 2 ranked for plackett_luce)."""
    prompts_path: str = ""
    """Online: file of `{prompt}` records; default: the world's train prompts."""
    labeler: str = ""
    """Online: scorer that labels the samples, `gold:<world>` or a reward model directory; default `gold:<world>`."""
    label_tau: float = 0.0
    """Online: Bradley-Terry noise temperature of the labeler (0: the higher score always wins)."""


# ---------------------------------------------------------------------------------------------
# Forward pass and loss
# ---------------------------------------------------------------------------------------------


@dataclass
class GroupLogps:
    """Log-probs of a batch of groups: policy, reference (None when reference-free), lengths, masks."""

    policy: torch.Tensor  # B×K sequence log-probs
    ref: torch.Tensor | None  # B×K
    n_tokens: torch.Tensor  # B×K response tokens
    mask: torch.Tensor  # B×K bool, False for filler slots
    labels: torch.Tensor | None  # B bool (KTO)
    kto_z0: torch.Tensor | None = None  # scalar: KTO's reference point of the global batch

    @property
    def avg(self) -> torch.Tensor:
        """Length-normalised log-probs (1/|y|) log pi(y|x), B×K."""
        return self.policy / self.n_tokens.clamp(min=1)


def _kto_inputs(s: GroupLogps, cfg: DPOConfig) -> dict:
    return dict(policy_logps=s.policy[:, 0], ref_logps=s.ref[:, 0], labels=s.labels, beta=cfg.beta,
                kl_ref=s.kto_z0, desirable_weight=cfg.kto_desirable_weight,
                undesirable_weight=cfg.kto_undesirable_weight)


def _pair(s: GroupLogps) -> dict:
    return dict(policy_chosen=s.policy[:, 0], policy_rejected=s.policy[:, 1], ref_chosen=s.ref[:, 0],
                ref_rejected=s.ref[:, 1])


def _per_token_pair(s: GroupLogps) -> dict:
    n = s.n_tokens.clamp(min=1)
    return dict(policy_chosen=s.avg[:, 0], policy_rejected=s.avg[:, 1], ref_chosen=s.ref[:, 0] / n[:, 0],
                ref_rejected=s.ref[:, 1] / n[:, 1])


LOSS_INPUTS: dict[str, Callable[[GroupLogps, DPOConfig], dict]] = {
    "sigmoid": lambda s, c: dict(**_pair(s), beta=c.beta),
    "ipo": lambda s, c: dict(**(_per_token_pair(s) if c.ipo_per_token else _pair(s)), beta=c.beta),
    "cdpo": lambda s, c: dict(**_pair(s), beta=c.beta, label_smoothing=c.label_smoothing),
    "simpo": lambda s, c: dict(chosen_avg_logps=s.avg[:, 0], rejected_avg_logps=s.avg[:, 1], beta=c.beta,
                               gamma=c.simpo_gamma),
    "orpo": lambda s, c: dict(chosen_avg_logps=s.avg[:, 0], rejected_avg_logps=s.avg[:, 1],
                              chosen_nll=-s.avg[:, 0], beta=c.beta),
    "kto": _kto_inputs,
    "plackett_luce": lambda s, c: dict(policy_logps=s.policy, ref_logps=s.ref, beta=c.beta, mask=s.mask),
}
"""Loss name -> the keyword arguments of `PREFERENCE_LOSSES[name]` from a batch's log-probs."""


def make_loss_fn(cfg: DPOConfig, reference: Reference | None,
                 backend: Backend) -> Callable[[Any, dict], tuple[torch.Tensor, dict]]:
    """`loss_fn(model, batch) -> (loss * B, metrics)` for `TrainLoop.update` (n_terms = B groups)."""
    loss = PREFERENCE_LOSSES[cfg.loss]

    def loss_fn(model: Any, batch: dict) -> tuple[torch.Tensor, dict]:
        policy, n_tokens = response_logps(model, batch, backend)
        ref = None
        if cfg.loss not in REFERENCE_FREE:
            ref = batch["ref_logps"].to(policy) if "ref_logps" in batch else reference.logps(batch)
        z0 = None
        if cfg.loss == "kto":  # the trainer sets z0 over the global batch; alone, a batch is its own
            z0 = batch["kto_z0"] if "kto_z0" in batch else kto_reference_point(
                kto_log_ratio_sum(model, reference, batch, backend), batch["n_terms"])
        logps = GroupLogps(policy, ref, n_tokens, batch["group_mask"], batch.get("kto_labels"), z0)
        value, metrics = loss(**LOSS_INPUTS[cfg.loss](logps, cfg))
        return value * batch["n_terms"], metrics

    return loss_fn


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def collate_groups(groups: list[dict], pad_id: int, loss: str, kl_groups: list[dict] | None = None) -> dict:
    """`collate_preference_groups`, plus for KTO the mismatched pairs of its reference point (`kl_batch`).

    `kl_groups`: those pairs when formed over a larger set (evaluation); default: within `groups`.
    """
    batch = collate_preference_groups(groups, pad_id)
    if loss == "kto":
        batch["kl_batch"] = collate_preference_groups(kl_groups or mismatched_groups(groups), pad_id)
    return batch


def _read(path: str, cfg: DPOConfig, tokenizer: Any) -> tuple[list[dict], int, int]:
    """Validated, tokenized groups of a file, the number of bad rows skipped, and of implicit prompts extracted.

    Each group has its source `row` and `first_row`, the first row with the same content (its own row
    when it repeats none).
    """
    records = load_records(path, on_bad_rows=cfg.data.on_bad_rows)[: cfg.data.limit]
    # the kinds this stage reads decide, over all rows: HuggingFaceH4's {prompt, chosen, rejected, messages} is
    # preference data, and a row lacking `rejected` is named with that field
    kind = choose_format(records, ("preference", "ranking", "unpaired"))
    report = validate_records(records, kind, path, cfg.data.on_bad_rows)
    print_report(report, path, "dpo")
    out = tokenize_preference_groups(report.records, kind, cfg.loss, tokenizer, max_length=cfg.data.max_length,
                          truncation=cfg.truncation, source=path, rows=report.rows, on_bad_rows=cfg.data.on_bad_rows)
    for g in out.groups:
        g["first_row"] = report.duplicate_of.get(g["row"], g["row"])
    return out.groups, report.n_skipped + len(out.skipped) + out.dropped, report.prompts_extracted


def load_preference_data(cfg: DPOConfig, tokenizer: Any) -> dict[str, Any]:
    """Training and held-out groups (`train`, `eval`) and `skipped` rows, from `data.path` / `data.eval_path`."""
    if not cfg.data.path:
        raise AlignkitError("option `data.path` is required (offline DPO): a file of {prompt, chosen, rejected}, "
                            "{prompt, responses} or {prompt, completion, label} records; or set `rounds` > 0")
    groups, skipped, extracted = _read(cfg.data.path, cfg, tokenizer)
    if cfg.data.eval_path:
        train, (held, more, more_extracted) = groups, _read(cfg.data.eval_path, cfg, tokenizer)
        skipped, extracted = skipped + more, extracted + more_extracted
    else:  # split by source row, so both halves of a converted record (and all copies of a row) stay on one side
        first_row = {g["row"]: g["first_row"] for g in groups}
        keep = set(split_records(sorted(first_row), cfg.data.eval_fraction, cfg.run.seed, key=first_row.get)[0])
        train = [g for g in groups if g["row"] in keep]
        held = [g for g in groups if g["row"] not in keep]
    if not train:
        raise AlignkitError(f"{cfg.data.path}: no training examples left after validation and truncation")
    duplicates = len({g["row"] for g in groups if g["first_row"] != g["row"]})
    return {"train": train, "eval": held[:512], "skipped": skipped, "prompts_extracted": extracted,
            "duplicates": duplicates}


def precompute_reference(reference: Reference, groups: list[dict], pad_id: int, batch_size: int,
                         device: torch.device) -> None:
    """Store each group's reference log-probs in `group["ref_logps"]` (one pass over the data)."""
    for start in range(0, len(groups), batch_size):
        chunk = groups[start : start + batch_size]
        batch = to_device(collate_preference_groups(chunk, pad_id), device)
        logps = reference.logps(batch).cpu()
        for g, row in zip(chunk, logps, strict=True):
            g["ref_logps"] = row[: len(g["responses"])].tolist()


# ---------------------------------------------------------------------------------------------
# Online rounds
# ---------------------------------------------------------------------------------------------


def _round_groups(loop: TrainLoop, cfg: DPOConfig, tokenizer: Any, labeler: Any, prompts: list[Any],
                  round_index: int) -> list[dict]:
    """The groups of one online round; its records are saved as `rounds/round-R.jsonl` (and reused on resume)."""
    path = loop.out_dir / "rounds" / f"round-{round_index}.jsonl"
    if path.is_file():
        records = [json.loads(line) for line in path.read_text().splitlines() if line]
    else:
        policy = loop.accelerator.unwrap_model(loop.model)
        records = sample_round(policy, cfg, tokenizer, labeler, prompts, round_index, loop.accelerator.device,
                               loop.backend)
        if loop.accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    kind = "ranking" if cfg.loss == "plackett_luce" else "preference"
    out = tokenize_preference_groups(records, kind, cfg.loss, tokenizer, max_length=cfg.data.max_length,
                          truncation=cfg.truncation, source=str(path), on_bad_rows="skip")
    if not out.groups:
        raise AlignkitError(f"online round {round_index}: no distinct, labelled samples to train on")
    return out.groups


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def preference_eval(loop: TrainLoop, batches: list[dict], loss_fn: Callable) -> dict[str, float]:
    """Held-out loss and implicit-reward metrics, averaged over groups."""
    model, totals, n = loop.model, {}, 0
    model.eval()
    with torch.no_grad():
        for batch in batches:
            loss_sum, metrics = loss_fn(model, batch)
            b = batch["n_terms"]
            for key, value in {"loss": loss_sum / b, **metrics}.items():
                totals[key] = totals.get(key, 0.0) + float(value) * b
            n += b
    model.train()
    return {f"eval/{k}": v / max(n, 1) for k, v in totals.items()}


def make_evaluator(loop: TrainLoop, cfg: DPOConfig, tokenizer: Any, reference: Reference,
                   eval_groups: list[dict], loss_fn: Callable, world: Any) -> Callable[[], dict[str, float]]:
    """`evaluate()`: held-out preference metrics, plus gold reward and KL on the world's held-out prompts."""
    device, pad = loop.accelerator.device, tokenizer.pad_token_id
    size = cfg.optim.per_device_batch_size
    # KTO: mismatched pairs over the whole held-out set (a single held-out group is paired with itself)
    kl = mismatched_groups(eval_groups) if cfg.loss == "kto" and len(eval_groups) > 1 else eval_groups
    batches = [to_device(collate_groups(eval_groups[i : i + size], pad, cfg.loss, kl[i : i + size]), device)
               for i in range(0, len(eval_groups), size)]
    prompts, gold = [], None
    if _policy_eval_on(cfg):
        prompts = world.prompts("heldout")[: cfg.eval_prompts]
        gold = load_scorer(f"gold:{cfg.world}", world=world)

    def evaluate() -> dict[str, float]:
        if cfg.loss == "kto" and batches:  # every process evaluates every held-out group: no reduction
            set_kto_reference_point(loop.accelerator.unwrap_model(loop.model), reference, batches, loop.backend)
        metrics = preference_eval(loop, batches, loss_fn) if batches else {}
        if prompts and loop.accelerator.is_main_process:

            policy = loop.accelerator.unwrap_model(loop.model)
            sampling = cfg.sampling.kwargs()
            found, samples = evaluate_policy(policy, reference, tokenizer, prompts, gold=gold, sampling=sampling,
                                             seed=cfg.run.seed, backend=loop.backend)
            metrics.update(found)
            path = loop.out_dir / "samples" / f"step-{loop.step}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
        return metrics

    return evaluate


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def _check(cfg: DPOConfig) -> None:
    if cfg.loss not in PREFERENCE_LOSSES:
        raise AlignkitError(f"option `loss`: expected one of {', '.join(PREFERENCE_LOSSES)}, got {cfg.loss!r}")
    if cfg.beta <= 0:
        raise AlignkitError(f"option `beta`: expected a positive number, got {cfg.beta}")
    if cfg.rounds > 0 and (cfg.samples_per_prompt < 2 or (cfg.samples_per_prompt != 2 and cfg.loss != "plackett_luce")):
        raise AlignkitError(f"option `samples_per_prompt`: online {cfg.loss} needs 2 (K > 2 only with "
                            f"loss plackett_luce), got {cfg.samples_per_prompt}")
    if cfg.loss == "kto" and cfg.optim.per_device_batch_size < 2:
        raise AlignkitError("option `optim.per_device_batch_size`: loss kto needs >= 2 (its reference point pairs "
                            f"each prompt with another example's response in the batch), got "
                            f"{cfg.optim.per_device_batch_size}")
    if cfg.loss == "kto" and cfg.precompute_ref:
        raise AlignkitError("option `precompute_ref`: not available with loss kto (its reference point needs the "
                            "reference on the mismatched pairs of each batch)")
    if cfg.rounds > 0 and cfg.precompute_ref:
        raise AlignkitError("option `precompute_ref` is for offline data; online rounds compute the reference on the fly")


def load_reference(cfg: DPOConfig, policy: Any, tokenizer: Any, device: torch.device,
                   backend: Backend) -> Reference | None:
    """The reference: None (reference-free loss), the LoRA base, or a model on `device`, frozen by the backend."""
    if cfg.loss in REFERENCE_FREE and not _policy_eval_on(cfg):
        return None
    if cfg.model.lora_r > 0 and not cfg.ref_model:
        return Reference(None, policy, backend)
    trust = cfg.ref_trust_remote_code if cfg.ref_model else cfg.model.trust_remote_code  # trust is per model path
    ref_cfg = ModelConfig(**{**vars(cfg.model), "lora_r": 0, "name_or_path": cfg.ref_model or cfg.model.name_or_path,
                             "trust_remote_code": trust})
    ref = backend.freeze(load_causal_lm(ref_cfg, tokenizer).to(device))
    return Reference(ref, policy, backend)


def _policy_eval_on(cfg: DPOConfig) -> bool:
    """Whether evaluations sample held-out prompts (and so need the reference for the KL)."""
    return bool(cfg.world) and cfg.eval_prompts > 0


def _steps_per_round(cfg: DPOConfig, global_batch: int) -> int:
    return cfg.optim.max_steps or max(1, math.ceil(cfg.optim.epochs * cfg.prompts_per_round / global_batch))


def _plan(cfg: DPOConfig, train: list[dict], loop: TrainLoop, eval_groups: list[dict], skipped: int,
          extracted: int = 0) -> dict:
    n_tokens = sum(len(r["input_ids"]) for g in train for r in g["responses"])
    ref = ("none (reference-free)" if cfg.loss in REFERENCE_FREE else "precomputed" if cfg.precompute_ref
           else "LoRA base, adapters disabled" if cfg.model.lora_r > 0 and not cfg.ref_model else "frozen copy")
    plan = {"loss": f"{cfg.loss}, beta={cfg.beta}; reference: {ref}",
            "tokens": f"{n_tokens:,} tokens in {len(train)} groups ({n_tokens / max(1, len(train)):.1f} per group; "
                      "all responses of a group in one forward pass)",
            "data": f"{len(eval_groups)} held-out groups; {skipped} rows skipped or dropped",
            "remote code": remote_code_plan({"policy": (cfg.model.name_or_path, cfg.model.trust_remote_code),
                                             "reference": (cfg.ref_model, cfg.ref_trust_remote_code)})}
    if extracted:
        plan["prompt"] = f"extracted from chosen/rejected (implicit prompt), {extracted} records"
    if cfg.rounds:
        plan["online"] = (f"{cfg.rounds} rounds x {_steps_per_round(cfg, loop.global_batch)} steps; "
                          f"{cfg.prompts_per_round} prompts x {cfg.samples_per_prompt} samples per round, "
                          f"labeler {cfg.labeler or 'gold:' + cfg.world} (tau={cfg.label_tau})")
    return plan


def _setup(cfg: DPOConfig) -> tuple[Any, Any, dict]:

    _check(cfg)
    tokenizer = load_tokenizer(cfg.model)
    data = {"train": [], "eval": [], "skipped": 0} if cfg.rounds else load_preference_data(cfg, tokenizer)
    model = load_causal_lm(cfg.model, tokenizer)
    model.train()
    return tokenizer, model, data


def run(cfg: DPOConfig, world: Any = None) -> dict[str, Any]:
    """Train with the chosen preference loss, evaluate, save `final/`; return the summary.

    `world`: the loaded world of option `world` (its held-out prompts, gold scorer, online prompts).
    """
    world = require_world(cfg, world)
    tokenizer, model, data = _setup(cfg)
    train, pad = data["train"], tokenizer.pad_token_id
    total = None
    if cfg.rounds:  # the global batch (per device x accumulation x processes) sets the steps per round
        o, world = cfg.optim, int(os.environ.get("WORLD_SIZE", "1"))
        total = cfg.rounds * _steps_per_round(cfg, o.per_device_batch_size * o.grad_accum_steps * world)
    loop = TrainLoop("dpo", cfg, model, n_examples=len(train), total_steps=total)
    device = loop.accelerator.device
    reference = load_reference(cfg, loop.accelerator.unwrap_model(loop.model), tokenizer, device, loop.backend)
    if cfg.precompute_ref and reference is not None:
        precompute_reference(reference, train + data["eval"], pad, cfg.optim.per_device_batch_size, device)
        if not _policy_eval_on(cfg):
            reference = None  # no longer needed: frees the reference model
    loss_fn = make_loss_fn(cfg, reference, loop.backend)
    loop.print_plan(n_examples=len(train) or cfg.prompts_per_round,
                    extra=_plan(cfg, train, loop, data["eval"], data["skipped"], data.get("prompts_extracted", 0)))
    evaluate = make_evaluator(loop, cfg, tokenizer, reference, data["eval"], loss_fn, world)
    start = loop.resume()
    if start == 0:
        loop.stage_state["first_eval"] = evaluate()
        loop.log(loop.stage_state["first_eval"])
    labeler, prompts = online_inputs(cfg, world) if cfg.rounds else (None, [])
    per_round = _steps_per_round(cfg, loop.global_batch) if cfg.rounds else loop.total_steps
    for _ in range(start, loop.total_steps):
        if cfg.rounds and (not train or loop.step % per_round == 0):
            train = _round_groups(loop, cfg, tokenizer, labeler, prompts, loop.step // per_round)
        micro = [to_device(collate_groups([train[i] for i in idx], pad, cfg.loss), device)
                 for idx in loop.micro_batch_indices(len(train), loop.step)]
        if cfg.loss == "kto":  # z0 over the global batch: every micro-batch, every process
            set_kto_reference_point(loop.accelerator.unwrap_model(loop.model), reference, micro, loop.backend,
                                    lambda totals: loop.accelerator.reduce(totals, "sum"))
        metrics = loop.update(micro, loss_fn)
        if cfg.run.eval_every and loop.step % cfg.run.eval_every == 0 and loop.step < loop.total_steps:
            metrics.update(evaluate())
        loop.end_step(metrics)
    final = evaluate()
    loop.log(final)
    first = loop.stage_state.get("first_eval", {})
    summary = {"loss": cfg.loss, "beta": cfg.beta, "groups": len(data["train"]), "eval_groups": len(data["eval"]),
               "rounds": cfg.rounds, "skipped_rows": data["skipped"],
               "duplicate_rows": data.get("duplicates", 0),
               "first": first, "final": final, **final}
    return loop.finish(tokenizer, summary, merge_lora=cfg.model.save_merged)
