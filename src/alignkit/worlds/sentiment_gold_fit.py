"""Fitting and judging the gold head of the sentiment world.

The head is a logistic regression on frozen, mean-pooled MiniLM embeddings (see
`sentiment_gold`), fitted by full-batch L-BFGS on the training tweets, positive vs not, optionally
weighted by annotator agreement; it is judged on the held-out tweets by accuracy and AUC.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from alignkit.worlds import sentiment_gold as gold
from alignkit.worlds.sentiment_corpus import Tweet


def fit_logistic(
    features: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None, l2: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted L2-regularised logistic regression by full-batch L-BFGS.

    Minimises sum_i v_i * BCE(sigmoid(w . x_i + b), y_i) / sum_i v_i + l2 * |w|^2 on standardised
    features, then folds the standardisation into (w, b) so they apply to raw features.

    Shapes:
        features (N, H), labels (N,) in {0, 1}, weights (N,) >= 0; returns w (H,), b ().
    """
    x = features.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    z = (x - mean) / std  # (N, H)
    y = labels.double()
    v = torch.ones_like(y) if weights is None else weights.double()
    v = v / v.sum()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = z @ w + b  # (N,)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
        loss = (v * bce).sum() + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w_raw = (w.detach() / std).float()
    b_raw = (b.detach() - (w.detach() * mean / std).sum()).float()
    return w_raw, b_raw


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
    labels = labels.bool()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    avg_rank = torch.cumsum(counts, 0).double() - (counts.double() - 1) / 2  # 1-based ranks
    ranks = avg_rank[inverse]
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classifier_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy at 0.5, AUC, majority baseline and mean P(positive) per true class."""
    labels = labels.bool()
    positive_rate = float(labels.float().mean())
    return {
        "accuracy": float(((probs >= 0.5) == labels).float().mean()),
        "auc": auc(probs, labels),
        "majority_baseline": max(positive_rate, 1 - positive_rate),
        "positive_rate": positive_rate,
        "mean_prob_on_positive": float(probs[labels].mean()) if labels.any() else float("nan"),
        "mean_prob_on_other": float(probs[~labels].mean()) if (~labels).any() else float("nan"),
        "count": int(labels.numel()),
    }


def fit_gold(
    train: list[Tweet],
    heldout: list[Tweet],
    out_dir: str | Path,
    cache_file: str | Path,
    *,
    batch_size: int = 128,
    max_length: int = 128,
    l2: float = 1e-3,
    weighting: Literal["confidence", "none"] = "confidence",
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Embed the tweets (cached), fit the head, save it to `out_dir`, and return its figures.

    Returns:
        Held-out and training metrics (`classifier_metrics`), held-out AUC on tweets with
        annotator agreement >= 0.9, `base_rate` (mean gold score of the held-out tweets) and timings.
    """
    texts = [t.text for t in train + heldout]
    start = time.perf_counter()
    features, cached = gold.cached_embeddings(texts, cache_file, batch_size, max_length, progress)  # (N, H)
    embed_seconds = round(time.perf_counter() - start, 2)
    log(f"gold: embedded {len(texts)} tweets in {embed_seconds:.1f} s ({cached} from the cache)")
    labels = torch.tensor([t.label == "positive" for t in train + heldout])  # (N,)
    weights = torch.tensor([t.confidence if weighting == "confidence" else 1.0 for t in train])
    n = len(train)
    start = time.perf_counter()
    weight, bias = fit_logistic(features[:n], labels[:n], weights, l2)
    fit_seconds = round(time.perf_counter() - start, 2)
    probs = torch.sigmoid(features @ weight + bias)  # (N,)
    confident = torch.tensor([t.confidence >= 0.9 for t in heldout], dtype=torch.bool)
    info = {
        "heldout": classifier_metrics(probs[n:], labels[n:]),
        "train": classifier_metrics(probs[:n], labels[:n]),
        "heldout_auc_confidence_ge_0.9": auc(probs[n:][confident], labels[n:][confident]),
        "base_rate": float(probs[n:].mean()),
        "embed_seconds": embed_seconds,
        "embeddings_cached": cached,
        "fit_seconds": fit_seconds,
    }
    gold.save_head(out_dir, weight, bias, {
        "encoder": gold.ENCODER_PACKAGE, "pooling": "mean", "normalize": True, "max_length": max_length,
        "target": "P(sentiment == positive)", "l2": l2, "weighting": weighting, "train_tweets": n, **info,
    })
    return info
