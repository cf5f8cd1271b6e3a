"""Reward-model data: records of every kind -> scored groups of token ids -> padded batches.

A record becomes one or more groups (`record_groups`): the responses scored together, best first unless
`best` is set, with rating/label targets or segment scores. `tokenize_reward_groups` encodes each
response as [x, y, EOS] (`encode_scored`, as scorers do); `collate_reward_groups` pads every item of
a micro-batch into one batch with the group layout the losses of `alignkit.trainers.reward` read
(and the acceleration backend uses to run a shared prompt once).
"""

from __future__ import annotations

from typing import Any

import torch

from alignkit.data.collate import right_pad
from alignkit.data.formats import ValidationReport, choose_format, print_report, validate_records
from alignkit.data.load import load_records, split_records
from alignkit.data.segments import segment_prefixes
from alignkit.data.tokenize import encode_example, special_prefix, truncate_example
from alignkit.errors import AlignkitError

KINDS_OF_LOSS = {
    "pairwise": ("preference", "choice", "ranking"),
    "best_of_k": ("choice", "preference"),
    "listwise_pairs": ("ranking", "preference"),
    "plackett_luce": ("ranking", "preference"),
    "pointwise": ("rating", "steps"),
    "hinge": ("unpaired",),
}


def _read(path: str, cfg: Any) -> ValidationReport:
    """Valid records of `path`, as checked against the kind the loss's kinds decide (skips and repeats warned of)."""
    records = load_records(path, on_bad_rows=cfg.data.on_bad_rows)
    kind = choose_format(records, KINDS_OF_LOSS[cfg.loss])
    if kind not in KINDS_OF_LOSS[cfg.loss]:
        raise AlignkitError(f"{path}: records of kind {kind!r} cannot train loss `{cfg.loss}`; it takes "
                            f"{', '.join(KINDS_OF_LOSS[cfg.loss])} records (option `loss`)")
    report = validate_records(records, kind, path, cfg.data.on_bad_rows)
    if kind == "steps" and any(isinstance(v, bool) for r in report.records for v in r["labels"]):
        raise AlignkitError(f"{path}, field 'labels': segment training needs numeric scores, not true/false")
    print_report(report, path, "reward")
    return report


def record_groups(record: dict, kind: str, loss: str) -> list[dict]:
    """The scored groups of one record: `responses` (best first unless `best` is set) and targets."""
    p = record["prompt"]
    if kind == "preference":
        group = {"prompt": p, "responses": [record["chosen"], record["rejected"]], "margin": record.get("margin")}
        return [{**group, "best": 0} if loss == "best_of_k" else group]
    if kind == "choice":
        rs, best = record["responses"], record["best"]
        if loss == "pairwise":
            return [{"prompt": p, "responses": [rs[best], r]} for i, r in enumerate(rs) if i != best and r != rs[best]]
        return [{"prompt": p, "responses": rs, "best": best}]
    if kind == "ranking":
        rs = record["responses"]
        if loss == "pairwise":
            return [{"prompt": p, "responses": [rs[a], rs[b]]} for a in range(len(rs)) for b in range(a + 1, len(rs))]
        return [{"prompt": p, "responses": rs}]
    if kind == "rating":
        return [{"prompt": p, "responses": [record["response"]], "targets": [float(record["score"])]}]
    if kind == "unpaired":
        return [{"prompt": p, "responses": [record["completion"]], "targets": [1.0 if record["label"] else -1.0]}]
    return [{"prompt": p, "segments": record["steps"], "targets": [float(v) for v in record["labels"]]}]


