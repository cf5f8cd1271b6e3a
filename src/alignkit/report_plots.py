"""The report's figures: matplotlib (Agg) figures returned as base64 PNG strings, for inline `<img>` tags.

Each function takes plain lists/dicts (as read from the run directories) and draws one figure:
the gold-reward vs KL frontier, proxy vs gold reward as KL grows (with the best-of-N fit
R(d) = d (alpha - beta d), d = sqrt(KL); Gao et al. 2023), the PPO training curves and the reward
model's accuracy against its label budget.
"""

from __future__ import annotations

import base64
import io
import math
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"sft": "#444444", "ppo": "#d62728", "rloo": "#ff7f0e", "grpo": "#9467bd", "dpo": "#1f77b4",
          "best_of_n": "#2ca02c", "rejection_sampling": "#8c564b"}
OTHER = ["#17becf", "#bcbd22", "#e377c2", "#7f7f7f"]


def family(label: str) -> str:
    """The method a label belongs to: `dpo-beta0.1` -> `dpo`, `best_of_n-n4` -> `best_of_n`."""
    return label.split("-", 1)[0]


def color(label: str) -> str:
    """A stable colour per method family."""
    fam = family(label)
    return COLORS.get(fam, OTHER[sum(map(ord, fam)) % len(OTHER)])


def to_png(fig: Any) -> str:
    """Render a figure as base64 PNG text and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def fit_sqrt_kl(ds: list[float], gains: list[float]) -> tuple[float, float] | None:
    """Least-squares alpha, beta of R(d) = d (alpha - beta d) through the origin (Gao et al. 2023, Eq. 1)."""
    rows = [(d, g) for d, g in zip(ds, gains, strict=True) if math.isfinite(g)]
    if len(rows) < 2:
        return None
    s11 = sum(d**2 for d, _ in rows)
    s12 = sum(-(d**3) for d, _ in rows)
    s22 = sum(d**4 for d, _ in rows)
    b1 = sum(d * g for d, g in rows)
    b2 = sum(-(d**2) * g for d, g in rows)
    det = s11 * s22 - s12 * s12
    if abs(det) < 1e-12:
        return None
    return (b1 * s22 - s12 * b2) / det, (s11 * b2 - s12 * b1) / det


def frontier(points: dict[str, dict], curves: dict[str, list[dict]], bon: list[dict]) -> str:
    """Gold reward vs KL to the reference: final evaluations (large), training trajectories, best-of-N sweep.

    Args:
        points: label -> {kl, gold_reward, gold_ci95} of the final evaluation.
        curves: label -> [{kl, gold}] along training (checkpoints / rounds).
        bon: [{kl, gold}] of the best-of-N sweep (analytic KL).
    """
    fig, ax = plt.subplots(figsize=(8.2, 5.2))
    for label, rows in curves.items():
        if rows:
            ax.plot([r["kl"] for r in rows], [r["gold"] for r in rows], "-o", ms=3, lw=1.2, alpha=0.55,
                    color=color(label))
    if bon:
        ax.plot([r["kl"] for r in bon], [r["gold"] for r in bon], "--s", ms=4, lw=1.2, color=color("best_of_n"),
                alpha=0.7, label="best-of-N sweep (analytic KL)")
    for label, p in points.items():
        ax.errorbar(p["kl"], p["gold_reward"], yerr=p.get("gold_ci95") or 0.0, fmt="o", ms=9, capsize=3,
                    color=color(label), mec="black", mew=0.8, label=label)
        ax.annotate(label, (p["kl"], p["gold_reward"]), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xlabel("KL(policy || SFT reference), nats per response")
    ax.set_ylabel("gold reward (P(positive) by the gold scorer)")
    ax.set_title("Reward-KL frontier: higher and further left is better")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best", ncol=2)
    return to_png(fig)


def _gain_panel(ax: Any, key: str, bon: list[dict], curves: dict[str, list[dict]], title: str) -> None:
    if bon:
        base = bon[0][key]
        ds = [math.sqrt(max(r["kl"], 0.0)) for r in bon]
        gains = [r[key] - base for r in bon]
        ax.plot(ds, gains, "s", color=color("best_of_n"), label="best-of-N")
        fit = fit_sqrt_kl(ds, gains)
        if fit:
            xs = [max(ds) * i / 50 for i in range(51)]
            ax.plot(xs, [x * (fit[0] - fit[1] * x) for x in xs], "-", color=color("best_of_n"), alpha=0.7,
                    label=f"fit d(α−βd): α={fit[0]:.3g}, β={fit[1]:.3g}")
    for label, rows in curves.items():
        rows = [r for r in rows if r.get(key) is not None]
        if rows:
            base = rows[0][key]
            ax.plot([math.sqrt(max(r["kl"], 0.0)) for r in rows], [r[key] - base for r in rows], "-o", ms=3,
                    color=color(label), label=label)
    ax.axhline(0.0, color="black", lw=0.6)
    ax.set_xlabel("d = sqrt(KL)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def overoptimisation(bon: list[dict], curves: dict[str, list[dict]]) -> str:
    """Proxy (RM) and gold reward gains vs d = sqrt(KL), best-of-N with its fit and RL trajectories."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.5, 4.2))
    _gain_panel(left, "proxy", bon, curves, "proxy (reward model) gain")
    _gain_panel(right, "gold", bon, curves, "gold reward gain")
    left.set_ylabel("reward - reward at KL 0")
    fig.suptitle("Reward-model over-optimisation: the proxy keeps rising, the gold reward bends")
    return to_png(fig)


def ppo_curves(rows: list[dict], kl_target: float | None) -> str:
    """PPO training: rewards, KL against its target and the KL coefficient beta, per RL step."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for key, ax, label in (("reward/model", axes[0], "reward model (normalised)"), ("reward/gold", axes[0], "gold")):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
        if pts:
            ax.plot(*zip(*pts, strict=True), label=label)
    axes[0].set_title("reward of the rollouts")
    kl = [(r["step"], r["objective/kl"]) for r in rows if isinstance(r.get("objective/kl"), int | float)]
    if kl:
        axes[1].plot(*zip(*kl, strict=True), color="#d62728", label="KL of the rollouts")
    if kl_target:
        axes[1].axhline(kl_target, ls="--", color="black", lw=0.8, label=f"target {kl_target:g}")
    axes[1].set_title("KL to the reference")
    beta = [(r["step"], r["objective/kl_coef"]) for r in rows if isinstance(r.get("objective/kl_coef"), int | float)]
    if beta:
        axes[2].plot(*zip(*beta, strict=True), color="#9467bd")
    axes[2].set_title("KL coefficient β (adaptive)")
    for ax in axes:
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    for ax in axes[:2]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return to_png(fig)


def rm_budget(curve: list[dict]) -> str:
    """Reward model held-out pairwise accuracy (and Spearman with gold) against the number of labels."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    xs = [r["budget"] for r in curve]
    ax.plot(xs, [r.get("pairwise_accuracy", float("nan")) for r in curve], "-o", label="pairwise accuracy")
    if any("spearman_gold" in r for r in curve):
        ax.plot(xs, [r.get("spearman_gold", float("nan")) for r in curve], "-s", label="Spearman with gold")
    ax.set_xscale("log")
    ax.set_xlabel("labelled comparisons")
    ax.set_title("Reward model vs label budget (held out)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return to_png(fig)
