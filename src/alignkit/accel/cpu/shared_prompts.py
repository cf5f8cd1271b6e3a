"""Prompts run once: rows that repeat a prompt share one row, [prompt, suffix_1, ..., suffix_k].

The items of a preference group (chosen and rejected, K ranked responses) and the k samples of one
prompt all start with the same prompt tokens, and a causal model computes the same keys and values
for them each time. `shared_prompt_layout` lays each distinct prompt out once per row, followed by
its K suffixes side by side, under a 4D mask in which a suffix sees its prompt and itself only, at
the positions it has in its own sequence: one forward call, no KV cache, so it also works under
DDP. The cost is attention over wider rows with a dense mask, so the CPU backend shares rows when
`sharing_pays` (FLOP estimate at least 10% lower, rows at most `SHARED_ROW_MAX_WIDTH` wide) and the
model is a Llama-family model with sdpa or eager attention (`accepts_4d_masks`).
`shared_prefix_layout` finds each group's common prefix from token ids (preference and reward
groups), `shared_prompt_rows` lays it out in shared rows.
"""

from __future__ import annotations

from typing import Any

import torch

from alignkit.ops.logprobs import IGNORE_INDEX
from alignkit.ops.masking import mask_positions

SHARING_MARGIN = 0.9  # share when the estimated FLOPs fall below this fraction of the plain pass's
SHARED_ROW_MAX_WIDTH = 2048  # widest shared row: its G×1×W×W mask and attention scores grow with W^2
SHARED_ROW_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # rotary positions from position_ids, 4D masks honoured


def attention_window(config: Any) -> int | None:
    """The sliding attention window a model config uses (Mistral's `sliding_window`; Qwen2's only with
    `use_sliding_window`), or None for full attention."""
    window = getattr(config, "sliding_window", None)
    return window if getattr(config, "use_sliding_window", window is not None) else None


def distinct_rows(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(distinct ids U×P, their bool masks U×P, inverse B) of left-padded rows: row b is distinct row inverse[b]."""
    width = ids.shape[1]
    unique, inverse = torch.unique(torch.cat([ids, mask.long()], dim=1), dim=0, return_inverse=True)
    return unique[:, :width], unique[:, width:].bool(), inverse


def accepts_4d_masks(config: Any) -> bool:
    """Whether a model takes `shared_prompt_layout`'s rows: a Llama-family model (positions from
    `position_ids`, not from the mask or the column) whose attention is `sdpa` or `eager` (flash-
    attention kernels read only 2D padding masks), without a sliding window."""
    return (config is not None and getattr(config, "model_type", None) in SHARED_ROW_MODEL_TYPES
            and getattr(config, "_attn_implementation", None) in {"sdpa", "eager"}
            and attention_window(config) is None)


def mask_for_attention(mask: torch.Tensor, config: Any, dtype: torch.dtype) -> torch.Tensor:
    """The 4D mask in the form the model's attention reads: bool for sdpa, additive (0 / lowest) for eager."""
    if config._attn_implementation != "eager":
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def sharing_pays(config: Any, rows: int, groups: int, prompt_width: int, suffix_width: int, slots: int) -> bool:
    """Whether one shared row per prompt costs fewer FLOPs than one row per sequence (by `SHARING_MARGIN`),
    for rows at most `SHARED_ROW_MAX_WIDTH` wide.

    Per token, a layer's projections cost 2 * (4 H^2 + 3 H I) FLOPs (GQA and biases ignored); attention
    under a dense mask costs 4 H W^2 per row of width W, which sharing makes wider (W = P + k S).
    """
    plain_width, shared_width = prompt_width + suffix_width, prompt_width + slots * suffix_width
    if shared_width > SHARED_ROW_MAX_WIDTH:
        return False
    hidden = config.hidden_size
    per_token = 2 * (4 * hidden * hidden + 3 * hidden * getattr(config, "intermediate_size", 4 * hidden))
    plain = rows * (plain_width * per_token + 4 * hidden * plain_width**2)
    shared = groups * (shared_width * per_token + 4 * hidden * shared_width**2)
    return shared < SHARING_MARGIN * plain


