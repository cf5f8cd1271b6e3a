"""`alignkit best-of-n`: sample N responses per prompt, score them, keep the best (Xiao & Zhu, Sec. 10.4.5).

For each prompt x the policy samples y_1..y_N (Eq. 10.85, by sampling), a scorer (a reward model,
an ensemble, or a world's gold scorer; see `alignkit.rollout.score.load_scorer`) gives r(x, y_i), and
the best response is y_best = argmax_i r(x, y_i) (Eq. 10.86). From the one set of N samples the
stage reports, for each N' in `ns`, the mean reward of best-of-N' (model and gold, averaged exactly
over all N'-subsets, `alignkit.rollout.best_of_n`) and the analytic KL log N' - (N' - 1) / N'.

Run directory: `config.yaml`; `samples.jsonl` (`{prompt, responses, scores, gold, best}` per prompt);
`best.jsonl` (`{prompt, completion, score, gold}`: the winners, SFT data for rejection sampling;
prompts whose best response is empty are left out); `summary.json` (the curve and counts). A
conversation prompt (message list) is rendered with the chat template; it is written as given, and
each response after it as an assistant turn, so the files are valid records again.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from alignkit.accel import resolve
from alignkit.config import ModelConfig, RunConfig, SamplingConfig, require_world
from alignkit.data.formats import validate_records
from alignkit.data.load import load_records
from alignkit.data.prompts import with_assistant_turns
from alignkit.errors import AlignkitError
from alignkit.models.load import load_causal_lm, load_tokenizer
from alignkit.rewards.config import RewardFunctionsConfig
from alignkit.rollout.best_of_n import best_index, best_of_n_curve
from alignkit.rollout.generate import sample, stop_token_ids, tokenize_prompts
from alignkit.rollout.reward_mix import score_flat, stage_reward
from alignkit.rollout.score import load_scorer
from alignkit.trainers.rundir import prepare_run_dir, resolve_output_dir, write_json_atomic


@dataclass
class BestOfNConfig:
    """Best-of-N sampling: N samples per prompt ranked by a scorer; the reward-vs-N (and KL) curve."""

    LIMITS: ClassVar[dict[str, str]] = {"prompt_offset": ">= 0", "max_prompts": ">= 0", "n": ">= 1", "ns": ">= 1",
                                        "batch_size": ">= 1"}

    run: RunConfig = field(default_factory=lambda: RunConfig(report_to=[]))
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    reward: RewardFunctionsConfig = field(default_factory=RewardFunctionsConfig)
    """Reward functions (rewards as code), alone or weighted with `scorer`."""
    scorer: str = ""
    """Scorer that picks the best: a reward model or ensemble directory, or `gold:<world>`; default `gold:<world>`
    (none when `reward.functions` is set: give it here to weight it with the functions)."""
    world: str = ""
    """A built world (e.g. `sentiment`): its prompts (unless `prompts_path`) and its gold scorer."""
    gold: bool = True
    """Also score every sample with the world's gold scorer (needs `world`)."""
    prompts_path: str = ""
    """File of `{prompt}` records; default: the world's prompts of `split`."""
    split: Literal["train", "heldout"] = "heldout"
    """Which of the world's prompt sets to use when `prompts_path` is not given."""
    prompt_offset: int = 0
    """Skip this many prompts first (e.g. a new slice per rejection-sampling round)."""
    max_prompts: int = 256
    """Use at most this many prompts (0: all)."""
    n: int = 16
    """Samples per prompt (N_max)."""
    ns: list[int] = field(default_factory=list)
    """The N's of the reported curve (each <= n); default 1, 2, 4, ... up to n."""
    batch_size: int = 128
    """Sequences per generation batch."""


def load_prompts(cfg: Any, world: Any) -> list[Any]:
    """The prompts: `prompts_path` records, else the world's `split`, sliced by `prompt_offset` / `max_prompts`."""
    return load_prompt_records(cfg, world)[0]


