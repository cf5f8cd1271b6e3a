"""The reward model: a transformer backbone with a linear head on one token (Xiao & Zhu, Eq. 10.34).

    r(x, y) = h_last W_r        h_last: the top-layer representation of the last non-pad token of [x, y]

A reward model is a Hugging Face `*ForSequenceClassification` with one label. Decoder backbones
(Llama, GPT-2, Qwen, ...) score the last non-pad token; encoder backbones (BERT, ...) score their
pooled output (the first token), so they must be right-padded. `reward_scores` passes positions
cumsum(mask) - 1, so a left-padded and a right-padded batch give the same rewards.

Initialised from a causal LM (e.g. the SFT model) the head is new and drawn from N(0, 1 / (d + 1))
(Ziegler et al. 2019, Sec. 2.2); from a sequence classifier it is kept.

Normalisation after training (r' = g r + b, Ziegler et al. 2019) is in
`alignkit.models.reward_normalization`; its config keys are defined here.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from alignkit.errors import AlignkitError
from alignkit.models.last_token import last_token_scores
from alignkit.ops.packing import packed_attention
from alignkit.ops.prefix import prefix_cache_forward

CONFIG_GAIN = "reward_gain"
CONFIG_BIAS = "reward_bias"
CONFIG_BIAS_FOLDED = "reward_bias_folded"
REMOTE_MODULE = "alignkit_reward"  # saved beside a model whose bias is not folded (reward_normalization.remote_code_source)
REMOTE_CLASS = "NormalizedRewardModel"
CONFIG_SEGMENTS = "reward_segments"  # segmentation of a model trained on segment scores (scorers sum them)


def hf_model(model: torch.nn.Module) -> Any:
    """The Hugging Face model inside a peft / accelerate wrapper (the model itself otherwise)."""
    model = getattr(model, "module", model)  # DDP
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def score_head(model: torch.nn.Module) -> torch.nn.Linear:
    """The linear head of a sequence classifier (`score` for decoders, `classifier` for encoders)."""
    hf = hf_model(model)
    head = getattr(hf, "score", None)
    head = getattr(hf, "classifier", None) if head is None else head
    if hasattr(head, "modules_to_save"):  # peft trains (and saves) a copy of the head
        head = head.modules_to_save["default"]
    if head is not None and not isinstance(head, torch.nn.Linear):
        head = getattr(head, "out_proj", head)  # RoBERTa-style heads end in `out_proj`
    if not isinstance(head, torch.nn.Linear):
        raise AlignkitError(f"{type(hf).__name__} has no linear `score`/`classifier` head to use as a reward head")
    if head.out_features != 1:
        raise AlignkitError(f"the reward head has {head.out_features} outputs; a reward model needs num_labels=1")
    return head


def init_head(model: torch.nn.Module, seed: int = 0) -> None:
    """Draw the head weight from N(0, 1 / (d + 1)) and zero its bias (Ziegler et al. 2019, Sec. 2.2)."""
    head = score_head(model)
    gen = torch.Generator().manual_seed(seed)
    d = head.in_features
    with torch.no_grad():
        weight = torch.randn(head.weight.shape, generator=gen) / math.sqrt(d + 1)
        head.weight.copy_(weight.to(head.weight.dtype))
        if head.bias is not None:
            head.bias.zero_()


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's last real token, for left- and right-padded rows alike.

    Shapes:
        attention_mask: B×T (bool or 0/1); returns B long.
    """
    T = attention_mask.shape[1]
    return T - 1 - attention_mask.long().flip(1).argmax(dim=1)