def shared_prompt_layout(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, suffix_ids: torch.Tensor,
                         suffix_mask: torch.Tensor, pad_id: int) -> dict[str, torch.Tensor]:
    """Rows that repeat a prompt laid out as one row per distinct prompt, for a single forward pass.

    Row g is [prompt_g (left-padded, width P), slot 0, ..., slot k-1], each slot S columns holding one
    of the suffixes that follow prompt g (k = the largest group; a smaller group leaves slots empty).
    A suffix token attends to the real tokens of its prompt and to its own slot up to itself, at the
    positions it has in its own sequence (prompt tokens cumsum(mask) - 1, suffix token j the next
    prompt position + j), so every output equals that of the sequence alone to float rounding; the
    prompt runs once instead of k times. Each token also attends to itself, which keeps the rows of
    pad and empty-slot queries finite (their outputs are never read).

    Args:
        prompt_ids, prompt_mask: B×P, left-padded; suffix_ids, suffix_mask: B×S, right-padded.

    Returns:
        input_ids G×W, attention_mask G×1×W×W bool (True: attend), position_ids G×W; `keep` K long,
        the columns whose outputs predict suffix tokens (the last prompt column, then each slot's
        first S - 1 columns); `group` B×S and `take` B×S: suffix token (b, j) is predicted by
        output `keep[take[b, j]]` of row `group[b, j]`; `columns` B×S: the column of suffix token (b, j).
    """
    unique, unique_mask, group = distinct_rows(prompt_ids, prompt_mask)
    (n_groups, width_p), (batch, width_s) = unique.shape, suffix_ids.shape
    device = prompt_ids.device
    order = torch.argsort(group, stable=True)
    counts = torch.bincount(group, minlength=n_groups)
    slot = torch.empty_like(group)
    slot[order] = torch.arange(batch, device=device) - (counts.cumsum(0) - counts)[group[order]]
    slots = int(counts.max())
    width = width_p + slots * width_s
    columns = width_p + slot[:, None] * width_s + torch.arange(width_s, device=device)[None]  # B×S
    rows = group[:, None].expand(batch, width_s)
    ids = torch.full((n_groups, width), pad_id, dtype=torch.long, device=device)
    real = torch.zeros((n_groups, width), dtype=torch.bool, device=device)
    ids[:, :width_p], real[:, :width_p] = unique, unique_mask
    ids[rows, columns], real[rows, columns] = suffix_ids, suffix_mask.bool()
    prompt_positions = mask_positions(unique_mask)  # G×P
    suffix_positions = unique_mask.sum(dim=1, keepdim=True) + torch.arange(width_s, device=device)[None]
    positions = torch.cat([prompt_positions, suffix_positions.repeat(1, slots)], dim=1)
    segment = torch.cat([torch.full((width_p,), -1, device=device),
                         torch.arange(slots, device=device).repeat_interleave(width_s)])  # W
    col = torch.arange(width, device=device)
    visible = (col[None] <= col[:, None]) & ((segment[None] == -1) | (segment[None] == segment[:, None]))  # W×W
    attention = (visible[None] & real[:, None, :]) | torch.eye(width, dtype=torch.bool, device=device)[None]
    keep = torch.cat([torch.tensor([width_p - 1], device=device),
                      (width_p + torch.arange(slots, device=device)[:, None] * width_s
                       + torch.arange(width_s - 1, device=device)[None]).reshape(-1)])
    take = torch.cat([torch.zeros((batch, 1), dtype=torch.long, device=device),
                      1 + slot[:, None] * (width_s - 1) + torch.arange(width_s - 1, device=device)[None]], dim=1)
    return {"input_ids": ids, "attention_mask": attention[:, None], "position_ids": positions,
            "keep": keep, "group": rows, "take": take, "columns": columns}


def shared_prompt_rows(shared: dict[str, torch.Tensor], pad_id: int, config: Any) -> dict[str, torch.Tensor] | None:
    """The items of a `shared_prefix_layout` in one row per distinct prefix (`shared_prompt_layout`),
    or None, before any tensor of it is built, when sharing would not save FLOPs (`sharing_pays`)."""
    index = shared["prefix_index"]
    prefix_ids, prefix_mask = shared["prefix_ids"][index], shared["prefix_mask"][index]
    _, _, group = distinct_rows(prefix_ids, prefix_mask)
    counts = torch.bincount(group)
    width_p, width_s = prefix_ids.shape[1], shared["suffix_ids"].shape[1]
    if not sharing_pays(config, len(index), len(counts), width_p, width_s, int(counts.max())):
        return None
    return shared_prompt_layout(prefix_ids, prefix_mask, shared["suffix_ids"], shared["suffix_mask"], pad_id)