def load_prompt_records(cfg: Any, world: Any) -> tuple[list[Any], list[dict[str, Any]]]:
    """(prompts, the other fields of each prompt's record) as `load_prompts` slices them; a world's have none."""
    if cfg.prompts_path:
        records = validate_records(load_records(cfg.prompts_path), "prompt", cfg.prompts_path).records
    elif cfg.world:
        records = [{"prompt": p} for p in world.prompts(cfg.split)]
    else:
        raise AlignkitError("best-of-n needs prompts: set `prompts_path` (records with `prompt`) or `world`")
    records = records[cfg.prompt_offset :]
    records = records[: cfg.max_prompts] if cfg.max_prompts > 0 else records
    if not records:
        raise AlignkitError(f"no prompts left after `prompt_offset` {cfg.prompt_offset}")
    return [r["prompt"] for r in records], [{k: v for k, v in r.items() if k != "prompt"} for r in records]


def generate_samples(model: Any, tokenizer: Any, prompts: list[str], cfg: BestOfNConfig,
                     token_ids: list[list[int]] | None = None) -> list[list[str]]:
    """N sampled responses per prompt (decoded, special tokens dropped), seeded by `run.seed`.

    `token_ids`, when given, receives each sample's token ids (prompt-major, as the flat samples).
    """
    gen = torch.Generator().manual_seed(cfg.run.seed)
    device = next(model.parameters()).device
    flat = [p for p in prompts for _ in range(cfg.n)]
    texts: list[str] = []
    t0 = time.perf_counter()
    for start in range(0, len(flat), cfg.batch_size):
        ids, mask = tokenize_prompts(tokenizer, flat[start : start + cfg.batch_size])
        rollout = sample(model, ids.to(device), mask.to(device), **cfg.sampling.kwargs(), generator=gen,
                         eos_token_id=stop_token_ids(tokenizer, model), pad_token_id=tokenizer.pad_token_id,
                         backend=resolve(cfg.run.accel))
        texts += rollout.texts(tokenizer)
        if token_ids is not None:
            token_ids += rollout.response_token_lists()
        if cfg.run.progress:
            print(f"[best-of-n] sampled {len(texts)}/{len(flat)} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return [texts[i * cfg.n : (i + 1) * cfg.n] for i in range(len(prompts))]


def score_samples(scorer: Any, prompts: list[str], samples: list[list[str]], batch: int = 512,
                  columns: list[dict[str, Any]] | None = None,
                  token_ids: list[list[int]] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Scores of every sample, P×N (in chunks of `batch` texts), and a reward mix's component means.

    `columns`: the other fields of each prompt's record (for reward functions); `token_ids`: each sample's
    token ids, prompt-major. A chunk holds whole prompts, so a mix can standardise per prompt group.
    """
    n = len(samples[0]) if samples else 1
    flat_p = [p for p, row in zip(prompts, samples, strict=True) for _ in row]
    flat_r = [r for row in samples for r in row]
    index = [i for i, row in enumerate(samples) for _ in row]
    step = max(n, batch // n * n)
    parts, sums, counts = [], {}, {}
    for i in range(0, len(flat_r), step):
        scores, metrics = score_flat(scorer, flat_p[i : i + step], flat_r[i : i + step], columns=columns,
                                     indices=index[i : i + step], group_size=n,
                                     completion_ids=token_ids[i : i + step] if token_ids is not None else None)
        parts.append(scores)
        for key, value in metrics.items():  # chunk means -> means over all samples; error counts add up
            rows = 1 if key.endswith("_errors") else len(scores)
            sums[key] = sums.get(key, 0.0) + value * rows
            counts[key] = counts.get(key, 0) + (rows if rows > 1 or not key.endswith("_errors") else 0)
    return torch.cat(parts).view(len(samples), -1), {k: sums[k] / max(counts[k], 1) for k in sums}


def _check(cfg: BestOfNConfig) -> list[int]:
    if cfg.n < 1:
        raise AlignkitError(f"option `n`: expected >= 1, got {cfg.n}")
    ns = cfg.ns or [2**i for i in range(cfg.n.bit_length()) if 2**i <= cfg.n]
    bad = [n for n in ns if not 1 <= n <= cfg.n]
    if bad:
        raise AlignkitError(f"option `ns`: every N must be in 1..n={cfg.n}, got {bad}")
    if not (cfg.scorer or cfg.world or cfg.reward.functions):
        raise AlignkitError("option `scorer` is required (a reward model directory or gold:<world>), or set `world` "
                            "or `reward.functions`")
    return sorted(set(ns))


def _write_outputs(out_dir: Path, prompts: list[str], samples: list[list[str]], scores: torch.Tensor,
                   gold: torch.Tensor | None) -> int:
    """Write `samples.jsonl` and `best.jsonl`; return the number of winners written."""
    # An empty response cannot be SFT data: it never wins when any response has text.
    blank = torch.tensor([[not r.strip() for r in row] for row in samples])
    best = best_index(scores.masked_fill(blank, float("-inf")))
    rows, winners = [], []
    for i, prompt in enumerate(prompts):
        b = int(best[i])
        row = {"prompt": prompt, "responses": samples[i], "scores": scores[i].tolist(), "best": b}
        if gold is not None:
            row["gold"] = gold[i].tolist()
        rows.append(with_assistant_turns(row))
        if samples[i][b].strip():
            winner = {"prompt": prompt, "completion": samples[i][b], "score": float(scores[i, b])}
            winners.append(with_assistant_turns(winner | ({"gold": float(gold[i, b])} if gold is not None else {})))
    for name, items in (("samples.jsonl", rows), ("best.jsonl", winners)):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items))
        tmp.replace(out_dir / name)
    return len(winners)


def _print_curve(curve: list[dict[str, float]]) -> None:
    has_gold = "reward/gold" in curve[0]
    print(f"[best-of-n] {'N':>5} {'KL (analytic)':>14} {'reward/model':>13}" + (f" {'reward/gold':>12}" if has_gold else ""))
    for row in curve:
        gold = f" {row['reward/gold']:12.4f}" if has_gold else ""
        print(f"[best-of-n] {row['n']:5d} {row['kl_analytic']:14.4f} {row['reward/model']:13.4f}{gold}")


def run(cfg: BestOfNConfig, world: Any = None) -> dict[str, Any]:
    """Sample, score, select; write the samples, the winners and the reward/KL curve; return the summary.

    `world`: the loaded world of option `world` (its prompts and gold scorer).
    """
    ns = _check(cfg)
    world = require_world(cfg, world)
    t0 = time.perf_counter()
    out_dir = resolve_output_dir("best-of-n", cfg.run.output_dir)
    prepare_run_dir(out_dir, cfg, resume=False)
    torch.manual_seed(cfg.run.seed)
    prompts, columns = load_prompt_records(cfg, world)
    tokenizer = load_tokenizer(cfg.model, padding_side="left")
    model = load_causal_lm(cfg.model, tokenizer).eval()
    spec = cfg.scorer or ("" if cfg.reward.functions else f"gold:{cfg.world}")
    scorer, described = stage_reward(spec, cfg.reward, world=world, backend=resolve(cfg.run.accel))
    gold_scorer = load_scorer(f"gold:{cfg.world}", world=world) if cfg.gold and cfg.world else None
    print(f"[best-of-n] run dir: {out_dir}\n  {len(prompts)} prompts x N={cfg.n} samples = {len(prompts) * cfg.n} "
          f"generations of <= {cfg.sampling.max_new_tokens} tokens (T={cfg.sampling.temperature}); scorer "
          f"{described}; curve at N in {ns}", flush=True)
    token_ids: list[list[int]] = []
    samples = generate_samples(model, tokenizer, prompts, cfg, token_ids)
    scores, components = score_samples(scorer, prompts, samples, columns=columns, token_ids=token_ids)
    gold = score_samples(gold_scorer, prompts, samples)[0] if gold_scorer is not None else None
    n_winners = _write_outputs(out_dir, prompts, samples, scores, gold)
    curve = best_of_n_curve(scores, ns, gold)
    _print_curve(curve)
    summary = {"stage": "best-of-n", "output_dir": str(out_dir), "prompts": len(prompts), "n": cfg.n,
               "winners": n_winners, "best_file": str(out_dir / "best.jsonl"), "curve": curve,
               **{f"samples/{k}": v for k, v in components.items()},
               **{f"n{row['n']}/{k}": v for row in curve for k, v in row.items() if k != "n"},
               "wall_time_s": time.perf_counter() - t0}
    write_json_atomic(out_dir / "summary.json", summary)
    return summary
