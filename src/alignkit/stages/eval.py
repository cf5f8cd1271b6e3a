"""`alignkit eval`: every policy on the same held-out prompts with the same sample settings.

The prompts are a built world's held-out prompts (`world`) or any file of `{prompt}` records
(`prompts`); the scorer is the world's gold (`gold:<world>`, the default with a world) or a reward
model / ensemble directory (`scorer`). For each policy (`label=path`), one response per prompt is
sampled with the same seed, and scored: the scorer's mean with a 95% confidence interval (mean +-
1.96 s / sqrt(n); `gold_reward` / `gold_ci95` for a world's gold, else `score` / `score_ci95`), proxy
reward (the reward model), KL to the reference (`alignkit.rollout.evaluate`: exact per position,
and the k1 estimate mean of log pi(y|x) - log pi_ref(y|x)), win rate against reference samples
judged by the scorer (ties count 1/2), distinct-1/2 and mean length.

Best-of-N runs (`alignkit best-of-n` on the same held-out prompts) are evaluated from their saved
samples without sampling again: for each N, the expected figures of the winner of a random N-subset
(`alignkit.rollout.best_of_n`), with the analytic KL log N - (N - 1) / N.

Writes `eval.json` (`{"settings", "methods": {label: figures}}`) and `samples.jsonl` (one row per
method and prompt: prompt, response, gold, proxy, length).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from alignkit.accel import resolve
from alignkit.config import ModelConfig, RunConfig, SamplingConfig, require_world
from alignkit.data.formats import validate_records
from alignkit.data.load import load_records
from alignkit.errors import AlignkitError
from alignkit.models.load import load_causal_lm, load_tokenizer
from alignkit.rewards.config import RewardFunctionsConfig
from alignkit.rollout.best_of_n import analytic_kl, expected_best_of_n
from alignkit.rollout.evaluate import distinct_n, evaluate_policy
from alignkit.rollout.reward_mix import stage_reward
from alignkit.rollout.score import load_scorer
from alignkit.trainers.rundir import prepare_run_dir, resolve_output_dir, write_json_atomic


@dataclass
class EvalConfig:
    """Evaluate policies on held-out prompts: gold +- CI, proxy reward, KL, win rate, diversity, length."""

    LIMITS: ClassVar[dict[str, str]] = {"best_of_n_headline": ">= 1", "n_prompts": ">= 1", "batch_size": ">= 1"}

    run: RunConfig = field(default_factory=lambda: RunConfig(report_to=[]))
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    world: str = ""
    """Built world (e.g. `sentiment`) whose held-out prompts and gold scorer are used, unless `prompts` /
    `scorer` replace them."""
    prompts: str = ""
    """Prompts to evaluate on instead of the world's held-out ones: a file, dataset directory (`DIR:split`)
    or hub id of `{prompt}` records (strings or conversations)."""
    scorer: str = ""
    """What scores the responses: `gold:<world>`, or a reward model (or ensemble) directory; default: the
    world's gold scorer (none when `reward.functions` is set: give it here to weight it with them)."""
    reward: RewardFunctionsConfig = field(default_factory=RewardFunctionsConfig)
    """Reward functions (rewards as code) as the score, alone or weighted with `scorer`; they read the
    prompt records' other columns (e.g. `answer_match` reads `answer`). Each component's mean is reported."""
    policies: list[str] = field(default_factory=list)
    """Policies as `label=model_dir` (or a bare directory, labelled by its parent directory's name)."""
    reference: str = ""
    """Reference policy directory (KL and win rate); default: the first policy."""
    reward_model: str = ""
    """Proxy reward model (or ensemble) directory; empty: no proxy score."""
    best_of_n: list[str] = field(default_factory=list)
    """Best-of-N runs as `label=run_dir` (their `samples.jsonl`, on the same held-out prompts)."""
    best_of_n_headline: int = 16
    """The N reported under the best-of-N label itself; every N of the run's curve is also reported as `<label>-nN`."""
    n_prompts: int = 256
    """Prompts evaluated (the first N; >= 256 keeps the noise of the sentiment world's mean near +-0.03)."""
    batch_size: int = 64
    """Prompts per generation batch."""


