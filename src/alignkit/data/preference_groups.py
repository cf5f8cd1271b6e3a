"""Preference data for the DPO family: records -> groups of responses sharing one tokenized prompt.

A *group* is one prompt with its K responses, tokenized with `encode_example` so the prompt ids
(`encode_prompt`) are a strict prefix of every response's ids:

    preference {prompt, chosen, rejected}     -> K = 2, [chosen, rejected]
    ranking    {prompt, responses}             -> K >= 2, best first (Plackett-Luce)
    unpaired   {prompt, completion, label}     -> K = 1, with `label` (True = desirable; KTO)

`collate_preference_groups` stacks the responses of B groups slot-major into one right-padded batch
of K·B rows (row k·B + b is response k of group b), so chosen and rejected go through the model in
one forward pass, and says which rows share a prompt (`group_index`); whether to run a shared
prompt once is the acceleration backend's decision (`alignkit.accel`). Shorter rankings are filled
with copies of their first response, masked out by `group_mask`. `n_terms` is B: the preference
losses average over groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from alignkit.data.collate import collate_padded
from alignkit.data.tokenize import encode_example, encode_prompt, special_prefix
from alignkit.errors import AlignkitError
from alignkit.ops.logprobs import IGNORE_INDEX

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
    """The outcome of `tokenize_preference_groups`: the groups and what happened to the other records."""

    groups: list[Group]
    truncated: int = 0
    dropped: int = 0
    skipped: list[tuple[int, str | None, str]] = field(default_factory=list)


def tokenize_preference_groups(records: list[dict], kind: str, loss: str, tokenizer: Any, *, max_length: int,
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


def mismatched_groups(groups: list[Group]) -> list[Group]:
    """KTO's mismatched pairs: group b's prompt with the response of group b - 1 (cyclically).

    Ethayarajh et al. (2024, Sec. 4.2) estimate KL(pi || pi_ref) from pairs (x_i, y_j), j != i, of one
    batch; a shift by one gives each prompt another example's response. The prompt is the untrained
    head of an example (labels IGNORE_INDEX); the response keeps its labels. Needs >= 2 groups (with one,
    the "mismatched" pair would be the group itself).

    Raises:
        ValueError: Fewer than two groups.
    """
    if len(groups) < 2:
        raise ValueError("mismatched pairs need at least 2 groups in a batch")
    heads, tails = [], []
    for g in groups:
        example = g["responses"][0]
        start = next((t for t, label in enumerate(example["labels"]) if label != IGNORE_INDEX),
                     len(example["labels"]))
        heads.append(example["input_ids"][:start])
        tails.append((example["input_ids"][start:], example["labels"][start:]))
    out = []
    for b, head in enumerate(heads):
        ids, labels = tails[b - 1]  # b - 1 = -1 for the first group: the last group's response
        out.append({"responses": [{"input_ids": head + ids, "labels": [IGNORE_INDEX] * len(head) + labels}],
                    "label": None, "row": groups[b]["row"]})
    return out


def collate_preference_groups(groups: list[Group], pad_id: int) -> dict[str, Any]:
    """Stack the responses of B groups slot-major into one right-padded batch.

    Shapes:
        input_ids, attention_mask, labels: (K·B)×T, row k·B + b = response k of group b;
        group_index: B×K long, the row of each group's slot (responses of one prompt); group_mask:
        B×K bool (False: filler in a shorter ranking); kto_labels: B bool (when the groups are
        labelled); ref_logps: B×K (when every group has precomputed reference log-probs); n_terms: B.
    """
    size, n_groups = max(len(g["responses"]) for g in groups), len(groups)
    rows = [g["responses"][k] if k < len(g["responses"]) else g["responses"][0] for k in range(size)
            for g in groups]
    batch = collate_padded(rows, pad_id)
    batch["group_index"] = torch.arange(size * n_groups).view(size, n_groups).T.contiguous()  # B×K
    batch["group_mask"] = torch.tensor([[k < len(g["responses"]) for k in range(size)] for g in groups])
    batch["n_terms"] = n_groups
    if groups[0].get("label") is not None:
        batch["kto_labels"] = torch.tensor([bool(g["label"]) for g in groups])
    if all("ref_logps" in g for g in groups):
        batch["ref_logps"] = torch.tensor([g["ref_logps"] + [0.0] * (size - len(g["ref_logps"])) for g in groups])
    return batch