def encode_scored(tokenizer: Any, prompt: Any, response: Any, max_length: int = 0,
                  prefix: list[int] | None = None) -> list[int]:
    """ids of [x, y, EOS] for scoring: prompt and response tokenized apart (strict prefix), one BOS.

    A string response to a conversation prompt (message list) becomes one assistant turn. Longer than
    `max_length` (> 0): the oldest prompt tokens are cut, keeping the BOS. `prefix`: the tokenizer's
    `special_prefix`, when the caller encodes many pairs (working it out takes two tokenizer calls).
    """
    if isinstance(prompt, list) and isinstance(response, str):
        response = [{"role": "assistant", "content": response}]
    prefix = special_prefix(tokenizer) if prefix is None else prefix
    example = encode_example(tokenizer, {"prompt": prompt, "completion": response}, prefix=prefix)
    if max_length > 0:
        fitted, _ = truncate_example(example, max_length=max_length, policy="left", keep_prefix=len(prefix))
        example = fitted or {"input_ids": example["input_ids"][-max_length:]}
    return example["input_ids"]


def tokenize_reward_groups(groups: list[dict], tokenizer: Any, max_length: int) -> list[dict]:
    """Each group with `items`: the ids of [x, y, EOS] per response (or of each segment prefix)."""
    prefix = special_prefix(tokenizer)
    for g in groups:
        if "segments" in g:
            g["items"] = [ids[-max_length:] for ids in segment_prefixes(tokenizer, g["prompt"], g["segments"])]
        else:
            g["items"] = [encode_scored(tokenizer, g["prompt"], r, max_length, prefix) for r in g["responses"]]
    return groups


def load_reward_data(cfg: Any, tokenizer: Any) -> dict[str, Any]:
    """Training and held-out groups (tokenized), the record kind, and counts: `prompts_extracted` (implicit
    prompts), `skipped_rows` (with `data.on_bad_rows` skip) and `duplicate_rows` (rows of `data.path` that
    repeat an earlier one; a split keeps copies on one side)."""
    if not cfg.data.path:
        raise AlignkitError("option `data.path` is required: preference, choice, ranking, rating, unpaired or "
                            "steps records (e.g. the train.jsonl of `alignkit label`)")
    report = _read(cfg.data.path, cfg)
    kind, records = report.kind, report.records[: cfg.data.limit]
    extracted, skipped = report.prompts_extracted, report.n_skipped
    if cfg.data.eval_path:
        held = _read(cfg.data.eval_path, cfg)
        eval_records, extracted, skipped = held.records, extracted + held.prompts_extracted, skipped + held.n_skipped
    else:  # copies of a record stay on one side
        records, eval_records = split_records(records, cfg.data.eval_fraction, cfg.run.seed)
    out = {"kind": kind, "records": records, "prompts_extracted": extracted, "skipped_rows": skipped,
           "duplicate_rows": report.n_duplicates}
    for name, part in (("train", records), ("eval", eval_records)):
        groups = [g for r in part for g in record_groups(r, kind, cfg.loss)]
        out[name] = tokenize_reward_groups(groups, tokenizer, cfg.data.max_length)
    if not out["train"]:
        raise AlignkitError(f"{cfg.data.path}: no training records")
    return out


def collate_reward_groups(groups: list[dict], pad_id: int) -> dict[str, Any]:
    """All items of the groups right-padded into one batch, with the group layout.

    Shapes:
        input_ids, attention_mask: N×T (N items); group_index: G×K (item of each group slot, -1 =
        none); best: G or None; targets: N or None; margin: G or None; n_terms: G (N for per-item losses).
    """
    rows = [ids for g in groups for ids in g["items"]]
    ids, mask = right_pad(rows, pad_id)
    k = max(len(g["items"]) for g in groups)
    index = torch.full((len(groups), k), -1, dtype=torch.long)
    start = 0
    for i, g in enumerate(groups):
        index[i, : len(g["items"])] = torch.arange(start, start + len(g["items"]))
        start += len(g["items"])
    per_item = "targets" in groups[0]
    margins = [g.get("margin") for g in groups]
    return {
        "input_ids": ids, "attention_mask": mask, "group_index": index,
        "best": torch.tensor([g["best"] for g in groups]) if "best" in groups[0] else None,
        "targets": torch.tensor([t for g in groups for t in g["targets"]]) if per_item else None,
        "margin": torch.tensor([m or 0.0 for m in margins]) if any(m is not None for m in margins) else None,
        "n_terms": len(rows) if per_item else len(groups),
    }
