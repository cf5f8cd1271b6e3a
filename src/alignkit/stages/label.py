"""`alignkit label`: sample K responses per prompt from a policy and ask a labeler (Ziegler et al. 2019, Sec. 2.2).

For each prompt the policy samples K responses (KV-cache sampler, `sampling.*` options); the
prompt and its responses form a query `{id, prompt, responses}`, and the labeler answers it in the
chosen format (pairs, best-of-K choices, rankings, ratings, or per-segment `steps` labels; see
`alignkit.feedback.labelers`).
Queries whose responses are empty, or identical where they must differ, are skipped and counted.
A prompt may be a conversation (a message list): it is rendered with the policy's chat template and
kept as given in the records, whose responses are then assistant turns.
Prompts are drawn (shuffled by `run.seed`) until `budget` records are labelled.

Run directory: `queries.jsonl` (every query, with its split), `train.jsonl` and `heldout.jsonl` (the
labelled records), `heldout_gold.jsonl` (when a world is given: every held-out response as a
`{prompt, response, score}` record with its gold score, for `alignkit reward`'s Spearman check),
`config.yaml` and `summary.json`. With the `file` labeler and no `answers`, the run stops after
writing `queries.jsonl`: export it to an annotation tool, then rerun with `--queries` and `--answers`.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from tqdm.auto import tqdm

from alignkit.accel import resolve
from alignkit.config import ModelConfig, RunConfig, SamplingConfig, require_world
from alignkit.data.formats import validate_records
from alignkit.data.load import load_records, record_rows
from alignkit.data.prompts import with_assistant_turns
from alignkit.data.segments import parse_segmentation, split_text
from alignkit.errors import AlignkitError
from alignkit.feedback.labelers import make_labeler
from alignkit.models.load import load_causal_lm, load_tokenizer
from alignkit.rewards.config import RewardFunctionsConfig
from alignkit.rollout.generate import sample, stop_token_ids, tokenize_prompts
from alignkit.rollout.reward_mix import PromptColumnsScorer, RewardMix, stage_reward
from alignkit.rollout.score import GoldScorer
from alignkit.trainers.rundir import prepare_run_dir, resolve_output_dir, write_json_atomic


@dataclass
class LabelConfig:
    """Sample K responses per prompt from a policy and label them (pairs, choices, rankings, ratings)."""

    LIMITS: ClassVar[dict[str, str]] = {"k": ">= 1", "budget": ">= 1", "heldout_budget": ">= 0", "tau": ">= 0",
                                        "batch_size": ">= 1"}

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    world: str = ""
    """Embedded world (e.g. `sentiment`): default prompts, gold labeler and, if `model.name_or_path` is empty, its base model."""
    prompts: str = ""
    """File of `{prompt}` records to sample from (default: the world's train prompts)."""
    heldout_prompts: str = ""
    """File of held-out `{prompt}` records (default: the world's held-out prompts)."""
    format: Literal["pairs", "choice", "ranking", "rating", "steps"] = "pairs"
    """Record format written: pairs (k=2), best-of-K choices, full rankings, ratings, or `steps` (each
    response split by `segments`, each segment labelled with the change in score it makes)."""
    segments: str = "sentences"
    """How the `steps` format splits a response: `sentences` or `chunks:N` (N tokens of the policy)."""
    k: int = 2
    """Responses sampled per prompt."""
    budget: int = 5000
    """Labelled training records to collect (a rating per response counts as one)."""
    heldout_budget: int = 500
    """Labelled held-out records to collect (0: none)."""
    labeler: Literal["gold", "reward-model", "file"] = "gold"
    """Who answers: the world's gold scorer, a reward model (`scorer`), or an answers file (`answers`)."""
    tau: float = 0.0
    """Noise temperature of gold / reward-model labels: P(a > b) = sigmoid((s_a - s_b) / tau); 0 = noise-free."""
    scorer: str = ""
    """Scorer of the `reward-model` labeler: a reward model or ensemble directory, or `gold:<world>`."""
    reward: RewardFunctionsConfig = field(default_factory=RewardFunctionsConfig)
    """Reward functions (rewards as code) as the `reward-model` labeler's utility, alone or weighted with
    `scorer`; they read the prompt records' other columns."""
    answers: str = ""
    """Answers file of the `file` labeler: rows `{id, best | ranking | chosen | scores}`."""
    queries: str = ""
    """Reuse the queries (`queries.jsonl`) of an earlier run instead of sampling."""
    batch_size: int = 64
    """Prompts per sampling batch (each gives k rows)."""


# ---------------------------------------------------------------------------------------------
# Prompts and sampling
# ---------------------------------------------------------------------------------------------


def _read_prompts(path: str) -> list[Any]:
    return [r["prompt"] for r in _read_prompt_records(path)]


def _read_prompt_records(path: str) -> list[dict[str, Any]]:
    return validate_records(load_records(path), "prompt", path).records


def prompt_columns(cfg: LabelConfig) -> tuple[list[Any], list[dict[str, Any]]]:
    """Every prompt of the prompt files and the other fields of its record (what reward functions read)."""
    records = [r for path in (cfg.prompts, cfg.heldout_prompts) if path for r in _read_prompt_records(path)]
    return [r["prompt"] for r in records], [{k: v for k, v in r.items() if k != "prompt"} for r in records]


def resolve_inputs(cfg: LabelConfig, world: Any) -> dict[str, list[Any]]:
    """Prompts per split; fills `model.name_or_path` from the world (or None) if empty."""
    if cfg.world:
        if not cfg.model.name_or_path:
            cfg.model.name_or_path = str(world.base_model_path)
    splits = {}
    for split, path in (("train", cfg.prompts), ("heldout", cfg.heldout_prompts)):
        if path:
            splits[split] = _read_prompts(path)
        elif cfg.world:
            splits[split] = world.prompts(split)
        elif split == "train" and not cfg.queries:
            raise AlignkitError("option `prompts` is required without `world`: a file of {prompt} records")
        else:
            splits[split] = []
    return splits


class Sampler:
    """K responses per prompt from the policy, as text, with the sampler's seeded generator."""

    def __init__(self, cfg: LabelConfig):
        if not cfg.model.name_or_path:
            raise AlignkitError("option `model.name_or_path` is required (the policy), or give a `world`")
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.model, padding_side="left")
        self.backend = resolve(cfg.run.accel)
        self.model = load_causal_lm(cfg.model, self.tokenizer).eval()
        self.generator = torch.Generator().manual_seed(cfg.run.seed)
        self.n_tokens = 0

    def __call__(self, prompts: list[Any]) -> list[list[str]]:
        c, tok = self.cfg, self.tokenizer
        ids, mask = tokenize_prompts(tok, prompts)  # a conversation prompt: chat template + generation prompt
        rollout = sample(self.model, ids.repeat_interleave(c.k, dim=0), mask.repeat_interleave(c.k, dim=0),
                         **c.sampling.kwargs(), eos_token_id=stop_token_ids(tok, self.model), pad_token_id=tok.pad_token_id,
                         generator=self.generator, backend=self.backend)
        self.n_tokens += int(rollout.lengths.sum())
        responses = rollout.texts(tok)
        return [responses[i * c.k : (i + 1) * c.k] for i in range(len(prompts))]


