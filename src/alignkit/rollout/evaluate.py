"""Evaluate a policy on held-out prompts: reward, gold reward, exact KL to the reference, length, diversity.

`evaluate_policy` samples one response per prompt with a fixed seed (the same prompts and random
numbers at every evaluation, so the figures of successive evaluations differ only by the policy),
scores them with the reward model and/or gold scorer, and measures

    KL(pi || pi_ref) of a response = sum_t KL(pi(. | x, y_<t) || pi_ref(. | x, y_<t))

summed over the response tokens with the full next-token distributions (exact per position; its
expectation over sampled responses is the sequence KL, with less variance than the k1 estimate
sum_t log pi(y_t) - log pi_ref(y_t), which is also reported). Reward hacking shows in the length,
the fraction ending in EOS and distinct-n (unique n-grams / all n-grams over all responses).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from alignkit.accel import Backend
from alignkit.rollout.generate import sample, stop_token_ids, tokenize_prompts
from alignkit.rollout.reward_mix import RewardMix, row_columns
from alignkit.rollout.types import Rollout

Scorer = Callable[[list[str], list[str]], torch.Tensor]


def distinct_n(sequences: list[list[int]], n: int) -> float:
    """Distinct-n (Li et al. 2016): the number of unique n-grams over the number of n-grams, pooled."""
    grams = [tuple(seq[i : i + n]) for seq in sequences for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _scaled_logits(model: Any, rollout: Rollout, temperature: float) -> torch.Tensor:
    """Next-token logits / temperature predicting each response token: B×R×V float."""
    width_r = rollout.response_ids.shape[1]
    out = model(input_ids=rollout.full_ids(), attention_mask=rollout.full_mask().long(),
                position_ids=rollout.position_ids(), use_cache=False, logits_to_keep=width_r + 1)
    return out.logits[:, :-1, :].float() / temperature


@torch.no_grad()
def sequence_kl(policy: Any, ref: Any, rollout: Rollout, *,
                temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-response KL to the reference: exact per position, and the k1 estimate.

    Equations: exact = sum_t sum_v p_t(v) (log p_t(v) - log q_t(v)); k1 = sum_t log p_t(y_t) - log q_t(y_t),
    with p = softmax(policy logits / T), q = softmax(reference logits / T), t over response tokens.

    Shapes:
        returns: (exact B, k1 B).
    """
    logp = _scaled_logits(policy, rollout, temperature).log_softmax(dim=-1)  # B×R×V
    logq = _scaled_logits(ref, rollout, temperature).log_softmax(dim=-1)  # B×R×V
    per_token = (logp.exp() * (logp - logq)).sum(dim=-1)  # B×R
    picked = (logp - logq).gather(-1, rollout.response_ids[:, :, None]).squeeze(-1)  # B×R
    mask = rollout.response_mask
    return torch.where(mask, per_token, 0.0).sum(dim=1), torch.where(mask, picked, 0.0).sum(dim=1)


def _responses(rollout: Rollout) -> list[list[int]]:
    """Response token ids per row, without the EOS."""
    rows = []
    for ids, mask, eos in zip(rollout.response_ids, rollout.response_mask, rollout.ends_with_eos,
                              strict=True):
        row = ids[mask].tolist()
        rows.append(row[:-1] if bool(eos) else row)
    return rows


def evaluate_policy(
    policy: Any,
    ref: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    scorer: Scorer | None = None,
    gold: Scorer | None = None,
    sampling: dict[str, Any],
    seed: int = 0,
    batch_size: int = 64,
    n_keep: int = 16,
    backend: Backend | None = None,
    columns: list[dict[str, Any]] | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Sample one response per prompt (fixed seed), score it, and measure KL, length and diversity.

    Args:
        policy: The causal LM to evaluate (sampled in eval mode).
        ref: The reference policy (a causal LM, or any callable with the same forward).
        tokenizer: The policy's tokenizer (pad distinct from EOS).
        prompts: Held-out prompt texts.
        scorer: The training reward (e.g. a reward model), logged as ``eval/reward``.
        gold: The gold scorer, logged as ``eval/gold`` (e.g. `alignkit.rollout.score.GoldScorer`).
        sampling: Keyword arguments of `sample` (max_new_tokens, temperature, top_k, top_p, min_new_tokens).
        seed: Seed of the sampler's generator (the same at every evaluation).
        batch_size: Prompts per generation batch.
        n_keep: How many `{prompt, response, reward, gold}` samples to return.
        backend: The acceleration backend that samples (default `alignkit.accel.resolve()`).
        columns: The other fields of each prompt's record, for a `RewardMix` scorer's reward functions
            (each component's mean is logged as ``eval/reward_<name>``).

    Returns:
        (metrics, samples). Metrics: ``eval/gold``, ``eval/reward`` (when given), ``eval/kl`` (exact),
        ``eval/kl_k1``, ``eval/length``, ``eval/eos_fraction``, ``eval/distinct_1``, ``eval/distinct_2``.
    """
    generator = torch.Generator().manual_seed(seed)
    device = next(policy.parameters()).device
    texts, ids, token_lists, kl, kl_k1, lengths, eos = [], [], [], [], [], [], []
    for start in range(0, len(prompts), batch_size):
        prompt_ids, prompt_mask = tokenize_prompts(tokenizer, prompts[start : start + batch_size])
        rollout = sample(policy, prompt_ids.to(device), prompt_mask.to(device), generator=generator,
                         eos_token_id=stop_token_ids(tokenizer, policy), pad_token_id=tokenizer.pad_token_id, backend=backend,
                         **sampling)
        exact, k1 = sequence_kl(policy, ref, rollout, temperature=sampling.get("temperature", 1.0))
        texts += rollout.texts(tokenizer)
        ids += _responses(rollout)
        token_lists += rollout.response_token_lists()  # with the EOS, as the RL step gives reward functions
        kl.append(exact.cpu())
        kl_k1.append(k1.cpu())
        lengths.append(rollout.lengths.float().cpu())
        eos.append(rollout.ends_with_eos.float().cpu())
    metrics = {"eval/kl": float(torch.cat(kl).mean()), "eval/kl_k1": float(torch.cat(kl_k1).mean()),
               "eval/length": float(torch.cat(lengths).mean()),
               "eval/eos_fraction": float(torch.cat(eos).mean()),
               "eval/distinct_1": distinct_n(ids, 1), "eval/distinct_2": distinct_n(ids, 2),
               "eval/n_prompts": len(prompts)}
    scored: dict[str, list[float]] = {}
    for name, fn in (("reward", scorer), ("gold", gold)):
        if isinstance(fn, RewardMix):
            indices = list(range(len(prompts)))
            values, parts = fn.score(prompts, texts, columns=row_columns(columns or [{}] * len(prompts), indices),
                                     completion_ids=token_lists, indices=indices)
            metrics.update({f"eval/reward_{k.removeprefix('reward/')}": v for k, v in parts.items()})
        elif fn is not None:
            values = fn(prompts, texts)
        else:
            continue
        values = torch.as_tensor(values, dtype=torch.float32)
        metrics[f"eval/{name}"] = float(values.mean())
        scored[name] = values.tolist()
    samples = [{"prompt": p, "response": r, **{k: v[i] for k, v in scored.items()}}
               for i, (p, r) in enumerate(zip(prompts[:n_keep], texts[:n_keep], strict=True))]
    return metrics, samples
