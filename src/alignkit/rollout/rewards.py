"""From reward-model scores to the sequence scores an RL step trains on, and where they are placed.

A scorer is any callable `(prompts, responses) -> Tensor (B,)` (`alignkit.rollout.score`: a reward
model, a world's gold scorer, or a user's function). The raw scores of a rollout batch are shaped,
in this order (Ziegler et al. 2019, Sec. 2.2; Huang et al. 2024, "The N+ implementation details of
RLHF with PPO"):

    normalise:  s = (raw - mean) / std      (`ScoreNormalizer`: statistics of the initial policy,
                                             running statistics, or none)
    EOS trick:  s = penalty                 for responses that do not end with EOS (optional)
    clip:       s = clip(s, -c, c)          (optional)

The shaped score is added to the per-token KL-penalised rewards at the *last response token*
(`score_index`): the EOS when the response has one, else the last sampled token, never a pad.
"""

from __future__ import annotations

from typing import Literal

import torch

from alignkit.ops.masking import last_true_index


def score_index(response_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's last response token: its first EOS, else its last sampled token.

    A rollout's `response_mask` is True up to and including the first EOS and False on the pads
    after it, so the last True column (`alignkit.ops.masking.last_true_index`) is the EOS when there
    is one. Every row needs at least one response token (the sampler always draws one).

    Shapes:
        response_ids: B×R long. response_mask: B×R bool.
        returns: B long.

    Raises:
        ValueError: If a row has no response token (there is no token to put its score on).
    """
    index = last_true_index(response_mask)
    if (index < 0).any():
        raise ValueError("every response needs at least one token to carry its score")
    return index


class ScoreNormalizer:
    """Normalises raw reward-model scores to mean 0 and standard deviation 1.

    Modes: ``initial`` fixes the mean and std from the first batch it sees (the initial policy's
    samples, as Ziegler et al. 2019, Sec. 2.2, normalise the reward model), so the reward is the
    same function of the text for the whole run; ``running`` keeps running moments of every batch
    seen (parallel-variance merge of batch moments); ``none`` passes scores through. The state is a
    dict of floats saved in checkpoints.
    """

    def __init__(self, mode: Literal["initial", "running", "none"] = "initial", eps: float = 1e-6) -> None:
        if mode not in ("initial", "running", "none"):
            raise ValueError(f"mode must be initial, running or none, got {mode!r}")
        self.mode, self.eps = mode, eps
        self.count, self.mean, self.var = 0.0, 0.0, 1.0

    @property
    def learns(self) -> bool:
        """Whether `update` still changes the statistics (``running``, or ``initial`` before its first batch)."""
        return self.mode == "running" or (self.mode == "initial" and self.count == 0)

    def update(self, raw: torch.Tensor) -> None:
        """Take the statistics of a batch of raw scores into account (per the mode)."""
        if not self.learns:
            return
        raw = raw.detach().double()
        n, mean, var = float(raw.numel()), float(raw.mean()), float(raw.var(unbiased=False))
        total = self.count + n
        delta = mean - self.mean
        # Chan et al.'s merge of (count, mean, M2) of two samples.
        m2 = self.var * self.count + var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var, self.count = m2 / total, total

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        """(raw - mean) / sqrt(var + eps), or `raw` unchanged in mode ``none``. Shapes: (B,) -> (B,)."""
        if self.mode == "none":
            return raw
        return (raw - self.mean) / (self.var + self.eps) ** 0.5

    def state_dict(self) -> dict[str, float | str]:
        return {"mode": self.mode, "count": self.count, "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.var = float(state["count"]), float(state["mean"]), float(state["var"])


def shape_scores(
    raw: torch.Tensor,
    ends_with_eos: torch.Tensor,
    *,
    normalizer: ScoreNormalizer,
    missing_eos_penalty: float | None = None,
    clip: float | None = None,
    batch_raw: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Normalise raw scores, apply the EOS trick, clip (in that order; see the module docstring).

    The normaliser is updated with this batch first (a no-op after the first batch in mode
    ``initial``) from `batch_raw`: the raw scores of the whole batch, on every process (default `raw`;
    a multi-process run passes all processes' scores, so that every process normalises alike). With
    `missing_eos_penalty` p, a response cut at the length limit gets score p
    whatever the reward model said (the "EOS trick"), so the policy learns to finish its responses.

    Shapes:
        raw: B float. ends_with_eos: B bool.
        returns: (scores B float, metrics).

    Metrics: ``reward/normalized`` (mean shaped score), ``reward/clipfrac`` (fraction clipped).
    """
    for scores in (raw, batch_raw if batch_raw is not None else raw):  # every process stops at the same step
        if not torch.isfinite(scores).all():
            raise ValueError(f"non-finite reward-model score in the batch: {scores.tolist()}")
    normalizer.update(raw if batch_raw is None else batch_raw)
    scores = normalizer(raw.float())
    if missing_eos_penalty is not None:
        penalty = torch.full_like(scores, missing_eos_penalty)
        scores = torch.where(ends_with_eos.to(torch.bool), scores, penalty)
    clipped = torch.zeros_like(scores, dtype=torch.bool)
    if clip is not None:
        clipped = scores.abs() > clip
        scores = scores.clamp(-clip, clip)
    return scores, {"reward/normalized": scores.mean(), "reward/clipfrac": clipped.float().mean()}
