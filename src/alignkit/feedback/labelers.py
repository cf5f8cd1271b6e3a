"""Labelers: who answers a query (a prompt with K sampled responses), as pairs, choices, rankings or ratings.

A query is `{"id", "prompt", "responses"}`. A labeler turns a batch of queries into records of the
standard formats (`alignkit.data.formats`), with the query `id` kept; a query it cannot or will
not answer gives None.

    format    record                                   from utilities s_1 .. s_K with temperature tau
    pairs     {prompt, chosen, rejected}   (K = 2)      P(a > b) = sigmoid((s_a - s_b) / tau)   (Bradley-Terry)
    choice    {prompt, responses, best}                 P(best = i) = softmax(s / tau)_i        (Ziegler et al. 2019)
    ranking   {prompt, responses} best first            Plackett-Luce with worths exp(s / tau)  (Eq. 10.58-10.61)
    rating    {prompt, response, score} per response    score = s + tau * N(0, 1)
    steps     {prompt, steps, labels} per response      labels[k] = s(x, y_<=k) - s(x, y_<k) + tau * N(0, 1)

For `steps` (segment rewards, Sec. 10.4.1.3) each response is split into segments y_1 .. y_n (a
`split` function: sentences or token chunks) and every prefix y_<=k is scored in context; segment k
is labelled with the change it makes, s(x, y_<=k) - s(x, y_<k) (the first segment with s(x, y_1)), so
a response's segment labels sum to its own score s(x, y) (credit assignment by differences of prefix
scores, the gold counterpart of a process reward model's step labels).

Choices and rankings are drawn by perturbing s / tau with Gumbel noise and sorting (the Gumbel-max
trick samples exactly the softmax / Plackett-Luce distributions); with K = 2 both reduce to the
Bradley-Terry pair. tau = 0 is deterministic: the highest utility wins (ties: the lower index).

Labelers: `gold` (a world's gold scorer), `reward-model` (any scorer by path, see `load_scorer`),
and `file` (answers exported from an annotation tool, joined by query id).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from alignkit.data.load import load_records, record_rows
from alignkit.errors import AlignkitError

FORMATS = ("pairs", "choice", "ranking", "rating", "steps")


class Labeler(Protocol):
    """Answers queries: `labeler(queries, fmt)` -> one record (or None: unanswered) per query."""

    def __call__(self, queries: list[dict[str, Any]], fmt: str) -> list[dict[str, Any] | None]: ...


def bradley_terry_prob(s_a: torch.Tensor, s_b: torch.Tensor, tau: float) -> torch.Tensor:
    """P(a > b) = sigmoid((s_a - s_b) / tau); tau = 0 gives 1, 1/2 or 0 (a step). Shapes: B each; returns B."""
    if tau < 0:
        raise AlignkitError(f"option `tau`: expected >= 0, got {tau}")
    if tau == 0:
        return (s_a > s_b).double() + 0.5 * (s_a == s_b).double()
    return torch.sigmoid((s_a.double() - s_b.double()) / tau)


def noisy_order(s: torch.Tensor, tau: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of the K items best first, sampled from Plackett-Luce with worths exp(s / tau).

    Gumbel-max: sorting s / tau + Gumbel(0, 1) noise samples the Plackett-Luce ranking, and its
    first element the softmax choice. tau = 0 sorts s (stable: ties keep the lower index first).

    Shapes:
        s: K utilities; returns K long.
    """
    if tau == 0:
        return torch.sort(-s.double(), stable=True).indices
    u = torch.rand(s.shape, generator=generator, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    gumbel = -torch.log(-torch.log(u))
    return torch.sort(-(s.double() / tau + gumbel), stable=True).indices


def record_from_utilities(query: dict[str, Any], s: torch.Tensor, fmt: str, tau: float,
                          generator: torch.Generator) -> dict[str, Any] | list[dict[str, Any]]:
    """One record (a list of K for ratings) answering `query` by its utilities `s` (K) and noise `tau`."""
    prompt, responses, qid = query["prompt"], query["responses"], query["id"]
    utilities = [float(v) for v in s]
    if fmt == "pairs":
        if len(responses) != 2:
            raise AlignkitError(f"format `pairs` needs k=2 responses per prompt, got {len(responses)}")
        p = bradley_terry_prob(s[:1], s[1:], tau).item()
        a_wins = p == 1.0 or (p > 0.0 and torch.rand((), generator=generator, dtype=torch.float64).item() < p)
        chosen, rejected = (0, 1) if a_wins else (1, 0)
        return {"id": qid, "prompt": prompt, "chosen": responses[chosen], "rejected": responses[rejected],
                "utilities": [utilities[chosen], utilities[rejected]]}
    order = noisy_order(s, tau, generator).tolist()
    if fmt == "choice":
        return {"id": qid, "prompt": prompt, "responses": responses, "best": order[0], "utilities": utilities}
    if fmt == "ranking":
        return {"id": qid, "prompt": prompt, "responses": [responses[i] for i in order],
                "utilities": [utilities[i] for i in order]}
    noise = torch.randn(len(responses), generator=generator, dtype=torch.float64) * tau
    return [{"id": f"{qid}/{i}", "prompt": prompt, "response": r, "score": utilities[i] + float(noise[i]),
             "utility": utilities[i]} for i, r in enumerate(responses)]


class ScorerLabeler:
    """Answers from a scorer's utilities with the Bradley-Terry / Plackett-Luce noise of temperature `tau`.

    Args:
        scorer: `scorer(prompts, responses)` -> rewards (e.g. `GoldScorer`, `RewardModelScorer`).
        tau: Noise temperature (0: noise-free).
        seed: Seed of the noise.
    """

    def __init__(self, scorer: Callable[[list[Any], list[Any]], torch.Tensor], tau: float = 0.0, seed: int = 0,
                 split: Callable[[str], list[str]] | None = None):
        if tau < 0 or not math.isfinite(tau):
            raise AlignkitError(f"option `tau`: expected a finite number >= 0, got {tau}")
        self.scorer, self.tau, self.split = scorer, tau, split
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, queries: list[dict[str, Any]], fmt: str) -> list[Any]:
        if fmt not in FORMATS:
            raise AlignkitError(f"option `format`: expected one of {', '.join(FORMATS)}, got {fmt!r}")
        if not queries:
            return []
        if fmt == "steps":
            return self._steps(queries)
        prompts = [q["prompt"] for q in queries for _ in q["responses"]]
        responses = [r for q in queries for r in q["responses"]]
        flat = self.scorer(prompts, responses).double()  # sum K
        out, start = [], 0
        for query in queries:
            k = len(query["responses"])
            out.append(record_from_utilities(query, flat[start : start + k], fmt, self.tau, self.generator))
            start += k
        return out


    def _steps(self, queries: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        """Per query, one `steps` record per response: segments and their prefix-score differences."""
        if self.split is None:
            raise AlignkitError("format `steps` needs a segmentation (option `segments`)")
        rows = [(q, i, self.split(str(r))) for q in queries for i, r in enumerate(q["responses"])]
        prompts = [q["prompt"] for q, _, segs in rows for _ in segs]
        prefixes = ["".join(segs[: k + 1]) for _, _, segs in rows for k in range(len(segs))]
        flat = self.scorer(prompts, prefixes).double()
        out: dict[str, list[dict[str, Any]]] = {}
        start = 0
        for query, i, segs in rows:
            scores = flat[start : start + len(segs)]
            start += len(segs)
            labels = torch.diff(scores, prepend=scores.new_zeros(1))
            labels = labels + torch.randn(len(segs), generator=self.generator, dtype=torch.float64) * self.tau
            out.setdefault(query["id"], []).append(
                {"id": f"{query['id']}/{i}", "prompt": query["prompt"], "steps": segs,
                 "labels": [float(v) for v in labels], "utility": float(scores[-1])})
        return [out[q["id"]] for q in queries]


class FileLabeler:
    """Answers exported from an annotation tool, joined to the queries by `id`.

    Each line of the answers file (JSONL, JSON, CSV or Parquet) is `{id, ...}` with one of
    `best` (index of the best response), `ranking` (indices, best first), `chosen` (index of the
    preferred response of a pair) or `scores` (one rating per response). Queries without an answer
    give None.
    """

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.answers: dict[str, tuple[int, dict[str, Any]]] = {}
        answers = load_records(self.path)
        for row, answer in zip(record_rows(answers), answers, strict=True):
            if "id" not in answer:
                raise AlignkitError(f"{self.path}, row {row}, field 'id': missing; answers are joined by query id")
            self.answers[str(answer["id"])] = (row, answer)

    def __call__(self, queries: list[dict[str, Any]], fmt: str) -> list[Any]:
        if fmt == "steps":
            raise AlignkitError("labeler `file` answers pairs, choices, rankings and ratings, not format `steps`; "
                                "give step labels directly as `{prompt, steps, labels}` records to `alignkit reward`")
        out = []
        for query in queries:
            found = self.answers.get(str(query["id"]))
            out.append(None if found is None else self._record(query, fmt, *found))
        return out

    def _record(self, query: dict[str, Any], fmt: str, row: int, answer: dict[str, Any]) -> Any:
        k = len(query["responses"])
        key = next((name for name in ("ranking", "best", "chosen", "scores") if name in answer), None)
        where = f"{self.path}, row {row}"
        if key is None:
            raise AlignkitError(f"{where}: expected one of the fields 'best', 'ranking', 'chosen' or 'scores'")
        value = answer[key]
        if key == "scores":
            if not isinstance(value, list) or len(value) != k:
                raise AlignkitError(f"{where}, field 'scores': expected {k} numbers, one per response")
            s = torch.tensor([float(v) for v in value])
        elif key == "ranking":
            if not isinstance(value, list) or sorted(value) != list(range(k)):
                raise AlignkitError(f"{where}, field 'ranking': expected a permutation of 0..{k - 1}, got {value!r}")
            s = torch.zeros(k, dtype=torch.float64)
            s[torch.tensor(value)] = -torch.arange(k, dtype=torch.float64)  # best first -> highest utility
        else:
            if not isinstance(value, int) or not 0 <= value < k:
                raise AlignkitError(f"{where}, field '{key}': expected an index in 0..{k - 1}, got {value!r}")
            s = torch.zeros(k, dtype=torch.float64)
            s[value] = 1.0
        if fmt in ("ranking", "rating") and key in ("best", "chosen"):
            raise AlignkitError(f"{where}, field '{key}': a single choice cannot give a {fmt}; "
                                "answer with 'ranking' or 'scores'")
        return record_from_utilities(query, s, fmt, 0.0, torch.Generator())


def make_labeler(name: str, *, scorer: Callable | None = None, tau: float = 0.0, seed: int = 0,
                 answers: str = "", split: Callable[[str], list[str]] | None = None) -> Labeler:
    """A labeler by name: `gold` / `reward-model` (a scorer with noise `tau`; `split` segments responses
    for the `steps` format) or `file` (`answers`)."""
    if name in ("gold", "reward-model"):
        if scorer is None:
            raise AlignkitError(f"labeler `{name}` needs a scorer (`world` for gold, `scorer` for reward-model)")
        return ScorerLabeler(scorer, tau=tau, seed=seed, split=split)
    if name == "file":
        if not answers:
            raise AlignkitError("labeler `file` needs option `answers`: the file of answers joined by query id")
        return FileLabeler(answers)
    raise AlignkitError(f"option `labeler`: expected gold, reward-model or file, got {name!r}")
