"""`alignkit ppo | a2c | reinforce | rloo | grpo`: RL from a reward with a KL penalty to the reference.

The objective (Ziegler et al. 2019, Eq. 2; Xiao & Zhu, Eq. 10.54-10.56) is

    maximise E_{x ~ D, y ~ pi(.|x)} [ r(x, y) - beta * log(pi(y|x) / pi_ref(y|x)) ]

with four models (Xiao & Zhu, Sec. 10.3.3): the policy pi (trained), the frozen reference pi_ref
(the starting policy; for a LoRA policy the same weights with the adapters disabled), the value
model V (trained, PPO / A2C / REINFORCE-with-baseline only; initialised from the reward model or
the policy) and the reward r (a reward model, or a world's gold scorer). One step, for every
algorithm (`rl_step`):

    1. rollout     prompts_per_step prompts x samples_per_prompt samples, KV-cache sampler, seeded
                   by (seed, step) so a resumed run draws the same tokens
    2. score       r(x, y), normalised, EOS trick, clipped (`alignkit.rollout.rewards`)
    3. forward     log pi_ref and V_old of the sampled tokens; log pi_old is the sampler's own (no
                   extra policy pass; `recompute_logprobs` recomputes it), and the first minibatch's
                   training forward, before any update, logs its parity with the sampler's
    4. rewards     r_t = -beta (log pi_old - log pi_ref) on every token, + score at the EOS
    5. advantages  per algorithm (`ALGORITHMS`): GAE, TD, reward-to-go - V, leave-one-out, group-normalised
    6. update      `epochs` passes over the batch in `minibatches` shuffled minibatches (one optimizer
                   step each), optionally stopped early when the approximate KL to pi_old is too large
    7. beta        fixed, or Ziegler's adaptive controller towards `kl.target`

Every `run.eval_every` steps and at the start and end, `evaluate_policy` samples held-out prompts
with a fixed seed and reports gold/RM reward, exact KL to the reference, length and distinct-n;
`summary.json` holds the first and last evaluation.
"""

from __future__ import annotations

import hashlib
import json
import time
from functools import partial
from typing import Any

import torch

from alignkit.errors import AlignkitError
from alignkit.losses.kl import kl_k3, kl_penalized_rewards
from alignkit.losses.policy import aggregation_terms
from alignkit.losses.rl_algorithms import Algorithm
from alignkit.ops.masking import masked_mean, masked_var
from alignkit.rollout.evaluate import evaluate_policy
from alignkit.rollout.generate import sample, stop_token_ids, tokenize_prompts
from alignkit.rollout.logprobs import sequence_logprobs
from alignkit.rollout.reward_mix import RewardMix, row_columns
from alignkit.rollout.rewards import score_index, shape_scores
from alignkit.rollout.types import Rollout
from alignkit.trainers.loop import global_batch_indices
from alignkit.trainers.rl_config import (  # noqa: F401 - the stage configs, importable from here too
    A2CConfig,
    ActorCriticConfig,
    GRPOConfig,
    PPOConfig,
    ReinforceConfig,
    RLConfig,
    RLOOConfig,
)
from alignkit.trainers.rl_setup import RLContext, print_plan, setup