def query_problem(query: dict[str, Any], fmt: str) -> str | None:
    """Why a query cannot be labelled in `fmt` (`empty`, `duplicate`), or None."""
    responses = query["responses"]
    if any(not str(r).strip() for r in responses):
        return "empty"
    if fmt in ("pairs", "ranking") and len(set(map(str, responses))) < len(responses):
        return "duplicate"
    return None


# ---------------------------------------------------------------------------------------------
# Labelling
# ---------------------------------------------------------------------------------------------


def _make_labeler(cfg: LabelConfig, gold: Any, world: Any = None) -> Any:
    """The labeler of `cfg`; `gold` is the world's `GoldScorer` (or None without a world)."""
    scorer = None
    if cfg.labeler == "gold":
        if gold is None:
            raise AlignkitError("labeler `gold` needs option `world` (whose gold scorer labels)")
        scorer = gold
    elif cfg.labeler == "reward-model":
        if not (cfg.scorer or cfg.reward.functions):
            raise AlignkitError("labeler `reward-model` needs option `scorer` (a reward model directory) or "
                                "`reward.functions`")
        scorer, _ = stage_reward(cfg.scorer, cfg.reward, world=world, backend=resolve(cfg.run.accel))
        if isinstance(scorer, RewardMix):
            scorer = PromptColumnsScorer(scorer, *prompt_columns(cfg))
    split = None
    if cfg.format == "steps":

        tokenizer = load_tokenizer(cfg.model) if parse_segmentation(cfg.segments)[0] == "chunks" else None
        split = partial(split_text, spec=cfg.segments, tokenizer=tokenizer)
    return make_labeler(cfg.labeler, scorer=scorer, tau=cfg.tau, seed=cfg.run.seed, answers=cfg.answers,
                        split=split)