def shared_prompt_logits(model: Any, layout: dict[str, torch.Tensor], config: Any, dtype: torch.dtype) -> torch.Tensor:
    """Logits G×K×V of `shared_prompt_layout` rows at its kept columns, from one forward call of `model`.

    `config` and `dtype` (the model's) give the mask's form (`mask_for_attention`). A model that ignores
    a tensor `logits_to_keep` (transformers < 4.49, remote code) is read at the kept columns here.
    """
    keep = layout["keep"]
    out = model(input_ids=layout["input_ids"], attention_mask=mask_for_attention(layout["attention_mask"], config, dtype),
                position_ids=layout["position_ids"], use_cache=False, logits_to_keep=keep)
    return out.logits if out.logits.shape[1] == keep.shape[0] else out.logits[:, keep]


def _common_prefix(rows: list[list[int]]) -> int:
    first, n = rows[0], min(len(r) for r in rows)
    for row in rows[1:]:
        n = next((j for j, (a, b) in enumerate(zip(first[:n], row[:n], strict=True)) if a != b), n)
    return n


def shared_prefix_layout(rows: list[list[int]], groups: list[list[int]], pad_id: int, *,
                         labels: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
    """Each group's common prefix (left-padded, once) and every item's suffix (right-padded).

    A prefix is the longest common token prefix of the group's items, kept at least one token shorter
    than each item (every item has a suffix) and, with `labels`, ending before the first labelled
    token of any item (so every labelled token is predicted from the last prefix column or a suffix).

    Args:
        rows: Token ids of the N sequences.
        groups: Item indices of each group; every item in exactly one group.
        labels: Per-row labels aligned with `rows` (IGNORE_INDEX where not trained), or None.

    Returns:
        prefix_ids, prefix_mask: G×L; suffix_ids, suffix_mask: N×S (and suffix_labels N×S with
        `labels`); prefix_index: N, the prefix row of each item.
    """
    prefixes, prefix_index, cut = [], [0] * len(rows), [0] * len(rows)
    for g, items in enumerate(groups):
        n = min(_common_prefix([rows[i] for i in items]), min(len(rows[i]) for i in items) - 1)
        if labels is not None:
            n = min([n] + [next((t for t, v in enumerate(labels[i]) if v != IGNORE_INDEX), n) for i in items])
        n = max(n, 0)
        prefixes.append(rows[items[0]][:n])
        for i in items:
            prefix_index[i], cut[i] = g, n
    width_l = max(1, max(len(p) for p in prefixes))
    width_s = max(len(row) - c for row, c in zip(rows, cut, strict=True))
    out = {"prefix_ids": torch.full((len(prefixes), width_l), pad_id, dtype=torch.long),
           "prefix_mask": torch.zeros((len(prefixes), width_l), dtype=torch.long),
           "suffix_ids": torch.full((len(rows), width_s), pad_id, dtype=torch.long),
           "suffix_mask": torch.zeros((len(rows), width_s), dtype=torch.long),
           "prefix_index": torch.tensor(prefix_index)}
    for g, prefix in enumerate(prefixes):
        if prefix:
            out["prefix_ids"][g, width_l - len(prefix):] = torch.tensor(prefix)
            out["prefix_mask"][g, width_l - len(prefix):] = 1
    if labels is not None:
        out["suffix_labels"] = torch.full((len(rows), width_s), IGNORE_INDEX, dtype=torch.long)
    for i, (row, c) in enumerate(zip(rows, cut, strict=True)):
        out["suffix_ids"][i, : len(row) - c] = torch.tensor(row[c:])
        out["suffix_mask"][i, : len(row) - c] = 1
        if labels is not None:
            out["suffix_labels"][i, : len(row) - c] = torch.tensor(labels[i][c:])
            if c == 0:  # token 0 has nothing before it to be predicted from (one pass never trains it)
                out["suffix_labels"][i, 0] = IGNORE_INDEX
    return out