def reward_scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                  pad_token_id: int | None = None, apply_bias: bool = False) -> torch.Tensor:
    """Rewards r(x, y) of a padded batch of [x, y] sequences (Eq. 10.34), with gradients if enabled.

    The reward is read at each row's last token of the attention mask; pad ids inside a sequence
    are refused, so this is also the token the Hugging Face head reads (the rightmost non-pad).
    Llama-family classifiers run their last layer at that token only (`alignkit.models.last_token`).
    Positions are cumsum(mask) - 1, so left padding does not shift them.

    Args:
        model: A sequence classifier with one label (or its peft / DDP wrapper).
        input_ids, attention_mask: B×T, right- or (decoders only) left-padded.
        pad_token_id: The pad id (default: the model config's).
        apply_bias: Add the stored normalisation bias `reward_bias` when the head has no bias.

    Shapes:
        returns: B float.
    """
    config = hf_model(model).config
    pad = config.pad_token_id if pad_token_id is None else pad_token_id
    mask = attention_mask.long()
    _refuse_inner_pads(input_ids, mask, pad)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # B×T
    # The last layer at the read token only, for the models that allow it (alignkit.models.last_token).
    scores = last_token_scores(model, input_ids, mask, positions, last_token_index(mask))
    if scores is None:
        scores = model(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits[:, 0]
    return _with_bias(model, scores.float(), apply_bias)  # B


def _refuse_inner_pads(input_ids: torch.Tensor, mask: torch.Tensor, pad: int | None) -> None:
    if pad is not None and bool(((input_ids == pad) & mask.bool()).any()):
        raise AlignkitError(f"the pad id {pad} occurs inside a sequence; the reward would be read at the wrong "
                            "token. Use a tokenizer whose pad token is distinct (alignkit's loader adds one)")


def _with_bias(model: torch.nn.Module, scores: torch.Tensor, apply_bias: bool) -> torch.Tensor:
    """`scores` plus the stored normalisation bias `reward_bias` when asked and the head has no bias."""
    config = hf_model(model).config
    if apply_bias and not getattr(config, CONFIG_BIAS_FOLDED, True) and type(hf_model(model)).__name__ != REMOTE_CLASS:
        scores = scores + float(getattr(config, CONFIG_BIAS, 0.0))
    return scores


def shares_prefixes(model: torch.nn.Module) -> bool:
    """Whether `model` can score with `shared_prefix_scores`: a causal (decoder) classifier, read at its last token."""
    from alignkit.ops.prefix import model_allows_sharing

    return getattr(hf_model(model), "score", None) is not None and model_allows_sharing(hf_model(model).config)


def shared_prefix_scores(model: torch.nn.Module, layout: dict[str, torch.Tensor], *,
                         pad_token_id: int | None = None) -> torch.Tensor:
    """Rewards of the N sequences of a `shared_prefix_layout`, each group's prefix run once.

    `prefix_cache_forward` runs the G prefixes, then the suffixes against their keys and values, and
    the head reads each suffix's last token. The rewards equal `reward_scores` of the full rows to
    float rounding, gradients included. Decoder classifiers only (`shares_prefixes`).

    Shapes:
        returns: N float.
    """
    config = hf_model(model).config
    pad = config.pad_token_id if pad_token_id is None else pad_token_id
    suffix_ids, suffix_mask = layout["suffix_ids"], layout["suffix_mask"]
    if pad is not None and bool(((suffix_ids == pad) & suffix_mask.bool()).any()):
        raise AlignkitError(f"the pad id {pad} occurs inside a sequence; the reward would be read at the wrong "
                            "token. Use a tokenizer whose pad token is distinct (alignkit's loader adds one)")
    out = prefix_cache_forward(model, layout)[1]
    return out.logits[:, 0].float()


def packed_scores(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, apply_bias: bool = False) -> torch.Tensor:
    """Rewards of N sequences packed by prompt (`alignkit.ops.packing.packed_prompt_layout`), one pass.

    `batch` (from `alignkit.trainers.reward_data.collate_groups` or `packed_groups`) holds the
    sequences (`input_ids`, `attention_mask`, checked for pad ids inside them), the packed rows
    (`packed_input_ids`, `packed_attention_mask` G×1×W×W, `packed_position_ids`) and where each
    sequence ends (`read_row`, `read_col`, N); the head reads there through `last_token_scores`, so
    only models it supports are packed (`supports_packing`). The rewards equal `reward_scores` of
    the full rows to float rounding, gradients included; `apply_bias` as there.

    Shapes:
        returns: N float.
    """
    config, mask = hf_model(model).config, batch["packed_attention_mask"]
    _refuse_inner_pads(batch["input_ids"], batch["attention_mask"], config.pad_token_id)
    scores = last_token_scores(model, batch["packed_input_ids"], packed_attention(mask, config, model.dtype),
                               batch["packed_position_ids"], batch["read_col"], rows=batch["read_row"],
                               keys_mask=mask)
    if scores is None:
        raise AlignkitError("packed rows need a model that `last_token_scores` supports (a Llama-family "
                            "classifier outside DDP/FSDP)")
    return _with_bias(model, scores.float(), apply_bias)


def supports_packing(model: torch.nn.Module) -> bool:
    """Whether `packed_scores` can score `model`: `last_token_scores` supports it and its attention takes 4D masks."""
    from alignkit.models.last_token import supports_last_token
    from alignkit.ops.packing import accepts_packed_masks

    return supports_last_token(model) and accepts_packed_masks(hf_model(model).config)


def load_reward_model(path: str, *, dtype: str = "float32", allow_unsafe_pickle: bool = False) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) of a saved reward model; `reward_scores(..., apply_bias=True)` scores it."""
    from alignkit.config import ModelConfig
    from alignkit.models.load import load_sequence_classifier, load_tokenizer

    cfg = ModelConfig(name_or_path=str(path), dtype=dtype, allow_unsafe_pickle=allow_unsafe_pickle)
    tokenizer = load_tokenizer(cfg)
    model = load_sequence_classifier(cfg, num_labels=1, tokenizer=tokenizer).eval()
    score_head(model)  # fail early on a classifier with several labels
    return model, tokenizer
