"""Preference data for the DPO family: records -> groups of responses sharing one tokenized prompt.

A *group* is one prompt with its K responses, tokenized with `encode_example` so the prompt ids
(`encode_prompt`) are a strict prefix of every response's ids:

    preference {prompt, chosen, rejected}     -> K = 2, [chosen, rejected]
    ranking    {prompt, responses}             -> K >= 2, best first (Plackett-Luce)
    unpaired   {prompt, completion, label}     -> K = 1, with `label` (True = desirable; KTO)

Online DPO (`sample_round`) samples K responses per prompt from the current policy and has a
labeler (`alignkit.feedback.labelers`) answer them as pairs or rankings.

`collate_groups` stacks the responses of B groups slot-major into one right-padded batch of K·B
rows (row k·B + b is response k of group b), so chosen and rejected go through the model in one
forward pass. Shorter rankings are filled with copies of their first response, masked out by
`group_mask`. `n_terms` is B: the preference losses average over groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from alignkit.data.collate import collate_padded
from alignkit.data.tokenize import encode_example, encode_prompt, special_prefix
from alignkit.errors import AlignkitError
from alignkit.losses.sft import IGNORE_INDEX

Group = dict[str, Any]  # responses: list[Example]; label: bool | None; row: int; ref_logps: list[float]

# The record kinds each loss reads, and how other kinds are converted to it (see `to_groups`).
LOSS_KINDS: dict[str, tuple[str, ...]] = {
    "pairwise": ("preference", "ranking"),  # a ranking gives the pair (first, last)
    "plackett_luce": ("ranking", "preference"),  # a preference is a ranking of two
    "kto": ("unpaired", "preference"),  # a preference gives one desirable and one undesirable example
}


def loss_family(loss: str) -> str:
    """`plackett_luce`, `kto`, or `pairwise` (every other loss): which records a loss trains on."""
    return loss if loss in ("plackett_luce", "kto") else "pairwise"


def to_groups(record: dict[str, Any], kind: str, family: str) -> list[tuple[Any, list[Any], bool | None]]:
    """`(prompt, responses, label)` items of a validated record, converted to what `family` reads."""
    prompt = record["prompt"]
    if kind == "unpaired":
        return [(prompt, [record["completion"]], bool(record["label"]))]
    responses = [record["chosen"], record["rejected"]] if kind == "preference" else list(record["responses"])
    if family == "kto":
        return [(prompt, [responses[0]], True), (prompt, [responses[-1]], False)]
    if family == "pairwise":
        return [(prompt, [responses[0], responses[-1]], None)]
    return [(prompt, responses, None)]


def encode_group(tokenizer: Any, prompt: Any, responses: list[Any],
                 prefix: list[int] | None = None) -> tuple[list[dict], int]:
    """Tokenize each response after the shared prompt; return the examples and the prompt length.

    `prefix`: the tokenizer's `special_prefix` (worked out here when not given).

    Raises:
        AlignkitError: The prompt ids are not a strict prefix of a response's ids.
    """
    prefix = special_prefix(tokenizer) if prefix is None else prefix
    prompt_ids = encode_prompt(tokenizer, prompt, prefix)
    examples = []
    for k, response in enumerate(responses):
        example = encode_example(tokenizer, {"prompt": prompt, "completion": response}, prefix=prefix)
        if example["input_ids"][: len(prompt_ids)] != prompt_ids:
            raise AlignkitError(f"response {k}: the prompt does not tokenize as a prefix of prompt + response")
        examples.append({"input_ids": example["input_ids"], "labels": example["labels"]})
    return examples, len(prompt_ids)


def fit_group(examples: list[dict], prompt_length: int, *, max_length: int, keep_prefix: int,
              policy: Literal["left", "drop"]) -> tuple[list[dict] | None, bool]:
    """Fit every response of a group into `max_length`, cutting the *same* prompt tokens from all.

    "left" removes the oldest prompt tokens after the first `keep_prefix` (the BOS) as far as the
    longest response needs, then cuts responses' ends; "drop" drops the group. Returns
    `(examples or None, truncated)`; None also when a response has no trained token left.
    """
    longest = max(len(ex["input_ids"]) for ex in examples)
    if longest <= max_length:
        return examples, False
    if policy == "drop":
        return None, False
    cut = max(0, min(longest - max_length, prompt_length - keep_prefix))
    out = []
    for ex in examples:
        ids = (ex["input_ids"][:keep_prefix] + ex["input_ids"][keep_prefix + cut:])[:max_length]
        labels = (ex["labels"][:keep_prefix] + ex["labels"][keep_prefix + cut:])[:max_length]
        labels[:1] = [IGNORE_INDEX] * min(1, len(labels))
        if all(label == IGNORE_INDEX for label in labels):
            return None, True
        out.append({"input_ids": ids, "labels": labels})
    return out, True


@dataclass
class TokenizedGroups:
    """The outcome of `tokenize_groups`: the groups and what happened to the other records."""

    groups: list[Group]
    truncated: int = 0
    dropped: int = 0
    skipped: list[tuple[int, str | None, str]] = field(default_factory=list)


def tokenize_groups(records: list[dict], kind: str, loss: str, tokenizer: Any, *, max_length: int,
                    truncation: Literal["left", "drop"] = "left", source: str = "data",
                    rows: list[int] | None = None,
                    on_bad_rows: Literal["error", "skip"] = "error") -> TokenizedGroups:
    """Tokenize validated records of `kind` into the groups loss `loss` trains on.

    Raises:
        AlignkitError: The kind cannot feed the loss (naming both), or a record cannot be tokenized
            (naming file, row and field) with `on_bad_rows="error"`.
    """
    family = loss_family(loss)
    if kind not in LOSS_KINDS[family]:
        raise AlignkitError(f"{source}: loss {loss!r} trains on {' or '.join(LOSS_KINDS[family])} records, "
                            f"got {kind!r} records")
    prefix = special_prefix(tokenizer)
    keep = len(prefix)
    out = TokenizedGroups(groups=[])
    for row, record in zip(rows or range(1, len(records) + 1), records, strict=True):
        try:
            for prompt, responses, label in to_groups(record, kind, family):
                examples, plen = encode_group(tokenizer, prompt, responses, prefix)
                fitted, was_cut = fit_group(examples, plen, max_length=max_length, keep_prefix=keep,
                                            policy=truncation)
                out.truncated += int(was_cut)
                if fitted is None:
                    out.dropped += 1
                    continue
                out.groups.append({"responses": fitted, "label": label, "row": row})
        except AlignkitError as err:
            if on_bad_rows == "error":
                raise AlignkitError(f"{source}, row {row}, field 'prompt': {err}") from None
            out.skipped.append((row, "prompt", str(err)))
    return out


def collate_groups(groups: list[Group], pad_id: int, *, share_prefixes: bool = False,
                   pack_config: Any = None) -> dict[str, Any]:
    """Stack the responses of B groups slot-major into one right-padded batch.

    With `share_prefixes` the batch also holds the groups' `shared_prefix_layout` (each prompt once,
    the responses as suffixes), which `response_logps` runs in two passes over fewer tokens, when
    that saves enough tokens to be faster (`alignkit.ops.prefix.worth_sharing`). With `pack_config`
    (the config of a model that takes packed rows, `accepts_packed_masks`) the groups are packed
    first, one row per prompt [prompt, response 1, ..., response K] under a 4D mask, when that saves
    FLOPs (`packing_pays`): one forward call, so it also runs under DDP. `response_logps` falls back
    to the plain rows (always in the batch) for a model that cannot take them.

    Shapes:
        input_ids, attention_mask, labels: (K·B)×T, row k·B + b = response k of group b;
        group_mask: B×K bool (False: filler in a shorter ranking); kto_labels: B bool (when the
        groups are labelled); ref_logps: B×K (when every group has precomputed reference log-probs);
        n_terms: B.
    """
    size = max(len(g["responses"]) for g in groups)
    rows = [g["responses"][k] if k < len(g["responses"]) else g["responses"][0] for k in range(size)
            for g in groups]
    batch = collate_padded(rows, pad_id)
    if (share_prefixes or pack_config is not None) and size > 1:  # a group of one shares nothing
        batch.update(_shared_or_packed(rows, len(groups), size, pad_id, share_prefixes, pack_config))
    batch["group_mask"] = torch.tensor([[k < len(g["responses"]) for k in range(size)] for g in groups])
    batch["n_terms"] = len(groups)
    if groups[0].get("label") is not None:
        batch["kto_labels"] = torch.tensor([bool(g["label"]) for g in groups])
    if all("ref_logps" in g for g in groups):
        batch["ref_logps"] = torch.tensor([g["ref_logps"] + [0.0] * (size - len(g["ref_logps"])) for g in groups])
    return batch


def _shared_or_packed(rows: list[dict], n_groups: int, size: int, pad_id: int, share: bool,
                      pack_config: Any) -> dict[str, torch.Tensor]:
    """The packed rows when packing pays, else the shared layout when sharing is on and pays, else {}.

    Packed: `packed_input_ids`, `packed_attention_mask` (bool G×1×W×W), `packed_position_ids`,
    `packed_keep` (the output columns kept), `packed_group` and `packed_take` (N×S: suffix token (n, j)
    is predicted by kept output `packed_take[n, j]` of row `packed_group[n, j]`) and `suffix_labels`.
    """
    from alignkit.ops.packing import pack_shared
    from alignkit.ops.prefix import saves_enough, shared_prefix_layout

    slots = [[k * n_groups + b for k in range(size)] for b in range(n_groups)]
    ids, labels = [r["input_ids"] for r in rows], [r["labels"] for r in rows]
    shared = shared_prefix_layout(ids, slots, pad_id, labels=labels, only_if_worth=pack_config is None)
    if shared is None:
        return {}
    packed = pack_shared(shared, pad_id, pack_config) if pack_config is not None else None
    if packed is not None:
        return {"packed_input_ids": packed["input_ids"], "packed_attention_mask": packed["attention_mask"],
                "packed_position_ids": packed["position_ids"], "packed_keep": packed["keep"],
                "packed_group": packed["group"], "packed_take": packed["take"],
                "suffix_labels": shared["suffix_labels"]}
    return shared if share and saves_enough(shared) else {}


# ---------------------------------------------------------------------------------------------
# Online DPO data: sampled from the current policy, answered by a labeler
# ---------------------------------------------------------------------------------------------


def train_prompts(cfg: Any) -> list[Any]:
    """Prompts of online rounds: `cfg.prompts_path` (records with `prompt`), else the world's train prompts."""
    if cfg.prompts_path:
        from alignkit.data.formats import validate_records
        from alignkit.data.load import load_records

        records = validate_records(load_records(cfg.prompts_path), "prompt", cfg.prompts_path).records
        return [r["prompt"] for r in records]
    if not cfg.world:
        raise AlignkitError("online DPO (`rounds` > 0) needs `prompts_path` or `world` for its training prompts")
    from alignkit.worlds.base import get_world

    return get_world(cfg.world).prompts("train")