def collect(split: str, prompts: list[Any], budget: int, sampler: Sampler, labeler: Any,
            cfg: LabelConfig, stats: dict[str, int]) -> tuple[list[dict], list[dict]]:
    """Sample and label queries of `split` until `budget` records; return (queries, records).

    With `labeler` None (answers to come from a file) the queries themselves count toward the budget.
    """
    order = list(range(len(prompts)))
    random.Random(f"{cfg.run.seed}-{split}").shuffle(order)
    queries: list[dict] = []
    records: list[dict] = []
    per_query = cfg.k if cfg.format in ("rating", "steps") else 1
    bar = tqdm(total=budget, desc=f"label {split}", unit="record", disable=not cfg.run.progress)

    def have() -> int:
        return len(records) if labeler is not None else len(queries) * per_query

    for start in range(0, len(order), cfg.batch_size):
        if have() >= budget:
            break
        need = -(-(budget - have()) // per_query)
        chunk = [prompts[i] for i in order[start : start + min(cfg.batch_size, need + need // 8 + 1)]]
        batch = [{"id": f"{split}-{start + j}", "split": split, "prompt": p, "responses": rs}
                 for j, (p, rs) in enumerate(zip(chunk, sampler(chunk), strict=True))]
        queries += batch
        done = have()
        if labeler is not None:
            _label_into(records, batch, labeler, cfg.format, stats)
        bar.update(min(have(), budget) - min(done, budget))
    bar.close()
    if have() < budget:
        print(f"[label] warning: only {have()} {split} records for a budget of {budget} (prompts exhausted)")
    return queries, records[:budget]


def _label_into(records: list[dict], batch: list[dict], labeler: Any, fmt: str, stats: dict[str, int]) -> None:
    good = []
    for query in batch:
        problem = query_problem(query, fmt)
        if problem:
            stats[f"skipped_{problem}"] = stats.get(f"skipped_{problem}", 0) + 1
        else:
            good.append(query)
    for answer in labeler(good, fmt):
        if answer is None:
            stats["unanswered"] = stats.get("unanswered", 0) + 1
        else:  # after a conversation prompt, each sampled response is an assistant turn
            records.extend(with_assistant_turns(r) for r in (answer if isinstance(answer, list) else [answer]))


def heldout_gold_records(queries: list[dict], gold: Any) -> list[dict]:
    """Every held-out response as `{prompt, response, score}` with its gold score."""
    pairs = [(q["prompt"], r) for q in queries if q["split"] == "heldout" for r in q["responses"] if str(r).strip()]
    if not pairs:
        return []
    scores = gold([p for p, _ in pairs], [r for _, r in pairs]).tolist()
    return [with_assistant_turns({"prompt": p, "response": r, "score": s})
            for (p, r), s in zip(pairs, scores, strict=True)]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)


def _from_queries(cfg: LabelConfig, labeler: Any, stats: dict[str, int]) -> tuple[list[dict], dict[str, list]]:
    queries = load_records(cfg.queries)
    for row, q in zip(record_rows(queries), queries, strict=True):
        for name in ("id", "prompt", "responses"):
            if name not in q:
                raise AlignkitError(f"{cfg.queries}, row {row}, field '{name}': missing in a query")
    out: dict[str, list] = {"train": [], "heldout": []}
    for split, budget in (("train", cfg.budget), ("heldout", cfg.heldout_budget)):
        records: list[dict] = []
        _label_into(records, [q for q in queries if q.get("split", "train") == split], labeler, cfg.format, stats)
        out[split] = records[:budget]
    return queries, out


def run(cfg: LabelConfig, world: Any = None) -> dict[str, Any]:
    """Sample (or reuse) queries, label them, write the datasets; return the summary.

    `world`: the loaded world of option `world` (prompts, base model, gold labeler).
    """
    world = require_world(cfg, world)
    if cfg.k < 2 and cfg.format not in ("rating", "steps") or cfg.format == "pairs" and cfg.k != 2:
        raise AlignkitError(f"option `k`: format {cfg.format!r} needs {'k=2' if cfg.format == 'pairs' else 'k>=2'}, "
                            f"got k={cfg.k}")
    if cfg.format == "steps" and cfg.labeler == "file":
        raise AlignkitError("option `format`: the `file` labeler answers pairs, choices, rankings and ratings, not "
                            "`steps`; give step labels directly as `{prompt, steps, labels}` records to `alignkit reward`")
    t0 = time.perf_counter()
    splits = resolve_inputs(cfg, world)
    out_dir = resolve_output_dir("label", cfg.run.output_dir)
    prepare_run_dir(out_dir, cfg, resume=False)
    torch.manual_seed(cfg.run.seed)
    stats: dict[str, int] = {}
    waiting = cfg.labeler == "file" and not cfg.answers
    gold = None
    if world is not None:
        gold = GoldScorer(world.gold_scorer(), memo=True)  # labels and held-out scores share the texts
    labeler = None if waiting else _make_labeler(cfg, gold, world)
    records: dict[str, list] = {"train": [], "heldout": []}
    if cfg.queries:
        queries, records = _from_queries(cfg, labeler, stats)
        sampler = None
    else:
        sampler = Sampler(cfg)
        print(f"[label] run dir: {out_dir}\n  {cfg.k} samples per prompt, format {cfg.format}, labeler {cfg.labeler}"
              f" (tau={cfg.tau}); budget {cfg.budget} train + {cfg.heldout_budget} held-out records from "
              f"{len(splits['train'])} / {len(splits['heldout'])} prompts; policy {cfg.model.name_or_path}")
        queries = []
        for split, budget in (("train", cfg.budget), ("heldout", cfg.heldout_budget)):
            if budget > 0 and splits[split]:
                qs, records[split] = collect(split, splits[split], budget, sampler, labeler, cfg, stats)
                queries += qs
    _write_jsonl(out_dir / "queries.jsonl", queries)
    summary: dict[str, Any] = {"stage": "label", "output_dir": str(out_dir), "queries": len(queries), **stats}
    if waiting:
        print(f"[label] wrote {out_dir / 'queries.jsonl'}; label it, then rerun with --queries and --answers")
    else:
        for split in ("train", "heldout"):
            _write_jsonl(out_dir / f"{split}.jsonl", records[split])
            summary[f"{split}_records"] = len(records[split])
        summary.update(_agreement(records["train"], cfg.format))
    if world is not None and any(q.get("split") == "heldout" for q in queries):
        gold_rows = heldout_gold_records(queries, gold)
        _write_jsonl(out_dir / "heldout_gold.jsonl", gold_rows)
        summary["heldout_gold_records"] = len(gold_rows)
    summary["sampled_tokens"] = sampler.n_tokens if sampler else 0
    summary["wall_time_s"] = time.perf_counter() - t0
    write_json_atomic(out_dir / "summary.json", summary)
    return summary


def _agreement(records: list[dict], fmt: str) -> dict[str, float]:
    """How often the label agrees with the labeler's noise-free utilities (1.0 at tau = 0)."""
    if fmt == "pairs":
        hits = [r["utilities"][0] >= r["utilities"][1] for r in records if "utilities" in r]
    elif fmt == "choice":
        hits = [r["utilities"][r["best"]] >= max(r["utilities"]) for r in records if "utilities" in r]
    else:
        return {}
    return {"label_agreement_with_utilities": sum(hits) / len(hits)} if hits else {}