def parse_labelled(items: list[str]) -> list[tuple[str, str]]:
    """`label=path` items as (label, path); a bare path is labelled by its run directory's name."""
    out = []
    for item in items:
        label, eq, path = item.partition("=")
        if not eq:
            path = item
            label = Path(item).parent.name if Path(item).name == "final" else Path(item).name
        out.append((label.strip(), path.strip()))
    labels = [label for label, _ in out]
    dupes = sorted({label for label in labels if labels.count(label) > 1})
    if dupes:
        raise AlignkitError(f"options `policies`/`best_of_n`: labels must be unique, repeated: {dupes}")
    return out


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its normal 95% confidence interval, 1.96 * s / sqrt(n)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, 1.96 * math.sqrt(var / n)


def win_rate(golds: list[float], ref_golds: list[float]) -> float:
    """Fraction of prompts where the policy's gold beats the reference's (ties count 1/2)."""
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(golds, ref_golds, strict=True)]
    return sum(wins) / len(wins) if wins else float("nan")


def _figures(golds: list[float], ref_golds: list[float], proxies: list[float] | None,
             key: str = "gold") -> dict[str, float]:
    gold, ci = mean_ci(golds)
    name = "gold_reward" if key == "gold" else key
    out = {name: gold, f"{key}_ci95": ci, "win_rate_vs_ref": win_rate(golds, ref_golds)}
    if proxies:
        out["proxy_reward"] = sum(proxies) / len(proxies)
    return out


