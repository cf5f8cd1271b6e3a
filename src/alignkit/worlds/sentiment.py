"""The embedded default world "sentiment": continue a tweet so that it is positive.

An offline version of the mock sentiment task of Ziegler et al. 2019 (Sec. 3.1): prompts are the
first few tokens of real tweets, the base model is a small Llama pretrained on ~36k tweets, and the
gold scorer (the stand-in for human labelers) is P(labelers call the text positive).

`build(SentimentBuildConfig())` builds everything into `$ALIGNKIT_CACHE/worlds/sentiment` in about
ten minutes on two CPU cores. Every step is skipped when its output exists, and every output is
written atomically, so an interrupted build continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from alignkit.errors import AlignkitError
from alignkit.trainers.pretrain import PretrainConfig
from alignkit.worlds import sentiment_corpus as corpus
from alignkit.worlds import sentiment_gold as gold
from alignkit.worlds import sentiment_lm as lm
from alignkit.worlds.base import (
    SUMMARY_FILE,
    World,
    read_json,
    remove_path,
    world_root,
    write_json,
    write_jsonl,
)
from alignkit.worlds.sentiment_config import SentimentBuildConfig
from alignkit.worlds.sentiment_gold_fit import fit_gold
from alignkit.worlds.sentiment_sft import write_sft_data

NAME = "sentiment"
STEPS_FILE = "steps.json"
KEEP_ON_FORCE = ("cache",)  # validated by content hash, so safe to reuse after --force


class _Build:
    """State shared by the build steps; expensive inputs are loaded once, on first use."""

    def __init__(self, cfg: SentimentBuildConfig):
        self.cfg = cfg
        self.root = world_root(NAME, cfg.cache_dir)
        self.steps: dict[str, Any] = read_json(self.root / STEPS_FILE) if (self.root / STEPS_FILE).is_file() else {}

    @functools.cached_property
    def split(self) -> tuple[list[corpus.Tweet], list[corpus.Tweet]]:
        return corpus.split_corpus(corpus.read_corpus(), self.cfg.heldout_percent)

    @functools.cached_property
    def tokenizer(self) -> Any:
        return AutoTokenizer.from_pretrained(self.root / "tokenizer")

    def run(self, name: str, done: Path, fn: Callable[[], dict[str, Any]]) -> None:
        """Run step `name` unless `done` exists; record its time and info in `steps.json`."""
        if done.exists() and name in self.steps:
            log(f"{name}: cached ({done})")
            return
        start, cpu_start = time.perf_counter(), time.process_time()
        info = fn()
        seconds = round(time.perf_counter() - start, 2)
        # CPU seconds (all threads) show how much of the wall time a busy machine took away.
        cpu_seconds = round(time.process_time() - cpu_start, 2)
        self.steps[name] = {"seconds": seconds, "cpu_seconds": cpu_seconds, **info}
        write_json(self.root / STEPS_FILE, self.steps)
        details = ", ".join(f"{k}={_fmt(v)}" for k, v in info.items() if not isinstance(v, dict))
        log(f"{name}: done in {seconds:.1f} s, {cpu_seconds:.0f} CPU s ({details})")


def log(message: str) -> None:
    """One line of build progress."""
    print(f"[world {NAME}] {message}", flush=True)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _corpus_step(b: _Build) -> dict[str, Any]:
    train, heldout = b.split
    write_jsonl(b.root / "corpus" / "train.jsonl", ({"text": t.text} for t in train))
    write_jsonl(b.root / "corpus" / "heldout.jsonl", ({"text": t.text} for t in heldout))
    positive = sum(t.label == "positive" for t in train + heldout) / len(train + heldout)
    return {"tweets": len(train) + len(heldout), "train": len(train), "heldout": len(heldout),
            "positive_rate": round(positive, 4)}


def _tokenizer_step(b: _Build) -> dict[str, Any]:
    train_texts = [t.text for t in b.split[0]]
    tokenizer = lm.train_tokenizer(train_texts, b.cfg.vocab_size, b.cfg.max_positions)
    lm.save_tokenizer(tokenizer, b.root / "tokenizer")
    b.__dict__.pop("tokenizer", None)  # reload the saved one
    n_tokens = sum(len(e) for e in tokenizer.backend_tokenizer.encode_batch(train_texts, add_special_tokens=False))
    return {"vocab_size": len(tokenizer), "train_tokens": n_tokens,
            "bos_id": tokenizer.bos_token_id, "eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.pad_token_id}


def _prompts_step(b: _Build) -> dict[str, Any]:
    c = b.cfg
    train, heldout = b.split
    make = functools.partial(lm.make_prompts, tokenizer=b.tokenizer, min_tokens=c.prompt_min_tokens,
                             max_tokens=c.prompt_max_tokens, seed=c.seed)
    heldout_prompts = make([t.text for t in heldout])
    if len(heldout_prompts) < c.n_heldout_prompts:
        log(f"prompts: only {len(heldout_prompts)} held-out prompts (asked for {c.n_heldout_prompts})")
    heldout_prompts = random.Random(c.seed).sample(heldout_prompts, min(len(heldout_prompts), c.n_heldout_prompts))
    held = set(heldout_prompts)
    train_prompts = [p for p in make([t.text for t in train]) if p not in held]  # keep the sets disjoint
    if c.n_train_prompts:
        train_prompts = random.Random(c.seed).sample(train_prompts, min(len(train_prompts), c.n_train_prompts))
    write_jsonl(b.root / "prompts_train.jsonl", ({"prompt": p} for p in train_prompts))
    write_jsonl(b.root / "prompts_heldout.jsonl", ({"prompt": p} for p in heldout_prompts))
    return {"train": len(train_prompts), "heldout": len(heldout_prompts)}


def _sft_data_step(b: _Build) -> dict[str, Any]:
    """`sft_train.jsonl` / `sft_heldout.jsonl`: tweet prefix -> continuation pairs for `alignkit sft`."""
    counts = write_sft_data(b.root, min_tokens=b.cfg.prompt_min_tokens, max_tokens=b.cfg.prompt_max_tokens,
                            seed=b.cfg.seed)
    return {"sft_train": counts["train"], "sft_heldout": counts["heldout"]}


def _init_model_step(b: _Build) -> dict[str, Any]:
    c = b.cfg
    params = lm.init_model(b.tokenizer, b.root / "init_model", c.hidden_size, c.num_layers, c.num_heads,
                           c.intermediate_size, c.max_positions, c.tie_embeddings, c.seed)
    return {"params": params}


def _gold_step(b: _Build) -> dict[str, Any]:
    c = b.cfg
    train, heldout = b.split
    if c.gold_limit:
        train = random.Random(c.seed).sample(train, min(c.gold_limit, len(train)))
    info = fit_gold(train, heldout, b.root / "gold", b.root / "cache" / "gold_embeddings.safetensors",
                    batch_size=c.gold_batch_size, max_length=c.gold_max_length, l2=c.gold_l2,
                    weighting=c.gold_weighting, progress=c.progress, log=log)
    h = info["heldout"]
    return {"accuracy": h["accuracy"], "auc": h["auc"], "majority_baseline": h["majority_baseline"],
            "base_rate": info["base_rate"], "embed_seconds": info["embed_seconds"], **info}


def _pretrain_step(b: _Build) -> dict[str, Any]:
    try:
        from alignkit.trainers.pretrain import run as run_pretrain
    except ImportError as err:
        raise AlignkitError(f"the sentiment world needs the pretrain stage (alignkit.trainers.pretrain): {err}") from err
    c = b.cfg
    p = PretrainConfig()
    p.run.output_dir, p.run.seed, p.run.progress = str(b.root / "pretrain"), c.seed, c.progress
    p.run.resume, p.run.save_every, p.run.keep_last, p.run.report_to = True, 100, 1, []
    p.model.name_or_path = str(b.root / "init_model")
    p.data.path, p.data.eval_path = str(b.root / "corpus" / "train.jsonl"), str(b.root / "corpus" / "heldout.jsonl")
    p.optim.lr, p.optim.per_device_batch_size, p.optim.grad_accum_steps = c.pretrain_lr, c.pretrain_batch_size, 1
    p.optim.max_steps, p.optim.warmup_steps, p.optim.scheduler = c.pretrain_steps, c.pretrain_warmup_steps, "cosine"
    p.block_size = c.block_size
    result = run_pretrain(p)
    final = Path(result["final_dir"])
    return {"perplexity": result.get("eval/perplexity"), "steps": result.get("steps"),
            "tokens": c.pretrain_steps * c.pretrain_batch_size * c.block_size,
            "base_model": str(final.relative_to(b.root)) if final.is_relative_to(b.root) else str(final)}


def _summary(b: _Build) -> dict[str, Any]:
    s = b.steps
    times = {name: step["seconds"] for name, step in s.items()}
    cpu_times = {name: step.get("cpu_seconds") for name, step in s.items()}
    return {
        "world": NAME,
        "corpus": {k: s["corpus"][k] for k in ("tweets", "train", "heldout", "positive_rate")}
        | {"train_tokens": s["tokenizer"]["train_tokens"]},
        "tokenizer": {k: s["tokenizer"][k] for k in ("vocab_size", "bos_id", "eos_id", "pad_id")},
        "base_model": s["pretrain"]["base_model"],
        "base_model_params": s["init_model"]["params"],
        "base_lm_heldout_perplexity": s["pretrain"]["perplexity"],
        "gold": {"heldout_accuracy": s["gold"]["accuracy"], "heldout_auc": s["gold"]["auc"],
                 "heldout_majority_baseline": s["gold"]["majority_baseline"],
                 "heldout_auc_confidence_ge_0.9": s["gold"]["heldout_auc_confidence_ge_0.9"],
                 "mean_prob_on_positive": s["gold"]["heldout"]["mean_prob_on_positive"],
                 "mean_prob_on_other": s["gold"]["heldout"]["mean_prob_on_other"],
                 "embed_seconds": s["gold"]["embed_seconds"]},
        "base_rate": s["gold"]["base_rate"],
        "prompts": {"train": s["prompts"]["train"], "heldout": s["prompts"]["heldout"]},
        "build_seconds": times | {"total": round(sum(times.values()), 2)},
        "build_cpu_seconds": cpu_times,
        "config": dataclasses.asdict(b.cfg),
    }


def build(cfg: SentimentBuildConfig) -> dict[str, Any]:
    """Build (or finish building) the sentiment world; return its summary (also `summary.json`)."""
    if cfg.prompt_min_tokens < 1 or cfg.prompt_max_tokens < cfg.prompt_min_tokens:
        raise AlignkitError("options `prompt_min_tokens`..`prompt_max_tokens` must be a range of at least 1")
    root = world_root(NAME, cfg.cache_dir)
    if cfg.force and root.is_dir():
        for child in root.iterdir():
            if child.name not in KEEP_ON_FORCE:
                remove_path(child)
    root.mkdir(parents=True, exist_ok=True)
    log(f"building in {root}")
    previous_threads = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        b = _Build(cfg)
        b.run("corpus", root / "corpus" / "heldout.jsonl", lambda: _corpus_step(b))
        b.run("tokenizer", root / "tokenizer", lambda: _tokenizer_step(b))
        b.run("prompts", root / "prompts_heldout.jsonl", lambda: _prompts_step(b))
        b.run("sft_data", root / "sft_heldout.jsonl", lambda: _sft_data_step(b))
        b.run("init_model", root / "init_model", lambda: _init_model_step(b))
        b.run("gold", root / "gold", lambda: _gold_step(b))
        b.run("pretrain", root / "pretrain" / "final", lambda: _pretrain_step(b))
        summary = _summary(b)
    finally:
        torch.set_num_threads(previous_threads)
    write_json(root / SUMMARY_FILE, summary)
    log(f"built in {summary['build_seconds']['total']:.0f} s: {root / SUMMARY_FILE}")
    return summary


def load_world(root: str | Path) -> World:
    """The built sentiment world in `root` (see `alignkit.worlds.get_world`)."""
    root = Path(root)
    summary = read_json(root / SUMMARY_FILE)
    base = Path(summary["base_model"])
    return World(
        name=NAME,
        root=root,
        tokenizer_path=root / "tokenizer",
        base_model_path=base if base.is_absolute() else root / base,
        load_gold=functools.partial(gold.SentimentGold, root / "gold"),
    )