def sample_round(policy: Any, cfg: Any, tokenizer: Any, labeler: Any, prompts: list[Any], round_index: int,
                 device: torch.device) -> list[dict]:
    """Online DPO data: K samples per prompt from the current policy, answered by the labeler as records.

    `cfg` is the DPO config (`prompts_per_round`, `samples_per_prompt`, `max_new_tokens`,
    `temperature`, `loss`, `run.seed`). Prompts whose samples are not distinct are left out (records
    need distinct responses). Returns preference records (rankings for plackett_luce).
    """
    from alignkit.rollout.generate import sample, tokenize_prompts

    gen = torch.Generator().manual_seed(cfg.run.seed * 7919 + round_index)
    order = torch.randperm(len(prompts), generator=gen)[: cfg.prompts_per_round].tolist()
    chosen = [prompts[i] for i in order]
    k, queries = cfg.samples_per_prompt, []
    for start in range(0, len(chosen), 64):
        part = chosen[start : start + 64]
        ids, mask = tokenize_prompts(tokenizer, [p for p in part for _ in range(k)])
        rollout = sample(policy, ids.to(device), mask.to(device),
                         max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, generator=gen,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        texts = rollout.texts(tokenizer)
        for i, prompt in enumerate(part):
            responses = texts[i * k : (i + 1) * k]
            if len(set(responses)) == k and all(r.strip() for r in responses):  # records need distinct responses
                queries.append({"id": f"{round_index}/{start + i}", "prompt": prompt, "responses": responses})
    fmt = "ranking" if cfg.loss == "plackett_luce" else "pairs"
    return [r for r in labeler(queries, fmt) if r is not None]


def online_inputs(cfg: Any) -> tuple[Any, list[Any]]:
    """The labeler (a scorer with Bradley-Terry noise) and the training prompts of online rounds."""
    from alignkit.feedback.labelers import ScorerLabeler
    from alignkit.rollout.score import load_scorer

    spec = cfg.labeler or (f"gold:{cfg.world}" if cfg.world else "")
    if not spec:
        raise AlignkitError("online DPO (`rounds` > 0) needs `labeler` (a reward model directory or gold:<world>) "
                            "or `world`")
    return ScorerLabeler(load_scorer(spec), tau=cfg.label_tau, seed=cfg.run.seed), train_prompts(cfg)
