"""`alignkit reward`: train a reward model on comparisons, choices, rankings, ratings or segment scores.

The model (Xiao & Zhu, Eq. 10.34) is a sequence classifier with one output read at the last
non-pad token of [x, y] (see `alignkit.models.reward_model`). Every response of a micro-batch is
scored in one forward pass; the scores are regrouped per record and the loss chosen by `loss`
(`alignkit.losses.reward.REWARD_LOSSES`) is applied:

    loss            records                                   equation
    pairwise        preference (choice -> best vs each other,  -log sigmoid(r_c - r_r - m)   (Eq. 10.36-10.37)
                    ranking -> every ordered pair)
    best_of_k       choice, preference                         softmax over the K responses (Ziegler et al. 2019)
    listwise_pairs  ranking, preference                        all pairs of a list           (Eq. 10.57)
    plackett_luce   ranking, preference                        Plackett-Luce                 (Eq. 10.58-10.61)
    pointwise       rating; steps (segment scores)             (s - r)^2                     (Eq. 10.62, 10.70)
    hinge           unpaired                                   max(0, 1 - r * label)         (Eq. 10.71)

Losses are means over records; the loop receives mean x records so accumulation is exact.
After training the reward is normalised to mean 0 / std 1 on reference-policy samples (Ziegler et
al. 2019; `normalize_path`, default: the responses of the training records, which `alignkit label`
sampled from the reference policy). With `members` > 1 an ensemble is trained (seeds `run.seed + i`,
optionally bootstrap resamples) and `final/` holds `ensemble.json` and `member-i/` (Eq. 10.72).
`budget_curve` also trains one model per smaller label budget and reports held-out accuracy.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from alignkit.accel import Backend, resolve
from alignkit.config import DataConfig, ModelConfig, OptimConfig, RunConfig
from alignkit.data.collate import right_pad, to_device
from alignkit.data.load import load_records
from alignkit.data.reward_groups import (
    collate_reward_groups,
    load_reward_data,
    record_groups,
    tokenize_reward_groups,
)
from alignkit.data.segments import parse_segmentation
from alignkit.errors import AlignkitError
from alignkit.losses.reward import REWARD_LOSSES
from alignkit.models.ensemble import save_ensemble
from alignkit.models.load import load_sequence_classifier, load_tokenizer
from alignkit.models.reward_model import CONFIG_SEGMENTS, hf_model, init_head
from alignkit.models.reward_normalization import apply_normalization, normalization
from alignkit.rollout.score import RewardModelScorer, load_ensemble
from alignkit.trainers.loop import TrainLoop
from alignkit.trainers.reward_eval import group_metrics, spearman
from alignkit.trainers.rundir import resolve_output_dir, write_json_atomic


@dataclass
class RewardConfig:
    """Train a reward model (scalar head on a transformer) on preference feedback, then normalise it."""

    LIMITS: ClassVar[dict[str, str]] = {"center_coef": ">= 0", "hinge_margin": ">= 0", "normalize_samples": ">= 1",
                                        "members": ">= 1", "combine_k": ">= 0", "budget_curve": ">= 1"}

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(max_length=256))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-5, warmup_steps=10))
    loss: Literal["pairwise", "best_of_k", "listwise_pairs", "plackett_luce", "pointwise", "hinge"] = "pairwise"
    """Reward loss (see the table in `alignkit reward`'s documentation)."""
    margin: float = 0.0
    """pairwise: margin m in -log sigmoid(r_c - r_r - m); a record's own `margin` field wins."""
    center_coef: float = 0.0
    """pairwise: weight of the reward-centring regulariser coef * (r_c + r_r)^2 (Eisenstein et al. 2023)."""
    hinge_margin: float = 1.0
    """hinge: the margin in max(0, margin - r * label)."""
    segments: str = "none"
    """How a response is split for scoring, for models trained on `steps` (segment) records: `none`, `sentences`
    or `chunks:N`. With a segmentation, a response's reward is the sum of its in-context segment rewards
    (Eq. 10.68) in the held-out gold check, and it is saved in config.json (`reward_segments`) so scorers
    loading the model (PPO, best-of-N, labelling) sum segments too."""
    normalize: bool = True
    """Make the final reward mean 0 / std 1 on reference-policy samples (gain and bias saved with the model)."""
    normalize_path: str = ""
    """Records with `prompt` and `response`/`completion` to normalise on (default: the training responses)."""
    normalize_samples: int = 2048
    """At most this many normalisation samples."""
    gold_eval_path: str = ""
    """`{prompt, response, score}` records of held-out policy samples with gold scores (Spearman correlation)."""
    members: int = 1
    """Ensemble size; > 1 trains members with seeds run.seed + i (Eq. 10.72)."""
    bootstrap: bool = False
    """Train each ensemble member on a bootstrap resample of the training records."""
    combine: Literal["mean", "mean_minus_std", "min"] = "mean"
    """How the ensemble combines members: mean (Eq. 10.72), mean - k * std, or min (Coste et al. 2024)."""
    combine_k: float = 1.0
    """k of `mean_minus_std`."""
    budget_curve: list[int] = field(default_factory=list)
    """Also train on the first N training records for each N listed and report held-out accuracy per N."""
    init_head: Literal["auto", "always", "never"] = "auto"
    """Draw the head from N(0, 1/(d+1)): auto = when starting from a model that is not a sequence classifier."""


# ---------------------------------------------------------------------------------------------
# Loss: regroup the flat scores and apply the chosen reward loss
# ---------------------------------------------------------------------------------------------


def _grouped(scores: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    index = batch["group_index"]
    return scores[index.clamp(min=0)], index >= 0  # G×K scores and presence mask


def _pairwise(scores, batch, cfg):
    s, _ = _grouped(scores, batch)
    margin = batch["margin"] if batch["margin"] is not None else (cfg.margin or None)
    return REWARD_LOSSES["pairwise"](s[:, 0], s[:, 1], margin=margin, center_coef=cfg.center_coef)


def _best_of_k(scores, batch, cfg):
    s, mask = _grouped(scores, batch)
    return REWARD_LOSSES["best_of_k"](torch.where(mask, s, -1e9), batch["best"])


def _listwise(name):
    return lambda scores, batch, cfg: REWARD_LOSSES[name](*_grouped(scores, batch))


LOSS_ADAPTERS = {
    "pairwise": _pairwise,
    "best_of_k": _best_of_k,
    "listwise_pairs": _listwise("listwise_pairs"),
    "plackett_luce": _listwise("plackett_luce"),
    "pointwise": lambda scores, batch, cfg: REWARD_LOSSES["pointwise"](scores, batch["targets"]),
    "hinge": lambda scores, batch, cfg: REWARD_LOSSES["hinge"](scores, batch["targets"], margin=cfg.hinge_margin),
}


def make_loss_fn(cfg: RewardConfig, backend: Backend):
    """`loss_fn(model, batch) -> (loss x n_terms, metrics)` for `TrainLoop.update` (a sum, so accumulation is exact)."""
    adapter = LOSS_ADAPTERS[cfg.loss]

    def loss_fn(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        scores = backend.group_scores(model, batch["input_ids"], batch["attention_mask"], batch["group_index"])  # N
        loss, metrics = adapter(scores, batch, cfg)
        return loss * batch["n_terms"], metrics

    return loss_fn


# ---------------------------------------------------------------------------------------------
# Evaluation and normalisation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def score_items(model: torch.nn.Module, rows: list[list[int]], pad_id: int, batch_size: int,
                backend: Backend) -> torch.Tensor:
    """Rewards of token id rows, in eval mode. Shapes: returns N."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(rows), batch_size):
        ids, mask = (t.to(device) for t in right_pad(rows[i : i + batch_size], pad_id))
        out.append(backend.group_scores(model, ids, mask, None).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def evaluate_reward(model: torch.nn.Module, groups: list[dict], cfg: RewardConfig, tokenizer: Any,
                    gold: list[dict], backend: Backend) -> dict[str, float]:
    """Held-out loss and metrics (`reward_eval.group_metrics`); Spearman with gold scores if given."""
    out: dict[str, float] = {}
    bs = cfg.optim.per_device_batch_size
    if groups:
        batch = collate_reward_groups(groups, tokenizer.pad_token_id)
        scores = score_items(model, [ids for g in groups for ids in g["items"]], tokenizer.pad_token_id, bs, backend)
        loss, _ = LOSS_ADAPTERS[cfg.loss](scores, batch, cfg)
        out["eval/loss"] = loss.item()
        if "targets" not in groups[0]:
            s, mask = _grouped(scores, batch)
            out.update(group_metrics(s, mask, batch["best"]))
        else:
            out["eval/spearman_targets"] = spearman(scores, batch["targets"])
    if gold and cfg.segments != "none":  # sum of segment rewards (Eq. 10.68)

        was_training = model.training
        scorer = RewardModelScorer(model, tokenizer, batch_size=bs, max_length=cfg.data.max_length,
                                   segments=cfg.segments, backend=backend)
        scores = scorer([r["prompt"] for r in gold], [r["response"] for r in gold])
        model.train(was_training)
        out["eval/spearman_gold"] = spearman(scores, torch.tensor([float(r["score"]) for r in gold]))
    elif gold:
        rows = tokenize_reward_groups([{"prompt": r["prompt"], "responses": [r["response"]]} for r in gold],
                                      tokenizer, cfg.data.max_length)
        scores = score_items(model, [g["items"][0] for g in rows], tokenizer.pad_token_id, bs, backend)
        out["eval/spearman_gold"] = spearman(scores, torch.tensor([float(r["score"]) for r in gold]))
    return out


def normalization_rows(cfg: RewardConfig, records: list[dict], tokenizer: Any) -> list[list[int]]:
    """Token ids of the reference-policy samples to normalise on (unique prompt/response pairs, in order)."""
    if cfg.normalize_path:

        records = load_records(cfg.normalize_path)
    seen: set[str] = set()
    groups = []
    for r in records:
        values = r.get("responses") or [r.get(k) for k in ("response", "completion", "chosen", "rejected")]
        for v in values:
            key = repr((r.get("prompt"), v))
            if isinstance(v, str | list) and v and key not in seen and len(groups) < cfg.normalize_samples:
                seen.add(key)
                groups.append({"prompt": r["prompt"], "responses": [v]})
    if len(groups) < 2:
        raise AlignkitError(f"{cfg.normalize_path or cfg.data.path}: fewer than 2 normalisation samples "
                            "(records with `prompt` and `response`/`completion`); set --normalize false")
    return [g["items"][0] for g in tokenize_reward_groups(groups, tokenizer, cfg.data.max_length)]


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def load_model(cfg: RewardConfig, tokenizer: Any, seed: int) -> torch.nn.Module:
    """The sequence classifier to train, its head drawn from N(0, 1/(d+1)) when new (Ziegler et al. 2019)."""


    config_file = Path(cfg.model.name_or_path) / "config.json"
    archs = json.loads(config_file.read_text()).get("architectures") or [] if config_file.is_file() else []
    is_classifier = any(a.endswith("ForSequenceClassification") for a in archs)
    model = load_sequence_classifier(cfg.model, num_labels=1, tokenizer=tokenizer)
    if cfg.init_head == "always" or (cfg.init_head == "auto" and not is_classifier):
        init_head(model, seed)
    return model


def train_one(cfg: RewardConfig, tokenizer: Any, train: list[dict], data: dict, gold: list[dict],
              norm_rows: list[list[int]]) -> dict[str, Any]:
    """Train one reward model in `cfg.run.output_dir`, evaluate, normalise, save `final/`; return the summary."""
    model = load_model(cfg, tokenizer, cfg.run.seed)
    model.train()
    loop = TrainLoop("reward", cfg, model, n_examples=len(train))
    n_items = sum(len(g["items"]) for g in train)
    loop.print_plan(n_examples=len(train), extra={
        "data": f"{len(train)} training groups ({n_items} sequences, loss `{cfg.loss}`), {len(data['eval'])} "
                f"held-out groups, {len(gold)} gold-scored samples, {len(norm_rows)} normalisation samples; "
                f"{data.get('skipped_rows', 0)} bad rows skipped, {data.get('duplicate_rows', 0)} repeated rows",
        **({"prompt": f"extracted from chosen/rejected (implicit prompt), {data['prompts_extracted']} records"}
           if data.get("prompts_extracted") else {})})
    backend = loop.backend
    loss_fn, pad = make_loss_fn(cfg, backend), tokenizer.pad_token_id
    start = loop.resume()
    for _ in range(start, loop.total_steps):
        t0 = time.perf_counter()
        micro = [collate_reward_groups([train[i] for i in idx], pad)
                 for idx in loop.micro_batch_indices(len(train), loop.step)]
        metrics = loop.update([to_device(mb, loop.accelerator.device) for mb in micro], loss_fn)
        metrics["perf/sequences_per_s"] = sum(len(mb["input_ids"]) for mb in micro) / (time.perf_counter() - t0)
        if cfg.run.eval_every and loop.step % cfg.run.eval_every == 0 and loop.step < loop.total_steps:
            metrics.update(evaluate_reward(loop.model, data["eval"], cfg, tokenizer, gold, backend))
        loop.end_step(metrics)
    unwrapped = loop.accelerator.unwrap_model(loop.model)
    final = evaluate_reward(unwrapped, data["eval"], cfg, tokenizer, gold, backend)
    summary: dict[str, Any] = {"groups": len(train), "eval_groups": len(data["eval"]), **final}
    if cfg.normalize:
        gain, bias = normalization(score_items(unwrapped, norm_rows, pad, cfg.optim.per_device_batch_size, backend))
        summary["normalization"] = {"gain": gain, "bias": bias, "samples": len(norm_rows),
                                    "bias_folded_into_head": apply_normalization(unwrapped, gain, bias)}
    if cfg.segments != "none":

        setattr(hf_model(unwrapped).config, CONFIG_SEGMENTS, cfg.segments)
    loop.log(final)
    return loop.finish(tokenizer, summary, merge_lora=True)


def _member_cfg(cfg: RewardConfig, out_dir: Path, seed: int) -> RewardConfig:
    member = copy.deepcopy(cfg)
    member.run = dataclasses.replace(cfg.run, output_dir=str(out_dir), seed=seed)
    return member


def _bootstrap(train: list[dict], seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [train[i] for i in torch.randint(len(train), (len(train),), generator=gen).tolist()]


def _budget_curve(cfg: RewardConfig, tokenizer: Any, data: dict, gold: list, norm_rows: list, out_dir: Path,
                  full: dict) -> list[dict]:
    """Held-out figures of one model per label budget (the first N records), the full run included."""
    keys = ("eval/pairwise_accuracy", "eval/best_of_k_accuracy", "eval/kendall_tau", "eval/spearman_gold")
    curve = []
    for budget in sorted(set(cfg.budget_curve)):
        if budget >= len(data["records"]):
            result = full
        else:
            records = data["records"][:budget]
            train = tokenize_reward_groups([g for r in records for g in record_groups(r, data["kind"], cfg.loss)],
                                           tokenizer, cfg.data.max_length)
            result = train_one(_member_cfg(cfg, out_dir / f"budget-{budget}", cfg.run.seed), tokenizer, train, data,
                               gold, norm_rows)
        curve.append({"budget": min(budget, len(data["records"])), "wall_time_s": result["wall_time_s"],
                      **{k.split("/")[1]: result[k] for k in keys if k in result}})
    return curve


def run(cfg: RewardConfig) -> dict[str, Any]:
    """Train the reward model (or ensemble), normalise it, save `final/`; return the summary."""
    parse_segmentation(cfg.segments)  # a bad `segments` fails before training
    if cfg.segments != "none" and cfg.normalize:
        raise AlignkitError("options `segments` and `normalize`: a segment reward model's reward is a sum over a "
                            "varying number of segments, which one gain and bias cannot normalise; "
                            "pass --normalize false")
    if cfg.members < 1:
        raise AlignkitError(f"option `members`: expected >= 1, got {cfg.members}")
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model)
    data = load_reward_data(cfg, tokenizer)
    gold = load_records(cfg.gold_eval_path) if cfg.gold_eval_path else []
    norm_rows = normalization_rows(cfg, data["records"], tokenizer) if cfg.normalize else []
    out_dir = resolve_output_dir("reward", cfg.run.output_dir)
    if cfg.members == 1:
        summary = train_one(_member_cfg(cfg, out_dir, cfg.run.seed), tokenizer, data["train"], data, gold, norm_rows)
    else:
        members = []
        for i in range(cfg.members):
            train = _bootstrap(data["train"], cfg.run.seed + i) if cfg.bootstrap else data["train"]
            members.append(train_one(_member_cfg(cfg, out_dir / "members" / f"member-{i}", cfg.run.seed + i),
                                     tokenizer, train, data, gold, norm_rows))
        summary = _assemble_ensemble(cfg, out_dir, members, gold)
    if cfg.budget_curve:
        summary["budget_curve"] = _budget_curve(cfg, tokenizer, data, gold, norm_rows, out_dir, summary)
    summary["skipped_rows"], summary["duplicate_rows"] = data["skipped_rows"], data["duplicate_rows"]
    summary["total_wall_time_s"] = time.perf_counter() - t0
    write_json_atomic(out_dir / "summary.json", summary)
    return summary


def _assemble_ensemble(cfg: RewardConfig, out_dir: Path, members: list[dict], gold: list) -> dict[str, Any]:
    """Copy the members into `final/` with `ensemble.json`; evaluate the combined scorer on the gold samples."""
    final = save_ensemble(out_dir / "final", [m["final_dir"] for m in members], combine=cfg.combine, k=cfg.combine_k)
    summary: dict[str, Any] = {"stage": "reward", "output_dir": str(out_dir), "final_dir": str(final),
                               "wall_time_s": sum(m["wall_time_s"] for m in members),
                               "members": [{k: v for k, v in m.items() if k.startswith("eval/")} for m in members]}
    for key in ("eval/pairwise_accuracy", "eval/spearman_gold"):
        values = [m[key] for m in members if key in m and not math.isnan(m[key])]
        if values:
            summary[f"{key}_member_mean"] = sum(values) / len(values)
    if gold:
        scorer = load_ensemble(final, max_length=cfg.data.max_length, backend=resolve(cfg.run.accel))
        rewards = scorer([r["prompt"] for r in gold], [r["response"] for r in gold])
        summary["eval/spearman_gold"] = spearman(rewards, torch.tensor([float(r["score"]) for r in gold]))
        summary["eval/member_disagreement"] = scorer.last_metrics["reward/disagreement"]
    return summary
