"""A small synthetic pipeline directory (eval, reward, PPO, DPO, best-of-N, RS runs) for the report tests."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from alignkit.report import ReportConfig

POLICIES = {"sft": (0.15, 0.0), "ppo": (0.62, 5.5), "rloo": (0.55, 4.0), "grpo": (0.5, 3.5), "dpo": (0.35, 2.0),
            "rejection_sampling": (0.3, 1.5)}


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_runs(root: Path) -> ReportConfig:
    """Write a synthetic `runs/<name>` tree; return the report config that reads it."""
    runs = root / "demo"
    rng = random.Random(0)
    methods, samples = {}, []
    for label, (gold, kl) in POLICIES.items():
        step = runs / label
        _write(step / ".done.json", {"seconds": 30.0 + 10 * kl, "fingerprint": "x"})
        methods[label] = {"gold_reward": gold, "gold_ci95": 0.03, "kl": kl, "proxy_reward": 2 * gold, "kind": "policy",
                          "win_rate_vs_ref": 0.5 + gold / 2, "length": 14 - kl, "distinct_2": 0.8 - kl / 10,
                          "path": str(step / "final")}
        if label != "sft":
            _jsonl(step / "metrics.jsonl", [{"step": s, "eval/kl": kl * s / 40, "eval/gold": 0.15 + (gold - 0.15) * s / 40,
                                             "eval/reward": 2 * gold * s / 40} for s in range(0, 41, 10)])
        for i in range(8):
            samples.append({"method": label, "index": i, "prompt": f"prompt <{i}> &", "response": f" text {i} of {label}",
                            "gold": rng.random(), "proxy": rng.gauss(0, 1), "length": 5})
    for n in (1, 2, 4, 8, 16):
        kl = math.log(n) - (n - 1) / n
        methods[f"best_of_n-n{n}"] = {"gold_reward": 0.15 + 0.1 * math.sqrt(kl), "kl": kl, "n": n, "kind": "best_of_n",
                                      "proxy_reward": 0.5 * math.sqrt(kl), "path": str(runs / "best_of_n")}
    methods["best_of_n"] = dict(methods["best_of_n-n16"], win_rate_vs_ref=0.6, length=12.0, distinct_2=0.7)
    _write(runs / "best_of_n" / ".done.json", {"seconds": 50.0})
    _write(runs / "eval" / "eval.json", {"settings": {"world": "sentiment", "n_prompts": 8, "temperature": 1.0,
                                                      "max_new_tokens": 24, "seed": 0}, "methods": methods})
    _jsonl(runs / "eval" / "samples.jsonl", samples)
    _write(runs / "reward" / "summary.json", {
        "eval/pairwise_accuracy": 0.71, "eval/spearman_gold": 0.6, "groups": 5000,
        "budget_curve": [{"budget": b, "pairwise_accuracy": 0.6 + 0.02 * i, "spearman_gold": 0.4 + 0.05 * i}
                         for i, b in enumerate((500, 1000, 2000, 5000))]})
    _jsonl(runs / "ppo" / "metrics.jsonl", [{"step": s, "reward/model": s / 40, "reward/gold": 0.15 + s / 100,
                                             "objective/kl": s / 8, "objective/kl_coef": 0.05 + s / 1000}
                                            for s in range(1, 41)] + [{"step": 40, "eval/kl": 5.5, "eval/gold": 0.62}])
    (runs / "ppo" / "config.yaml").write_text("kl:\n  target: 6.0\n  adaptive: true\n")
    return ReportConfig(runs_dir=str(runs), eval_dir=str(runs / "eval"), reward_dir=str(runs / "reward"),
                        ppo_dir=str(runs / "ppo"))