class _Evaluator:
    """Loaded once: tokenizer, reference, scorers, prompts and the reference's own samples."""

    def __init__(self, cfg: EvalConfig, first_policy: str, world: Any):
        self.cfg, self.backend = cfg, resolve(cfg.run.accel)
        ref_dir = cfg.reference or first_policy
        self.tokenizer = load_tokenizer(ModelConfig(name_or_path=ref_dir), padding_side="left")
        self.ref = self.backend.freeze(load_causal_lm(ModelConfig(name_or_path=ref_dir), self.tokenizer))
        self.prompts, self.columns = eval_prompt_records(cfg, world)
        if len(self.prompts) < cfg.n_prompts:
            print(f"[eval] only {len(self.prompts)} prompts (asked for {cfg.n_prompts})", flush=True)
        spec = cfg.scorer or ("" if cfg.reward.functions else f"gold:{cfg.world}")
        self.gold, self.scorer_spec = stage_reward(spec, cfg.reward, world=world, backend=self.backend)
        # the figure's name: `gold` for a world's gold scorer alone, `score` for a reward model or a mix
        self.key = "gold" if self.scorer_spec == spec and spec.startswith("gold:") else "score"
        self.proxy = load_scorer(cfg.reward_model, backend=self.backend) if cfg.reward_model else None
        self.sampling = cfg.sampling.kwargs()
        # The reference's own samples (another seed) are what every policy's responses are compared with.
        _, samples = self._sample(self.ref, cfg.run.seed + 1, proxy=False)
        self.ref_gold = [s["gold"] for s in samples]  # `gold`: evaluate_policy's name for the scorer

    def _sample(self, policy: Any, seed: int, proxy: bool = True) -> tuple[dict[str, float], list[dict[str, Any]]]:
        return evaluate_policy(policy, self.ref, self.tokenizer, self.prompts, scorer=self.proxy if proxy else None,
                               gold=self.gold, sampling=self.sampling, seed=seed, batch_size=self.cfg.batch_size,
                               n_keep=len(self.prompts), backend=self.backend, columns=self.columns)

    def length(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def policy(self, label: str, path: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Figures and per-sample rows of one policy."""
        t0 = time.perf_counter()
        model = self.backend.freeze(load_causal_lm(ModelConfig(name_or_path=path), self.tokenizer))
        metrics, samples = self._sample(model, self.cfg.run.seed)
        golds = [s["gold"] for s in samples]
        proxies = [s["reward"] for s in samples] if self.proxy else None
        figures = {**_figures(golds, self.ref_gold, proxies, self.key), "kl": metrics["eval/kl"], "kl_k1": metrics["eval/kl_k1"],
                   "length": metrics["eval/length"], "distinct_1": metrics["eval/distinct_1"],
                   "distinct_2": metrics["eval/distinct_2"], "eos_fraction": metrics["eval/eos_fraction"],
                   **{k.removeprefix("eval/"): v for k, v in metrics.items() if k.startswith("eval/reward_")},
                   "path": path, "kind": "policy", "eval_seconds": time.perf_counter() - t0}
        rows = [{"method": label, "index": i, "prompt": s["prompt"], "response": s["response"], self.key: s["gold"],
                 "proxy": s.get("reward"), "length": self.length(s["response"])} for i, s in enumerate(samples)]
        return figures, rows


def _best_of_n(ev: _Evaluator, label: str, run_dir: str) -> tuple[dict[str, dict], list[dict[str, Any]]]:
    """Figures per N (and the headline N's rows) from a best-of-N run's saved samples."""
    if ev.key != "gold":
        raise AlignkitError(f"option `best_of_n` ({label}): best-of-N runs are evaluated from their saved gold "
                            f"scores, so `scorer` must be a world's gold (got {ev.scorer_spec!r})")
    path = Path(run_dir) / "samples.jsonl"
    if not path.is_file():
        raise AlignkitError(f"option `best_of_n`: {path} does not exist (run `alignkit best-of-n` first)")
    by_prompt = {_key(row["prompt"]): row for row in map(json.loads, path.read_text().splitlines()) if row}
    missing = [p for p in ev.prompts if _key(p) not in by_prompt]
    if missing:
        raise AlignkitError(f"{path}: {len(missing)} of the {len(ev.prompts)} held-out prompts were not sampled "
                            f"(e.g. {missing[0]!r}); run best-of-n on the world's held-out split, >= {len(ev.prompts)} prompts")
    rows = [by_prompt[_key(p)] for p in ev.prompts]
    if "gold" not in rows[0]:
        raise AlignkitError(f"{path}: no gold scores; run best-of-n with `world` set and `gold: true`")
    scores = torch.tensor([r["scores"] for r in rows])  # P×N, the proxy that picks
    gold = torch.tensor([r["gold"] for r in rows])  # P×N
    ref = torch.tensor(ev.ref_gold, dtype=torch.float64)[:, None]
    wins = (gold.double() > ref).double() + 0.5 * (gold.double() == ref).double()  # P×N vs the reference sample
    lengths = torch.tensor([[ev.length(t) for t in r["responses"]] for r in rows], dtype=torch.float64)
    n_max, out, samples = scores.shape[1], {}, []
    ns = sorted({2**i for i in range(n_max.bit_length()) if 2**i <= n_max} | {min(ev.cfg.best_of_n_headline, n_max)})
    for n in ns:
        golds = expected_best_of_n(scores, gold, n).tolist()
        pick = scores[:, :n].argmax(dim=1)  # a concrete winner among the first n samples, for text figures
        texts = [r["responses"][int(k)] for r, k in zip(rows, pick, strict=True)]
        ids = [ev.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        gold_mean, ci = mean_ci(golds)
        out[f"{label}-n{n}"] = {
            "gold_reward": gold_mean, "gold_ci95": ci, "kl": analytic_kl(n), "n": n, "kind": "best_of_n",
            "win_rate_vs_ref": float(expected_best_of_n(scores, wins, n).mean()),
            "proxy_reward": float(expected_best_of_n(scores, scores, n).mean()),
            "length": float(expected_best_of_n(scores, lengths, n).mean()),
            "distinct_1": distinct_n(ids, 1), "distinct_2": distinct_n(ids, 2), "path": run_dir}
        if n == min(ev.cfg.best_of_n_headline, n_max):
            out[label] = dict(out[f"{label}-n{n}"])
            samples = [{"method": label, "index": i, "prompt": p, "response": t, "gold": float(gold[i, int(k)]),
                        "proxy": float(scores[i, int(k)]), "length": len(x)}
                       for i, (p, t, k, x) in enumerate(zip(ev.prompts, texts, pick, ids, strict=True))]
    return out, samples


def _key(prompt: Any) -> str:
    """A prompt (string or conversation) as a dictionary key."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def eval_prompts(cfg: EvalConfig, world: Any) -> list[Any]:
    """The first `n_prompts` of option `prompts`' records, else of the world's held-out prompts."""
    return eval_prompt_records(cfg, world)[0]


def eval_prompt_records(cfg: EvalConfig, world: Any) -> tuple[list[Any], list[dict[str, Any]]]:
    """(`eval_prompts`, the other fields of each prompt's record: what reward functions read)."""
    if cfg.prompts:
        records = validate_records(load_records(cfg.prompts), "prompt", cfg.prompts).records[: cfg.n_prompts]
    else:
        records = [{"prompt": p} for p in world.prompts("heldout")[: cfg.n_prompts]]
    return [r["prompt"] for r in records], [{k: v for k, v in r.items() if k != "prompt"} for r in records]


def run(cfg: EvalConfig, world: Any = None) -> dict[str, Any]:
    """Evaluate every policy and best-of-N run; write `eval.json` and `samples.jsonl`; return the summary.

    `world`: the loaded world of option `world` (held-out prompts, gold scorer).
    """
    world = require_world(cfg, world)
    if world is None and not (cfg.prompts and (cfg.scorer or cfg.reward.functions)):
        raise AlignkitError("eval needs prompts and a scorer: set `world` (its held-out prompts and gold scorer), "
                            "or `prompts` (a file of {prompt} records) and `scorer` (a reward model directory) "
                            "or `reward.functions`")
    policies, bon_runs = parse_labelled(cfg.policies), parse_labelled(cfg.best_of_n)
    if not policies:
        raise AlignkitError("option `policies` is empty: give `label=model_dir` items (the first is the default reference)")
    out_dir = resolve_output_dir("eval", cfg.run.output_dir)
    prepare_run_dir(out_dir, cfg, resume=False)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.run.seed)
    ev = _Evaluator(cfg, policies[0][1], world)
    source = cfg.prompts or f"{cfg.world}'s held-out split"
    print(f"[eval] {len(policies)} policies + {len(bon_runs)} best-of-N runs on {len(ev.prompts)} prompts of "
          f"{source}, scored by {ev.scorer_spec} (T={cfg.sampling.temperature}, <= {cfg.sampling.max_new_tokens} "
          f"tokens, seed {cfg.run.seed})", flush=True)
    methods: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    for label, path in _progress(policies, cfg.run.progress):
        methods[label], samples = ev.policy(label, path)
        rows += samples
        figure = methods[label]["gold_reward" if ev.key == "gold" else "score"]
        print(f"[eval] {label}: {ev.key} {figure:.3f}, KL {methods[label]['kl']:.2f}", flush=True)
    for label, run_dir in bon_runs:
        found, samples = _best_of_n(ev, label, run_dir)
        methods.update(found)
        rows += samples
    settings = {"world": cfg.world, "prompts": cfg.prompts or f"{cfg.world}:heldout", "scorer": ev.scorer_spec,
                "n_prompts": len(ev.prompts), "max_new_tokens": cfg.sampling.max_new_tokens,
                "temperature": cfg.sampling.temperature, "sampling": cfg.sampling.kwargs(), "seed": cfg.run.seed,
                "reference": cfg.reference or policies[0][1],
                "reward_model": cfg.reward_model, "reference_win_rate": "vs reference samples drawn with seed + 1"}
    write_json_atomic(out_dir / "eval.json", {"settings": settings, "methods": methods})
    (out_dir / "samples.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    summary = {"stage": "eval", "output_dir": str(out_dir), "n_methods": len(methods), "n_prompts": len(ev.prompts),
               ev.key: {k: v["gold_reward" if ev.key == "gold" else "score"] for k, v in methods.items()},
               "wall_time_s": time.perf_counter() - t0}
    write_json_atomic(out_dir / "summary.json", summary)
    return summary


def _progress(items: list, enabled: bool) -> Any:
    if not enabled:
        return items

    return tqdm(items, desc="eval", unit="policy")
