"""`alignkit report`: one self-contained HTML page (and `summary.json`) from a pipeline's run directories.

Reads `eval.json` / `samples.jsonl` of the eval step, each method's training `metrics.jsonl` (the
held-out evaluations along training give the frontier's trajectories), the reward model's
`summary.json` (accuracy, label-budget curve), PPO's metrics and every step's `.done.json` (wall
time). Writes `<runs_dir>/report.html` (figures inline as base64 PNG, no external resources) and
`<runs_dir>/summary.json`:

    {"methods": {m: {"gold_reward", "kl", "win_rate_vs_sft", "proxy_reward", ...}},
     "reward_model": {"pairwise_accuracy", "spearman_gold", "labels"}, "timings_s": {step: seconds}}
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alignkit import report_plots as plots
from alignkit.config import RunConfig
from alignkit.errors import AlignkitError
from alignkit.report_html import render
from alignkit.trainers.rundir import prepare_run_dir, resolve_output_dir, write_json_atomic

ORDER = ["sft", "ppo", "rloo", "grpo", "dpo", "best_of_n", "rejection_sampling"]


@dataclass
class ReportConfig:
    """Build `report.html` and `summary.json` from a pipeline's run directories."""

    run: RunConfig = field(default_factory=lambda: RunConfig(report_to=[]))
    runs_dir: str = ""
    """The pipeline's directory (`runs/<name>`): the report and summary go here; step timings are read here."""
    eval_dir: str = ""
    """Run directory of `alignkit eval` (eval.json, samples.jsonl)."""
    reward_dir: str = ""
    """Run directory of the reward model (summary.json); empty: no reward-model section."""
    ppo_dir: str = ""
    """Run directory of PPO (metrics.jsonl, config.yaml); empty: no training-curve section."""
    reference: str = "sft"
    """Label of the reference method in the eval (win rates are against its samples)."""
    n_sample_prompts: int = 6
    """Prompts shown with every method's continuation side by side."""
    title: str = "alignkit: aligning a tiny tweet model to be positive"
    """Page title."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise AlignkitError(f"{path} does not exist (run the stage that writes it first)") from None
    except json.JSONDecodeError as err:
        raise AlignkitError(f"{path} is not valid JSON: {err}") from None


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def timings(runs_dir: Path) -> dict[str, float]:
    """Wall seconds of every finished step, from `<runs_dir>/<step>/.done.json`."""
    out = {}
    for marker in sorted(runs_dir.glob("*/.done.json")):
        out[marker.parent.name] = float(json.loads(marker.read_text()).get("seconds", float("nan")))
    return out


def _run_dir(path: str) -> Path:
    p = Path(path)
    return p.parent if p.name == "final" else p


def training_curve(run_dir: Path) -> list[dict[str, float]]:
    """Held-out evaluations along training: [{step, kl, gold, proxy}] from metrics.jsonl (or RS rounds)."""
    rows = [{"step": r.get("step", 0), "kl": r["eval/kl"], "gold": r["eval/gold"], "proxy": r.get("eval/reward")}
            for r in _jsonl(run_dir / "metrics.jsonl") if "eval/gold" in r and "eval/kl" in r]
    summary = run_dir / "summary.json"
    if not rows and summary.is_file():  # rejection sampling: an evaluation before and after each round
        s = json.loads(summary.read_text())
        evals = [s.get("initial", {})] + [{k[len("after/"):]: v for k, v in r.items() if k.startswith("after/")}
                                          for r in s.get("rounds", [])]
        rows = [{"step": i, "kl": e["eval/kl"], "gold": e["eval/gold"], "proxy": e.get("eval/reward")}
                for i, e in enumerate(evals) if "eval/gold" in e]
    return sorted(rows, key=lambda r: r["step"])


def _ordered(labels: list[str]) -> list[str]:
    def key(label: str) -> tuple[int, str]:
        fam = plots.family(label)
        return (ORDER.index(fam) if fam in ORDER else len(ORDER), "" if label == fam else label)

    return sorted(labels, key=key)


def collect(cfg: ReportConfig) -> dict[str, Any]:
    """Everything the page shows, read from the run directories."""
    runs_dir = Path(cfg.runs_dir)
    ev = _read_json(Path(cfg.eval_dir) / "eval.json")
    methods, steps = ev["methods"], timings(runs_dir)
    if cfg.reference not in methods:
        raise AlignkitError(f"option `reference`: no method {cfg.reference!r} in {cfg.eval_dir}/eval.json")
    by_dir = {str((runs_dir / s).resolve()): s for s in steps}
    for m in methods.values():
        step = by_dir.get(str(_run_dir(m.get("path", "")).resolve()))
        m["wall_time_s"] = steps.get(step) if step else None
        m["step"] = step
    headline = [k for k in _ordered(list(methods)) if methods[k].get("kind") != "best_of_n" or k == plots.family(k)]
    curves = {k: training_curve(_run_dir(methods[k]["path"])) for k in headline if methods[k].get("kind") == "policy"
              and k != cfg.reference}
    bon_family = [k for k in methods if methods[k].get("kind") == "best_of_n" and k != plots.family(k)]
    bon = sorted(({"kl": methods[k]["kl"], "gold": methods[k]["gold_reward"], "proxy": methods[k].get("proxy_reward"),
                   "n": methods[k]["n"]} for k in bon_family), key=lambda r: r["n"])
    rm = _read_json(Path(cfg.reward_dir) / "summary.json") if cfg.reward_dir else {}
    ppo_rows = _jsonl(Path(cfg.ppo_dir) / "metrics.jsonl") if cfg.ppo_dir else []
    samples: dict[str, list[dict]] = {}
    for row in _jsonl(Path(cfg.eval_dir) / "samples.jsonl"):
        samples.setdefault(row["method"], []).append(row)
    return {"settings": ev.get("settings", {}), "methods": methods, "headline": headline, "curves": curves,
            "bon": bon, "rm": rm, "ppo_rows": ppo_rows, "ppo_target": _ppo_target(cfg), "samples": samples,
            "timings": steps, "reference": cfg.reference}


def _ppo_target(cfg: ReportConfig) -> float | None:
    path = Path(cfg.ppo_dir) / "config.yaml" if cfg.ppo_dir else None
    if not path or not path.is_file():
        return None
    kl = (yaml.safe_load(path.read_text()) or {}).get("kl") or {}
    return kl.get("target") if kl.get("adaptive", True) else None


def summary_json(data: dict[str, Any]) -> dict[str, Any]:
    """The machine-readable summary (`summary.json`)."""
    keep = ("gold_reward", "gold_ci95", "kl", "proxy_reward", "length", "distinct_1", "distinct_2", "wall_time_s")
    methods = {}
    for label in _ordered(list(data["methods"])):
        m = data["methods"][label]
        methods[label] = {k: m.get(k) for k in keep} | {"win_rate_vs_sft": m.get("win_rate_vs_ref")}
    rm = data["rm"]
    reward_model = {"pairwise_accuracy": rm.get("eval/pairwise_accuracy"), "spearman_gold": rm.get("eval/spearman_gold"),
                    "labels": rm.get("groups"), "budget_curve": rm.get("budget_curve", [])}
    times = data["timings"]
    fit = plots.fit_sqrt_kl([math.sqrt(r["kl"]) for r in data["bon"]],
                            [r["gold"] - data["bon"][0]["gold"] for r in data["bon"]]) if data["bon"] else None
    return {"methods": methods, "reward_model": reward_model,
            "timings_s": times | {"total": round(sum(times.values()), 2)},
            "best_of_n_gold_fit": {"alpha": fit[0], "beta": fit[1]} if fit else None,
            "settings": data["settings"], "created": time.strftime("%Y-%m-%d %H:%M:%S")}


def figures(data: dict[str, Any]) -> dict[str, str]:
    """Base64 PNGs of every figure the data allows."""
    points = {k: data["methods"][k] for k in data["headline"]}
    figs = {"frontier": plots.frontier(points, data["curves"], data["bon"])}
    rl = {k: v for k, v in data["curves"].items() if plots.family(k) in ("ppo", "rloo", "grpo")}
    if data["bon"] or rl:
        figs["overoptimisation"] = plots.overoptimisation(data["bon"], rl)
    if data["ppo_rows"]:
        figs["ppo"] = plots.ppo_curves(data["ppo_rows"], data["ppo_target"])
    if data["rm"].get("budget_curve"):
        figs["rm_budget"] = plots.rm_budget(data["rm"]["budget_curve"])
    return figs


def run(cfg: ReportConfig) -> dict[str, Any]:
    """Write `report.html` and `summary.json` into `runs_dir`; return the summary."""
    if not cfg.runs_dir or not cfg.eval_dir:
        raise AlignkitError("options `runs_dir` and `eval_dir` are required (the pipeline directory and the eval run)")
    out_dir = resolve_output_dir("report", cfg.run.output_dir)
    prepare_run_dir(out_dir, cfg, resume=False)
    data = collect(cfg)
    summary = summary_json(data)
    html = render(cfg, data, summary, figures(data))
    runs_dir = Path(cfg.runs_dir)
    (runs_dir / ".report.html.tmp").write_text(html)
    (runs_dir / ".report.html.tmp").replace(runs_dir / "report.html")
    write_json_atomic(runs_dir / "summary.json", summary)
    result = {"stage": "report", "report": str(runs_dir / "report.html"), "summary": str(runs_dir / "summary.json")}
    write_json_atomic(out_dir / "summary.json", result)
    return result
