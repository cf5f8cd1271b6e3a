"""The reward model: a transformer backbone with a linear head on one token (Xiao & Zhu, Eq. 10.34).

    r(x, y) = h_last W_r        h_last: the top-layer representation of the last non-pad token of [x, y]

A reward model is a Hugging Face `*ForSequenceClassification` with one label. Decoder backbones
(Llama, GPT-2, Qwen, ...) score the last non-pad token; encoder backbones (BERT, ...) score their
pooled output (the first token), so they must be right-padded. `reward_scores` passes positions
cumsum(mask) - 1, so a left-padded and a right-padded batch give the same rewards. It is the plain
forward; the acceleration backends (`alignkit.accel`) score groups of rows faster with the same results.

Initialised from a causal LM (e.g. the SFT model) the head is new and drawn from N(0, 1 / (d + 1))
(Ziegler et al. 2019, Sec. 2.2); from a sequence classifier it is kept.

Normalisation after training (r' = g r + b, Ziegler et al. 2019) is in
`alignkit.models.reward_normalization`; its config keys are defined here.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from alignkit.config import ModelConfig
from alignkit.errors import AlignkitError
from alignkit.models.load import load_sequence_classifier, load_tokenizer
from alignkit.ops.masking import mask_positions

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
    mask = attention_mask.long()
    refuse_inner_pads(input_ids, mask, config.pad_token_id if pad_token_id is None else pad_token_id)
    scores = model(input_ids=input_ids, attention_mask=mask, position_ids=mask_positions(mask)).logits[:, 0]
    scores = scores.float()  # B
    return with_stored_bias(model, scores) if apply_bias else scores


def refuse_inner_pads(input_ids: torch.Tensor, mask: torch.Tensor, pad: int | None) -> None:
    """Raise when the pad id occurs on a real (masked-in) token: the reward would be read at the wrong token."""
    if pad is not None and bool(((input_ids == pad) & mask.bool()).any()):
        raise AlignkitError(f"the pad id {pad} occurs inside a sequence; the reward would be read at the wrong "
                            "token. Use a tokenizer whose pad token is distinct (alignkit's loader adds one)")


def with_stored_bias(model: torch.nn.Module, scores: torch.Tensor) -> torch.Tensor:
    """`scores` plus the stored normalisation bias `reward_bias` when the head has no bias of its own."""
    config = hf_model(model).config
    if not getattr(config, CONFIG_BIAS_FOLDED, True) and type(hf_model(model)).__name__ != REMOTE_CLASS:
        scores = scores + float(getattr(config, CONFIG_BIAS, 0.0))
    return scores


def load_reward_model(path: str, *, dtype: str = "float32", allow_unsafe_pickle: bool = False) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) of a saved reward model; `reward_scores(..., apply_bias=True)` scores it."""
    cfg = ModelConfig(name_or_path=str(path), dtype=dtype, allow_unsafe_pickle=allow_unsafe_pickle)
    tokenizer = load_tokenizer(cfg)
    model = load_sequence_classifier(cfg, num_labels=1, tokenizer=tokenizer).eval()
    score_head(model)  # fail early on a classifier with several labels
    return model, tokenizer
