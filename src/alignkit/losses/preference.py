"""Direct preference losses on sequence log-probs: DPO and its variants (IPO, cDPO, SimPO, ORPO, KTO, PL).

Inputs: sequence log-probs log pi(y|x) = sum_t log pi(y_t|x, y_<t) (shape B) of policy and reference,
unless a function takes length-normalised (average) log-probs. The implicit reward of DPO is
r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)) (Xiao & Zhu, Eq. 10.80, without beta log Z(x)).
Every loss reduces by the mean over the batch and returns metrics ``rewards/chosen``,
``rewards/rejected``, ``rewards/margins`` (means of the implicit rewards and their difference) and
``rewards/accuracy`` (fraction of pairs with the chosen reward above the rejected one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignkit.losses.reward import plackett_luce_loss
from alignkit.ops.masking import last_true_index

Metrics = dict[str, torch.Tensor]


def _reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> Metrics:
    """The shared ``rewards/*`` metrics from B implicit rewards of chosen and rejected responses."""
    chosen, rejected = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/accuracy": (chosen > rejected).to(chosen.dtype).mean(),
    }


def _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected):
    """Log-ratios log pi/pi_ref of the chosen and the rejected responses (each B); ref detached."""
    return policy_chosen - ref_chosen.detach(), policy_rejected - ref_rejected.detach()


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
) -> tuple[torch.Tensor, Metrics]:
    """DPO sigmoid loss (Rafailov et al. 2023, Eq. 7; Xiao & Zhu, Eq. 10.81-10.82).

    Equation: L = -mean log Sigmoid(beta * log(pi(y_c)/pi_ref(y_c)) - beta * log(pi(y_r)/pi_ref(y_r)))
    i.e. the Bradley-Terry loss (Eq. 10.36) on the implicit rewards beta * log(pi / pi_ref).

    Shapes:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: B sequence log-probs.
        returns: scalar loss and metrics.

    Reduces by the mean over pairs.
    """
    chosen, rejected = _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    loss = -F.logsigmoid(beta * (chosen - rejected)).mean()
    return loss, _reward_metrics(beta * chosen, beta * rejected)


def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
) -> tuple[torch.Tensor, Metrics]:
    """IPO loss (Azar et al. 2023, Eq. 17): regress the log-ratio gap onto 1 / (2 beta).

    Equation: h = log(pi(y_c)/pi_ref(y_c)) - log(pi(y_r)/pi_ref(y_r)),  L = mean (h - 1/(2 beta))^2,
    beta being the paper's tau (regularisation strength). With sequence log-probs (summed over tokens,
    as in the paper and OpenRLHF) the target gap 1/(2 beta) is in total nats; TRL passes per-token means
    (log-probs divided by the response length), which makes it a gap per token. This function takes
    whichever it is given (`DPOConfig.ipo_per_token` picks).

    Shapes:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: B sequence log-probs.
        returns: scalar loss and metrics (implicit rewards beta * log-ratio).

    Reduces by the mean over pairs.
    """
    chosen, rejected = _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    loss = ((chosen - rejected - 1.0 / (2.0 * beta)) ** 2).mean()
    return loss, _reward_metrics(beta * chosen, beta * rejected)


def cdpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float,
) -> tuple[torch.Tensor, Metrics]:
    """Conservative DPO (Mitchell 2023): DPO with labels flipped with probability eps.

    Equation, with z = beta * (log-ratio chosen - log-ratio rejected) as in ``dpo_loss``:
        L = mean [ -(1 - eps) log Sigmoid(z) - eps log Sigmoid(-z) ],  eps = ``label_smoothing`` (0: DPO).

    Shapes:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: B sequence log-probs.
        returns: scalar loss and metrics.

    Reduces by the mean over pairs.
    """
    chosen, rejected = _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    z = beta * (chosen - rejected)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses.mean(), _reward_metrics(beta * chosen, beta * rejected)


def simpo_loss(
    chosen_avg_logps: torch.Tensor,
    rejected_avg_logps: torch.Tensor,
    *,
    beta: float,
    gamma: float,
) -> tuple[torch.Tensor, Metrics]:
    """SimPO: reference-free, length-normalised, with a target margin (Meng et al. 2024, Eq. 6).

    Equation: L = -mean log Sigmoid(beta * avg log pi(y_c) - beta * avg log pi(y_r) - gamma),
    where avg log pi(y) = (1/|y|) sum_t log pi(y_t | x, y_<t). Implicit reward: beta * avg log pi.

    Shapes:
        chosen_avg_logps, rejected_avg_logps: B length-normalised (per-token mean) log-probs -> scalar.

    Reduces by the mean over pairs.
    """
    chosen, rejected = beta * chosen_avg_logps, beta * rejected_avg_logps
    loss = -F.logsigmoid(chosen - rejected - gamma).mean()
    return loss, _reward_metrics(chosen, rejected)


def orpo_loss(
    chosen_avg_logps: torch.Tensor,
    rejected_avg_logps: torch.Tensor,
    chosen_nll: torch.Tensor,
    *,
    beta: float,
) -> tuple[torch.Tensor, Metrics]:
    """ORPO: SFT loss plus an odds-ratio preference term (Hong et al. 2024, Eq. 6-7).

    Equations, with p = exp(avg log pi(y)) and odds(y) = p / (1 - p):
        L_OR = -log Sigmoid(log odds(y_c) - log odds(y_r))
        L    = mean chosen_nll + beta * mean L_OR
    log odds(y) = avg log pi(y) - log(1 - exp(avg log pi(y))), computed with expm1 for accuracy
    near p = 1. ``beta`` is the paper's lambda. Reference-free.

    Shapes:
        chosen_avg_logps, rejected_avg_logps: B length-normalised log-probs (< 0).
        chosen_nll: B (or scalar) SFT negative log-likelihood of the chosen responses.
        returns: scalar loss and metrics (rewards beta * avg log pi, ``loss/nll``, ``loss/or``).

    Reduces by the mean over pairs.
    """
    log_odds_chosen = chosen_avg_logps - torch.log(-torch.expm1(chosen_avg_logps))
    log_odds_rejected = rejected_avg_logps - torch.log(-torch.expm1(rejected_avg_logps))
    or_loss = -F.logsigmoid(log_odds_chosen - log_odds_rejected).mean()
    nll = chosen_nll.mean()
    loss = nll + beta * or_loss
    metrics = _reward_metrics(beta * chosen_avg_logps, beta * rejected_avg_logps)
    metrics.update({"loss/nll": nll.detach(), "loss/or": or_loss.detach()})
    return loss, metrics


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float,
    kl_ref: float | torch.Tensor,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """KTO loss on unpaired desirable / undesirable examples (Ethayarajh et al. 2024, Eq. 8).

    Equations, with r = log pi(y|x) - log pi_ref(y|x) and z0 = max(kl_ref, 0) the reference point
    (an estimate of KL(pi || pi_ref), detached). As in the paper (Sec. 4.2), `kl_ref` is the mean
    log-ratio over *mismatched* pairs (x_i, y_j), j != i, of the global batch, not over the batch's own
    pairs; `alignkit.trainers.dpo.kto_reference_point` computes it:
        desirable:   L_i = lambda_D * (1 - Sigmoid(beta * (r - z0)))
        undesirable: L_i = lambda_U * (1 - Sigmoid(beta * (z0 - r)))
        L = mean_i L_i

    Shapes:
        policy_logps, ref_logps: B sequence log-probs.
        labels: B bool, True = desirable; kl_ref: scalar.
        returns: scalar loss and metrics: ``rewards/chosen`` / ``rewards/rejected`` are the mean
            beta * r over desirable / undesirable examples (0 if there are none),
            ``rewards/accuracy`` the fraction with sign(r - z0) matching the label.

    Reduces by the mean over all examples.
    """
    labels = labels.to(torch.bool)
    log_ratio = policy_logps - ref_logps.detach()  # B
    z0 = torch.as_tensor(kl_ref, dtype=log_ratio.dtype, device=log_ratio.device).detach().clamp(min=0)
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (log_ratio - z0)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - log_ratio)))
    loss = torch.where(labels, desirable, undesirable).mean()
    rewards = beta * log_ratio.detach()
    chosen = torch.where(labels, rewards, 0.0).sum() / labels.sum().clamp(min=1)
    rejected = torch.where(labels, 0.0, rewards).sum() / (~labels).sum().clamp(min=1)
    metrics = {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "rewards/accuracy": ((log_ratio.detach() > z0) == labels).to(rewards.dtype).mean(),
    }
    return loss, metrics


def plackett_luce_dpo_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    *,
    beta: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Listwise DPO under the Plackett-Luce model (Rafailov et al. 2023, Eq. 18 / App. A.3).

    Equation: the Plackett-Luce loss (Xiao & Zhu, Eq. 10.60-10.61) on the implicit rewards
    r_k = beta * (log pi(y_k) - log pi_ref(y_k)) of a ranking ordered best first:
        L = -mean sum_k [ r_k - log sum_{i >= k} exp(r_i) ]
    With K = 2 this equals ``dpo_loss``.

    Shapes:
        policy_logps, ref_logps: B×K sequence log-probs, each row ordered best first.
        mask: B×K bool, optional; False marks padding in shorter lists.
        returns: scalar loss and metrics (``rewards/chosen`` = first item, ``rewards/rejected``
            = last present item, over lists with a present item; ``rewards/accuracy`` = fraction of
            lists whose top reward is first).

    Reduces by the sum over ranking stages, then the mean over lists.
    """
    rewards = beta * (policy_logps - ref_logps.detach())  # B×K
    loss, pl_metrics = plackett_luce_loss(rewards, mask)
    present = torch.ones_like(rewards, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    # A list with no present item adds no term to the loss (as in `plackett_luce_loss`) and is left out
    # of the reward metrics (its last index is -1).
    rows = present.any(dim=1)  # B
    last = last_true_index(present).clamp(min=0).unsqueeze(1)  # B×1, last present item
    metrics = _reward_metrics(rewards[rows, 0], rewards.gather(1, last).squeeze(1)[rows])
    metrics["rewards/accuracy"] = pl_metrics["rewards/accuracy"]
    return loss, metrics


PREFERENCE_LOSSES = {
    "sigmoid": dpo_loss,
    "ipo": ipo_loss,
    "cdpo": cdpo_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
    "kto": kto_loss,
    "plackett_luce": plackett_luce_dpo_loss,
}
