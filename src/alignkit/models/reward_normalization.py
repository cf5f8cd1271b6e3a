"""Reward normalisation and the loader file for a bias a head cannot hold.

Normalisation (Ziegler et al. 2019, Sec. 2.2): after training the reward is made mean 0 and std 1
on samples from the reference policy, r' = g r + b with g = 1 / std, b = -mean / std. The gain is
folded into the head weight exactly. The bias is folded into the head bias when the head has one
(e.g. BERT's classifier). Llama's (and most decoders') Hugging Face head has *no* bias and no exact
rewrite of the weights adds a constant, so for those heads b is stored in `config.json` as
`reward_bias` (with `reward_bias_folded: false`) and applied by `load_reward_model` /
`reward_scores`. A plain `AutoModelForSequenceClassification.from_pretrained` of such a model gives
g r = r' - b: unit std on the reference samples, shifted by the constant -b. Differences of rewards
(preferences, best-of-N, PPO with whitened advantages) are unaffected; raw values are.
"""

from __future__ import annotations

import math

import torch

from alignkit.errors import AlignkitError
from alignkit.models.reward_model import (
    CONFIG_BIAS,
    CONFIG_BIAS_FOLDED,
    CONFIG_GAIN,
    REMOTE_CLASS,
    REMOTE_MODULE,
    hf_model,
    score_head,
)


def normalization(scores: torch.Tensor) -> tuple[float, float]:
    """Gain and bias making `scores` mean 0 and std 1: g = 1 / std, b = -mean / std (Ziegler et al. 2019).

    Shapes:
        scores: N float (N >= 2, not all equal); returns two floats.
    """
    scores = scores.double()
    std = scores.std(unbiased=False).item()
    if scores.numel() < 2 or not math.isfinite(std) or std <= 0:
        raise AlignkitError(f"cannot normalise the reward: {scores.numel()} normalisation samples with std {std}")
    return 1.0 / std, -scores.mean().item() / std


def apply_normalization(model: torch.nn.Module, gain: float, bias: float) -> bool:
    """Make the model output g r + b: fold g into the head weight and b into its bias, if it has one.

    Without a head bias, `reward_bias` is written to the config for `reward_scores(apply_bias=True)`
    and `load_reward_model`. Composes with an earlier normalisation. Returns True if b was folded.
    """
    head = score_head(model)
    config = hf_model(model).config
    old_gain = float(getattr(config, CONFIG_GAIN, 1.0))
    old_bias = float(getattr(config, CONFIG_BIAS, 0.0)) if not getattr(config, CONFIG_BIAS_FOLDED, True) else 0.0
    with torch.no_grad():
        head.weight.mul_(gain)
        if head.bias is not None:
            head.bias.mul_(gain).add_(bias)
    folded = head.bias is not None
    setattr(config, CONFIG_GAIN, old_gain * gain)
    setattr(config, CONFIG_BIAS, 0.0 if folded else gain * old_bias + bias)
    setattr(config, CONFIG_BIAS_FOLDED, folded)
    if not folded:  # opt-in exact loading: AutoModelForSequenceClassification(..., trust_remote_code=True)
        config.auto_map = {**(getattr(config, "auto_map", None) or {}),
                           "AutoModelForSequenceClassification": f"{REMOTE_MODULE}.{REMOTE_CLASS}"}
    return folded


def remote_code_source(model: torch.nn.Module) -> str | None:
    """Source of `alignkit_reward.py`, saved beside a reward model whose bias is not in its head.

    With it, `AutoModelForSequenceClassification.from_pretrained(dir, trust_remote_code=True)` returns
    the model's own Hugging Face class with `reward_bias` added to its output: the normalised score
    exactly. Without `trust_remote_code` (the default) Hugging Face loads the plain class, whose score
    is the normalised one minus that constant. None when there is nothing to add.
    """
    hf = hf_model(model)
    if getattr(hf.config, CONFIG_BIAS_FOLDED, True):
        return None
    base = type(hf).__name__
    if base == REMOTE_CLASS:
        base = type(hf).__mro__[1].__name__
    return f'''"""Written by alignkit: this reward model with its normalisation bias added to the score.

Loaded by `AutoModelForSequenceClassification.from_pretrained(dir, trust_remote_code=True)`. Without
`trust_remote_code`, Hugging Face loads the plain {base}, whose score is this one minus
the constant `reward_bias` of config.json (same ranking, same differences).
"""

from transformers import {base} as _Base


class {REMOTE_CLASS}(_Base):
    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        if getattr(self.config, "reward_bias_folded", True):
            return out
        bias = float(getattr(self.config, "reward_bias", 0.0))
        if isinstance(out, tuple):
            return (out[0] + bias, *out[1:])
        out.logits = out.logits + bias
        return out
'''