def step_seed(seed: int, step: int, rank: int, purpose: str) -> int:
    """A 63-bit seed, a pure function of (seed, step, rank, purpose): resumed steps draw the same numbers."""
    digest = hashlib.blake2b(f"{seed}/{step}/{rank}/{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


# ---------------------------------------------------------------------------------------------
# One step: rollout -> score -> KL-shaped rewards -> advantages -> epochs of minibatch updates
# ---------------------------------------------------------------------------------------------


def generate_rollout(ctx: RLContext, step: int) -> tuple[Rollout, list[str], list[str], list[int]]:
    """Sample k responses to each prompt of this step (prompt-major rows).

    Returns (rollout, prompts, responses, prompt indices): one prompt and its index in `ctx.prompts`
    per row.
    """
    c, acc = ctx.cfg, ctx.loop.accelerator
    indices = global_batch_indices(len(ctx.prompts), c.prompts_per_step * acc.num_processes, step, c.run.seed)
    chosen = [int(i) for i in indices[acc.process_index :: acc.num_processes]]
    mine = [ctx.prompts[i] for i in chosen]
    prompt_ids, prompt_mask = tokenize_prompts(ctx.tokenizer, mine, chat=c.chat)
    k = c.samples_per_prompt
    generator = torch.Generator(device=acc.device).manual_seed(step_seed(c.run.seed, step, acc.process_index,
                                                                         "rollout"))
    rollout = sample(ctx.policy, prompt_ids.repeat_interleave(k, 0).to(acc.device),
                     prompt_mask.repeat_interleave(k, 0).to(acc.device), generator=generator,
                     eos_token_id=stop_token_ids(ctx.tokenizer, ctx.policy), pad_token_id=ctx.tokenizer.pad_token_id,
                     backend=ctx.loop.backend, **ctx.sampling())
    return rollout, [p for p in mine for _ in range(k)], rollout.texts(ctx.tokenizer), [i for i in chosen for _ in range(k)]


def score_rollout(ctx: RLContext, rollout: Rollout, prompts: list[str], responses: list[str],
                  indices: list[int] | None = None) -> tuple:
    """(shaped scores B, metrics): the reward (a reward model, gold, or a weighted mix with reward functions,
    which read the prompt records' columns and log `reward/<name>` each) normalised, EOS trick, clipped;
    gold logged."""
    r = ctx.cfg.reward
    component_metrics: dict[str, float] = {}
    if isinstance(ctx.scorer, RewardMix):
        indices = indices if indices is not None else [0] * len(prompts)
        raw, component_metrics = ctx.scorer.score(
            prompts, responses, columns=row_columns(ctx.columns, indices), completion_ids=rollout.response_token_lists(),
            indices=indices, group_size=ctx.cfg.samples_per_prompt)
    else:
        raw = ctx.scorer(prompts, responses)
    raw = torch.as_tensor(raw, dtype=torch.float32).to(rollout.logprobs.device)
    try:
        # The normaliser learns from every process's scores (it is saved from the main process only).
        batch_raw = ctx.loop.accelerator.gather(raw) if ctx.normalizer.learns else None
        scores, metrics = shape_scores(raw, rollout.ends_with_eos, normalizer=ctx.normalizer,
                                       missing_eos_penalty=r.missing_eos_penalty, clip=r.clip, batch_raw=batch_raw)
    except ValueError as err:
        raise AlignkitError(f"step {ctx.loop.step}: {err}") from None
    metrics.update(component_metrics)
    metrics["reward/model"] = raw.mean()
    if ctx.gold is not None:
        gold = raw if ctx.gold is ctx.scorer else torch.as_tensor(ctx.gold(prompts, responses))
        metrics["reward/gold"] = gold.float().mean()
    return scores, metrics


@torch.no_grad()
def forward_passes(ctx: RLContext, rollout: Rollout) -> dict[str, torch.Tensor]:
    """log pi_old (with entropy), log pi_ref and V_old of the response tokens, in micro-batches.

    log pi_old and the entropy are the sampler's (recorded with the tokens from the same distribution)
    unless `recompute_logprobs` is set; then a policy forward pass recomputes them here.
    """
    model, size = ctx.loop.model, ctx.cfg.optim.per_device_batch_size
    actor_critic = ctx.loop.accelerator.unwrap_model(model)
    fp32 = next(actor_critic.policy.parameters()).dtype == torch.float32  # half precision: decode != forward
    reuse = not ctx.cfg.recompute_logprobs and rollout.entropy is not None and fp32
    names = ("old_logprobs", "entropy", "old_values", "ref_logprobs")
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for start in range(0, rollout.batch_size, size):
        chunk = rollout.select(slice(start, start + size))
        if reuse:
            logprobs, entropy, values = chunk.logprobs, chunk.entropy, actor_critic.values(chunk)
        else:
            logprobs, entropy, values = model(chunk, ctx.cfg.sampling.temperature, with_entropy=True)
        parts["old_logprobs"].append(logprobs)
        parts["entropy"].append(entropy)
        parts["old_values"].append(values if values is not None else torch.zeros_like(logprobs))
        parts["ref_logprobs"].append(sequence_logprobs(ctx.ref, chunk, temperature=ctx.cfg.sampling.temperature,
                                                       backend=ctx.loop.backend))
    return {name: torch.cat(tensors) for name, tensors in parts.items()}


def rl_step(ctx: RLContext) -> dict[str, Any]:
    """One RL step on a fresh rollout batch; returns its metrics (the loop's step advances by one)."""
    c, step, t0 = ctx.cfg, ctx.loop.step, time.perf_counter()
    rollout, prompts, responses, indices = generate_rollout(ctx, step)  # 1. rollout
    t_gen = time.perf_counter()
    scores, metrics = score_rollout(ctx, rollout, prompts, responses, indices)  # 2. score
    t_score = time.perf_counter()
    exp = forward_passes(ctx, rollout)  # 3. log pi_old, log pi_ref, V_old
    mask, beta = rollout.response_mask, ctx.kl_ctl.value
    rewards, kl_metrics = kl_penalized_rewards(  # 4. per-token KL penalty + score at the EOS
        scores, exp["old_logprobs"], exp["ref_logprobs"], mask,
        kl_coef=beta if ctx.algo.kl_in_reward else 0.0, last_index=score_index(rollout.response_ids, mask))
    exp["advantages"], exp["returns"] = ctx.algo.targets(  # 5. advantages and value targets
        rewards, exp["old_values"], scores, mask, batch_scores=ctx.loop.accelerator.gather(scores),
        **c.targets_options())
    exp["response_mask"], exp["scores"] = mask, scores
    update_metrics = update_epochs(ctx, rollout, exp, step, beta)  # 6. epochs of minibatch updates
    kl_metrics["objective/kl"] = update_kl_coef(ctx, kl_metrics["objective/kl"], rollout.batch_size)  # 7. beta
    if "objective/non_score_reward" in kl_metrics:  # of the whole batch, like the KL it is made of
        kl_metrics["objective/non_score_reward"] = ctx.loop.accelerator.reduce(
            kl_metrics["objective/non_score_reward"].detach(), "mean")
    t_end = time.perf_counter()
    n_tokens = int(rollout.lengths.sum())
    metrics.update(kl_metrics)
    metrics.update(update_metrics)
    metrics.update(rollout_metrics(rollout, exp))
    metrics.update({
        "objective/kl_coef": beta, "objective/kl_coef_next": ctx.kl_ctl.value,
        "objective/scores": scores.mean(), "time/generation_s": t_gen - t0, "time/scoring_s": t_score - t_gen,
        "time/training_s": t_end - t_score, "perf/tokens_per_s": n_tokens / (t_end - t0),
        "perf/generation_tokens_per_s": n_tokens / max(t_gen - t0, 1e-9),
        "time/process_cpu_s": time.process_time(),  # CPU seconds of this process so far (all threads)
    })
    return {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}


def update_kl_coef(ctx: RLContext, kl: torch.Tensor, rows: int) -> torch.Tensor:
    """Move beta with the KL of the whole batch and return that KL (the processes' mean).

    Every process holds `rows` rows, so the mean over processes is the batch mean. Each process moves
    its own controller by that same value, and beta stays the same everywhere (a per-process KL
    would let the processes' betas drift apart, while a checkpoint keeps only the main process's).
    """
    kl = ctx.loop.accelerator.reduce(kl.detach(), "mean")  # a new tensor (a copy with one process)
    ctx.kl_ctl.update(kl, n_steps=rows * ctx.loop.world)
    return kl


def rollout_metrics(rollout: Rollout, exp: dict[str, torch.Tensor]) -> dict[str, Any]:
    """KL k3, entropy, parity, value fit, lengths and a hash of the sampled token ids."""
    mask = rollout.response_mask
    residual_var = masked_var(exp["returns"] - exp["old_values"], mask)
    explained = 1.0 - residual_var / masked_var(exp["returns"], mask).clamp(min=1e-8)
    k3 = torch.where(mask, kl_k3(exp["old_logprobs"], exp["ref_logprobs"]), 0.0).sum(dim=1).mean()
    digest = hashlib.sha1(rollout.response_ids.cpu().numpy().tobytes()).hexdigest()[:16]
    return {"objective/kl_k3": k3, "policy/entropy": masked_mean(exp["entropy"], mask),
            "value/explained_variance": explained,
            "rollout/length": rollout.lengths.float().mean(),
            "rollout/eos_fraction": rollout.ends_with_eos.float().mean(),
            "rollout/hash": digest}


def _minibatch(rollout: Rollout, exp: dict[str, torch.Tensor], index: torch.Tensor,
               loss_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rows `index` of the rollout and its per-sample tensors, with `n_terms` = the number of terms their
    loss averages (`aggregation_terms` of the loss's `aggregation`: by default their response tokens)."""
    options = loss_options or {}
    batch: dict[str, Any] = {name: tensor[index] for name, tensor in exp.items()}
    batch["rollout"] = rollout.select(index)
    batch["n_terms"] = aggregation_terms(batch["response_mask"], options.get("aggregation", "token"),
                                         max_len=options.get("max_len"))
    return batch


def rl_loss(model: torch.nn.Module, batch: dict[str, Any], *, algo: Algorithm, cfg: RLConfig,
            kl_coef: float, parity_out: list | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The algorithm's loss on one micro-batch, as a SUM over its terms (`TrainLoop.update`): the loss is a
    mean over the micro-batch's `n_terms` terms (tokens, or responses for GRPO's sequence aggregation), so
    loss x n_terms summed over micro-batches and processes, divided once by their total, is the loss of
    the whole minibatch however it is split.

    With `parity_out` (the step's first minibatch, before any update) the largest difference between
    these log-probs and the sampler's is appended to it: the log-prob parity check.
    """
    logprobs, _, values = model(batch["rollout"], cfg.sampling.temperature)
    if parity_out is not None:
        rollout = batch["rollout"]
        parity_out.append(torch.where(rollout.response_mask, (logprobs.detach() - rollout.logprobs).abs(), 0.0).max())
    loss, metrics = algo.loss(logprobs, values, batch, kl_coef=kl_coef, **cfg.loss_options())
    return loss * batch["n_terms"], metrics


def update_epochs(ctx: RLContext, rollout: Rollout, exp: dict[str, torch.Tensor], step: int,
                  kl_coef: float) -> dict[str, float]:
    """`epochs` passes over the batch in `minibatches` shuffled near-equal minibatches (`minibatch_sizes`), one
    optimizer step each, accumulated over micro-batches of `optim.per_device_batch_size`; mean metrics."""
    c, loop = ctx.cfg, ctx.loop
    seed = step_seed(c.run.seed, step, loop.accelerator.process_index, "shuffle")
    generator = torch.Generator().manual_seed(seed)
    micro = c.optim.per_device_batch_size
    loss_options = c.loss_options()
    loss_fn = partial(rl_loss, algo=ctx.algo, cfg=c, kl_coef=kl_coef)
    approx_kl_limit = c.approx_kl_limit()
    history: list[dict[str, float]] = []
    epochs_run = 0
    parity: list[torch.Tensor] = []
    for _ in range(c.epochs):
        order = torch.randperm(rollout.batch_size, generator=generator).to(rollout.response_ids.device)
        epoch = []
        for index in order.tensor_split(c.minibatches):  # exactly `minibatches`, sizes as minibatch_sizes
            parts = [_minibatch(rollout, exp, index[i : i + micro], loss_options)
                     for i in range(0, len(index), micro)]
            first = not history and not epoch
            epoch.append(loop.update(parts, partial(loss_fn, parity_out=parity) if first else loss_fn,
                                     advance=False))
        history += epoch
        epochs_run += 1
        approx_kl = sum(m.get("policy/approx_kl", 0.0) for m in epoch) / len(epoch)
        if approx_kl_limit is not None and approx_kl > approx_kl_limit:
            break
    loop.advance()
    keys = {k for m in history for k in m if isinstance(m[k], int | float)}
    out = {k: sum(m.get(k, 0.0) for m in history) / len(history) for k in keys}
    out["policy/epochs"] = epochs_run
    out["rollout/logprob_parity_max_abs"] = float(torch.stack(parity).max())
    out.pop("value/mean", None)
    return out


# ---------------------------------------------------------------------------------------------
# Evaluation and the stage
# ---------------------------------------------------------------------------------------------


def evaluate(ctx: RLContext) -> dict[str, float]:
    """Held-out evaluation (fixed seed); writes `samples/step-N.jsonl`. Empty without held-out prompts."""
    if not ctx.eval_prompts or not ctx.loop.accelerator.is_main_process:
        return {}
    scorer = None if ctx.scorer is ctx.gold else ctx.scorer
    metrics, samples = evaluate_policy(
        ctx.policy, ctx.ref, ctx.tokenizer, ctx.eval_prompts, scorer=scorer, gold=ctx.gold,
        sampling=ctx.sampling(), seed=ctx.cfg.run.seed, batch_size=ctx.cfg.eval_batch_size,
        n_keep=ctx.cfg.n_samples, backend=ctx.loop.backend, columns=ctx.eval_columns)
    path = ctx.loop.out_dir / "samples" / f"step-{ctx.loop.step}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in samples))
    return metrics


def run(cfg: RLConfig, world: Any = None) -> dict[str, Any]:
    """Train the policy with `cfg.algorithm`, evaluate before and after, save `final/`; return the summary.

    `world`: the loaded world named by `world` / `reward.gold_world` (`alignkit.worlds.get_world`).
    """
    ctx = setup(cfg, world)
    loop = ctx.loop
    print_plan(ctx)
    start = loop.resume()
    ctx.load_state_dict(loop.stage_state)
    if start == 0:
        ctx.summary["before"] = evaluate(ctx)
        if ctx.summary["before"]:
            loop.log(ctx.summary["before"])
    for _ in range(start, loop.total_steps):
        metrics = rl_step(ctx)
        if cfg.run.eval_every and loop.step % cfg.run.eval_every == 0 and loop.step < loop.total_steps:
            metrics.update(evaluate(ctx))
        loop.stage_state = ctx.state_dict()
        loop.end_step(metrics)
    after = evaluate(ctx)
    if after:
        loop.log(after)
    summary = {"algorithm": cfg.algorithm, "before": ctx.summary.get("before", {}), "after": after,
               "kl_coef": ctx.kl_ctl.value, "cpu_s": time.process_time(), "train_prompts": len(ctx.prompts),
               "eval_prompts": len(ctx.eval_prompts), **ctx.data_counts}
    return loop.finish(ctx.tokenizer, summary, merge_lora=cfg.model.save_merged, model=ctx.policy)
