"""Batch tokenized examples: right-padded, packed (several examples per row), or left-padded for generation.

Examples are dicts with `input_ids` and `labels` (lists of int, see `alignkit.data.tokenize`).
Padding and the attention mask come from the example lengths, never from `ids != pad_id`, so a
tokenizer whose pad id is its EOS id still trains EOS. `n_terms` is the number of trained
next-token terms (labels other than IGNORE_INDEX after the first position), the count
`TrainLoop.update` divides the summed loss by.

Packing puts several examples in one row with a block-diagonal causal mask and positions that
restart at 0 for each example, so no token attends across examples and each example sees the
same positions as alone: packing changes speed, not results.
"""

from __future__ import annotations

from typing import Any

import torch

from alignkit.ops.logprobs import IGNORE_INDEX
from alignkit.ops.masking import mask_positions


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with its tensors, and those of nested batches (dicts), on `device`; other values as they are."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else to_device(v, device) if isinstance(v, dict) else v
            for k, v in batch.items()}


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and 0/1 mask (from the lengths). Shapes: B×T each."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def count_terms(labels: list[int]) -> int:
    """Trained next-token terms of one example: labels after position 0 that are not IGNORE_INDEX."""
    return sum(label != IGNORE_INDEX for label in labels[1:])


def collate_padded(examples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-pad examples into a batch.

    Shapes:
        input_ids, attention_mask, labels: B x T (T = longest example); n_terms: int.
    """
    width = max(len(ex["input_ids"]) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        ids[i, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        mask[i, :n] = 1  # from the length, not from ids != pad_id
    labels[:, 0] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "n_terms": sum(count_terms(ex["labels"]) for ex in examples)}


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group example indices into rows of at most `capacity` tokens (first fit, longest first).

    An example longer than `capacity` gets a row of its own.
    """
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return [sorted(row) for row in rows]


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive 4-D attention mask: token q sees token k iff same segment and k <= q.

    mask[b, 0, q, k] = 0 if segment[b, q] == segment[b, k] and k <= q, else the dtype's minimum.
    Every token sees at least itself, so no softmax row is empty (padding is its own segment).
    Hugging Face models take a 4-D `attention_mask` as is (eager adds it, SDPA passes it on).

    Shapes:
        segment_ids: B x T; returns B x 1 x T x T.
    """
    T = segment_ids.size(1)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # B x T x T
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (same & causal)[:, None]  # B x 1 x T x T
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def collate_packed(
    examples: list[dict[str, Any]], pad_id: int, capacity: int, dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """Pack examples into rows of at most `capacity` tokens, attention kept within each example.

    Each example's first label is IGNORE_INDEX (no token of the previous example predicts it) and
    its positions restart at 0. Pass `input_ids`, `attention_mask` and `position_ids` to the model.

    Shapes:
        input_ids, labels, position_ids, segment_ids: R x T (R rows <= B examples);
        attention_mask: R x 1 x T x T additive (`block_causal_mask`, in `dtype`); n_terms: int.
    """
    rows = pack_rows([len(ex["input_ids"]) for ex in examples], capacity)
    width = max(sum(len(examples[i]["input_ids"]) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)  # -1: padding
    for r, row in enumerate(rows):
        start = 0
        for s, i in enumerate(row):
            n = len(examples[i]["input_ids"])
            ids[r, start:start + n] = torch.tensor(examples[i]["input_ids"], dtype=torch.long)
            labels[r, start + 1:start + n] = torch.tensor(examples[i]["labels"][1:], dtype=torch.long)
            positions[r, start:start + n] = torch.arange(n)
            segments[r, start:start + n] = s
            start += n
        positions[r, start:] = torch.arange(width - start)
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "segment_ids": segments,
            "attention_mask": block_causal_mask(segments, dtype),
            "n_terms": sum(count_terms(ex["labels"]) for ex in examples)}


def left_pad(sequences: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompts for generation, with positions that start at 0 at each prompt's first token.

    position_ids = cumsum(attention_mask) - 1, clamped at 0 on the padding.

    Shapes:
        input_ids, attention_mask, position_ids: B x T (T = longest prompt).
    """
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            ids[i, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[i, width - len(seq):] = 1
    return {"input_ids": ids, "attention_mask": mask, "position_ids": mask_positions(mask)}
