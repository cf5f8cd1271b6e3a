"""Reward-model ensembles (Xiao & Zhu, Eq. 10.72; Coste et al. 2024): several members, one combined reward.

An ensemble directory holds `ensemble.json` and one reward model per member (`member-0/`, ...):

    {"members": ["member-0", "member-1"], "weights": [1.0, 1.0], "combine": "mean", "k": 1.0}

`EnsembleScorer` is a `Scorer` (usable for PPO, best-of-N, labeling, eval, through
`alignkit.rollout.score.load_scorer`) and records the members' disagreement of its last call.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from alignkit.errors import AlignkitError

COMBINE = ("mean", "mean_minus_std", "min")
ENSEMBLE_FILE = "ensemble.json"


def combine_rewards(scores: torch.Tensor, *, combine: str = "mean", weights: torch.Tensor | None = None,
                    k: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Combine the rewards of K members.

    Equations, r_1 .. r_K the members' rewards of one (x, y):
        mean:           r = (1 / K) sum_k w_k r_k               (Xiao & Zhu, Eq. 10.72; w_k = 1 by default)
        mean_minus_std: r = mean_k r_k - k * std_k r_k          (uncertainty penalty, Coste et al. 2024)
        min:            r = min_k r_k                           (worst case, Coste et al. 2024)
    std is the population std over members (unbiased=False). The book divides the weighted sum by K,
    not by sum_k w_k; weights that sum to K give the weighted mean.

    Shapes:
        scores: K×B; weights: K, optional; returns the combined B and metrics.

    Metrics: `reward/disagreement` (mean over B of the members' std), `reward/member_mean`.
    """
    if combine not in COMBINE:
        raise AlignkitError(f"option `combine`: expected one of {', '.join(COMBINE)}, got {combine!r}")
    K = scores.shape[0]
    std = scores.std(dim=0, unbiased=False)  # B
    if combine == "mean":
        w = torch.ones(K, dtype=scores.dtype) if weights is None else weights.to(scores.dtype)
        combined = (w[:, None] * scores).sum(dim=0) / K
    elif combine == "mean_minus_std":
        combined = scores.mean(dim=0) - k * std
    else:
        combined = scores.min(dim=0).values
    return combined, {"reward/disagreement": std.mean(), "reward/member_mean": scores.mean()}


class EnsembleScorer:
    """Several scorers combined by `combine_rewards`; `last_metrics` holds the last call's disagreement.

    Args:
        members: Scorers (usually `RewardModelScorer`s) on a common scale (e.g. each normalised).
        weights: One weight per member for `mean` (default 1).
        combine: `mean`, `mean_minus_std` or `min`.
        k: The std multiplier of `mean_minus_std`.
    """

    def __init__(self, members: list[Any], *, weights: list[float] | None = None, combine: str = "mean",
                 k: float = 1.0):
        if not members:
            raise AlignkitError("an ensemble needs at least one member")
        if weights is not None and len(weights) != len(members):
            raise AlignkitError(f"ensemble: {len(weights)} weights for {len(members)} members")
        combine_rewards(torch.zeros(1, 1), combine=combine)  # check the option early
        self.members, self.combine, self.k = members, combine, k
        self.weights = None if weights is None else torch.tensor(weights, dtype=torch.float32)
        self.last_metrics: dict[str, float] = {}

    def member_scores(self, prompts: list[Any], responses: list[Any]) -> torch.Tensor:
        """Every member's rewards. Shapes: returns K×B."""
        return torch.stack([member(prompts, responses).float() for member in self.members])

    def __call__(self, prompts: list[Any], responses: list[Any]) -> torch.Tensor:
        scores = self.member_scores(prompts, responses)
        combined, metrics = combine_rewards(scores, combine=self.combine, weights=self.weights, k=self.k)
        self.last_metrics = {name: float(value) for name, value in metrics.items()}
        return combined


def read_ensemble_spec(path: Path) -> dict[str, Any]:
    """The contents of `<path>/ensemble.json`, checked, with errors naming the file and field."""
    file = Path(path) / ENSEMBLE_FILE
    try:
        spec = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise AlignkitError(f"{file}: cannot read the ensemble description ({err})") from None
    members = spec.get("members") if isinstance(spec, dict) else None
    if not isinstance(members, list) or not members:
        raise AlignkitError(f"{file}, field 'members': expected a non-empty list of member directories")
    for name in members:
        if not (Path(path) / name / "config.json").is_file():
            raise AlignkitError(f"{file}, field 'members': {Path(path) / name} is not a reward model directory")
    return spec


def write_ensemble_spec(path: Path, members: list[str], *, weights: list[float] | None, combine: str,
                        k: float) -> None:
    """Write `<path>/ensemble.json` (member directories relative to `path`)."""
    spec = {"members": members, "weights": weights or [1.0] * len(members), "combine": combine, "k": k}
    (Path(path) / ENSEMBLE_FILE).write_text(json.dumps(spec, indent=2) + "\n")


def save_ensemble(out_dir: str | Path, member_dirs: list[str | Path], *, weights: list[float] | None = None,
                  combine: str = "mean", k: float = 1.0) -> Path:
    """Copy reward model directories into `out_dir/member-i/` and write `ensemble.json`; return `out_dir`."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    names = [f"member-{i}" for i in range(len(member_dirs))]
    for name, member in zip(names, member_dirs, strict=True):
        shutil.copytree(member, out_dir / name)
    write_ensemble_spec(out_dir, names, weights=weights, combine=combine, k=k)
    return out_dir
