"""KL to the reference policy: per-token estimators, KL-shaped rewards and the KL coefficient.

The per-token estimators follow Schulman (2020), "Approximating KL divergence": with samples
y_t ~ pi and log-ratio d_t = log pi(y_t) - log pi_ref(y_t), each has expectation (k1, k3) or
approximately (k2) KL(pi || pi_ref) per token. Controllers follow Ziegler et al. 2019, Sec. 2.2.
"""

from __future__ import annotations

import torch

from alignkit.ops.masking import last_true_index


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimator k1 = log pi - log pi_ref (unbiased, can be negative).

    This is the per-token penalty of Xiao & Zhu, Eq. 10.52/10.56 and Ziegler et al. 2019, Eq. 2.

    Shapes: logprobs, ref_logprobs B×T -> B×T. No reduction.
    """
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimator k2 = (log pi - log pi_ref)^2 / 2 (biased, >= 0, low variance).

    Source: Schulman (2020), "Approximating KL divergence".

    Shapes: logprobs, ref_logprobs B×T -> B×T. No reduction.
    """
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimator k3 = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1.

    Unbiased and >= 0 (Schulman 2020); the KL term of GRPO (Shao et al. 2024, Eq. 4).

    Shapes: logprobs, ref_logprobs B×T -> B×T. No reduction.
    """
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1


def kl_penalized_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    kl_coef: float | torch.Tensor,
    last_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token rewards: a KL penalty on every response token plus the score at the last one.

    Equation (Ziegler et al. 2019, Eq. 2; Xiao & Zhu, Eq. 10.73 written per token):
        r_t = -beta * (log pi(y_t) - log pi_ref(y_t)) + [t == last] * score
    so that sum_t r_t = score - beta * (log pi(y) - log pi_ref(y)).

    Shapes:
        scores: B sequence-level reward-model scores.
        logprobs, ref_logprobs: B×T log-probs of the sampled tokens under pi and pi_ref.
        response_mask: B×T bool.
        last_index: B long, the index of the last response token (the EOS, never a pad); if
            None it is the last True position of ``response_mask`` (``last_true_index``; a row
            without one raises ValueError).
        returns: ``(rewards, metrics)``; rewards B×T, 0 outside the mask.

    Metrics (batch means of per-sequence sums): ``objective/kl`` (sum_t k1),
    ``objective/non_score_reward`` (-beta * that), ``objective/kl_coef``. Inputs are detached.
    """
    mask = response_mask.to(torch.bool)
    kl = torch.where(mask, kl_k1(logprobs.detach(), ref_logprobs.detach()), 0.0)  # B×T
    rewards = -kl_coef * kl
    if last_index is None:
        last_index = last_true_index(mask)
        if (last_index < 0).any():
            raise ValueError("every response needs at least one token to carry its score")
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_index] += scores.detach().to(rewards.dtype)
    kl_per_seq = kl.sum(dim=1)  # B
    metrics = {
        "objective/kl": kl_per_seq.mean(),
        "objective/non_score_reward": (-kl_coef * kl_per_seq).mean(),
        "objective/kl_coef": torch.as_tensor(kl_coef, dtype=rewards.dtype).detach().clone(),
    }
    return rewards, metrics


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019, Sec. 2.2.

    Update rule, with KL the measured KL(pi || pi_ref) per sequence:
        e = clip((KL - target) / target, -0.2, 0.2)
        beta <- beta * (1 + e * n_steps / horizon)
    where ``n_steps`` is the number of samples (or steps) the KL was measured over and
    ``horizon`` sets the speed (the paper's K_beta = n_steps / horizon; 0.1 in the paper).

    The state is a plain dict of python floats (``state_dict``/``load_state_dict``) so it can be
    saved in a checkpoint.
    """

    def __init__(self, init_kl_coef: float, *, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        """Move beta towards the value that gives KL = target and return the new beta."""
        error = (float(current_kl) - self.target) / self.target
        error = min(max(error, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])


class FixedKLController:
    """A constant KL coefficient with the same interface as ``AdaptiveKLController``."""

    def __init__(self, init_kl_coef: float) -> None:
        self.value = float(init_kl_coef)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        """Return beta unchanged."""
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
