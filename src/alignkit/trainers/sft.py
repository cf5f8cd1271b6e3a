"""`alignkit sft`: supervised fine-tuning on prompt/response pairs, training only the responses.

The loss of an example is -log Pr(y | x) = -sum_i log Pr(y_i | x, y_<i) (Xiao & Zhu, Eq. 10.1-10.3):
prompt and response are one sequence, the forward pass runs as usual and only response tokens
(and their EOS) are labelled. A K-round conversation is one sequence too, with the user/system
tokens masked, so one forward pass gives sum_k -log Pr(y^k | x^1, y^1, ..., x^k) (Eq. 10.5-10.7).
Records are `{prompt, completion}` (strings: plain concatenation; message lists: the chat template)
or `{messages}`; see `alignkit.data.tokenize`. The loss is summed over tokens and divided by the
trained-token count of the whole accumulated batch (`TrainLoop.update`).

Held-out response loss and perplexity are logged before training, every `run.eval_every` steps and
at the end; each evaluation also writes `samples/step-N.jsonl` (sampled at temperature 1).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from alignkit.config import DataConfig, ModelConfig, OptimConfig, RunConfig, SamplingConfig
from alignkit.data.collate import collate_packed, collate_padded, left_pad, to_device
from alignkit.data.formats import ValidationReport, print_report, validate_records
from alignkit.data.load import load_records, split_records
from alignkit.data.tokenize import encode_prompt, tokenize_sft
from alignkit.errors import AlignkitError
from alignkit.losses.sft import token_nll_sum
from alignkit.models.load import load_causal_lm, load_tokenizer
from alignkit.models.logits import labelled_logits
from alignkit.ops.logprobs import IGNORE_INDEX
from alignkit.rollout.generate import stop_token_ids
from alignkit.trainers.loop import TrainLoop, evaluate


@dataclass
class SFTConfig:
    """Supervised fine-tuning on `{prompt, completion}` or `{messages}` records (responses only)."""

    LIMITS: ClassVar[dict[str, str]] = {"n_samples": ">= 0", "eval_max_examples": ">= 0"}

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=48))
    """How the held-out samples of each evaluation are drawn."""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=10))
    train_on_prompt: bool = False
    """Also train on prompt (user/system) tokens, i.e. the full sequence log-likelihood (Eq. 10.4)."""
    truncation: Literal["left", "drop"] = "left"
    """Examples longer than `data.max_length`: cut the prompt from the left (then the response's end), or drop them."""
    packing: bool = False
    """Pack several examples per row (block-diagonal attention, positions restarting per example): faster, same loss."""
    n_samples: int = 4
    """Held-out prompts sampled from at each evaluation (written to `samples/step-N.jsonl`; 0: none)."""
    eval_max_examples: int = 512
    """At most this many held-out examples are used for the eval loss (0: no eval loss)."""


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def _validated(path: str, cfg: SFTConfig) -> ValidationReport:
    """Valid `sft` records of `path` with their 1-based rows, the skipped rows and the repeated ones (warned of)."""
    report = validate_records(load_records(path, on_bad_rows=cfg.data.on_bad_rows), "sft", path, cfg.data.on_bad_rows)
    print_report(report, path, "sft")
    return report


def load_sft_data(cfg: SFTConfig, tokenizer: Any) -> dict[str, Any]:
    """Read, validate, split and tokenize the training and held-out records.

    Returns:
        `train` and `eval` (tokenized examples), `eval_prompts` (for samples, with references) and
        counts `truncated`, `dropped`, `skipped_rows` (invalid or untokenizable rows skipped) and
        `duplicate_rows` (rows of `data.path` that repeat an earlier row; a split keeps copies together).
    """
    d = cfg.data
    if not d.path:
        raise AlignkitError("option `data.path` is required: a file or dataset of {prompt, completion} or "
                            "{messages} records")
    report = _validated(d.path, cfg)
    pairs, skipped = list(zip(report.rows, report.records, strict=True))[: d.limit], report.n_skipped
    if d.eval_path:
        held = _validated(d.eval_path, cfg)
        eval_pairs, skipped = list(zip(held.rows, held.records, strict=True)), skipped + held.n_skipped
    else:  # copies of a record stay on one side
        pairs, eval_pairs = split_records(pairs, d.eval_fraction, cfg.run.seed, key=lambda pair: pair[1])
    out: dict[str, Any] = {"truncated": 0, "dropped": 0, "skipped_rows": skipped,
                           "duplicate_rows": report.n_duplicates}
    for name, part, source in (("train", pairs, d.path), ("eval", eval_pairs, d.eval_path or d.path)):
        result = tokenize_sft(
            [rec for _, rec in part], tokenizer, max_length=d.max_length, truncation=cfg.truncation,
            train_on_prompt=cfg.train_on_prompt, source=source, rows=[row for row, _ in part],
            on_bad_rows=d.on_bad_rows,
        )
        out[name] = result.examples
        out["truncated"] += result.truncated
        out["dropped"] += result.dropped
        out["skipped_rows"] += len(result.skipped)
    if not out["train"]:
        raise AlignkitError(f"{d.path}: no training examples left after validation and truncation")
    out["eval"] = out["eval"][: cfg.eval_max_examples]
    out["eval_prompts"] = [_prompt_and_reference(rec) for _, rec in eval_pairs[: cfg.n_samples]]
    return out


def _prompt_and_reference(record: dict) -> tuple[Any, Any]:
    """The prompt of a record (messages up to the last assistant turn) and its reference response."""
    if "messages" in record:
        messages = record["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return messages[:last], messages[last]["content"]
    return record["prompt"], record["completion"]


def make_collate(packing: bool, pad_id: int, max_length: int, dtype: torch.dtype) -> Callable[[list[dict]], dict]:
    """Right-padded batches, or packed rows of at most `max_length` tokens."""
    if packing:
        return lambda examples: collate_packed(examples, pad_id, max_length, dtype)
    return lambda examples: collate_padded(examples, pad_id)


# ---------------------------------------------------------------------------------------------
# Loss, evaluation, samples
# ---------------------------------------------------------------------------------------------


def sft_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    """Summed response NLL of a padded or packed batch (Eq. 10.2; Eq. 10.6 for conversations)."""
    logits, targets = labelled_logits(model, batch["labels"], input_ids=batch["input_ids"],
                                      attention_mask=batch["attention_mask"],
                                      position_ids=batch.get("position_ids"))  # B x C x V, B x C
    return token_nll_sum(logits, targets), {}


def eval_batches(loop: TrainLoop, examples: list[dict], collate: Callable, batch_size: int) -> list[dict]:
    """This process's share of the held-out examples, collated in batches (as many on every process)."""
    return loop.eval_batches(examples, collate, batch_size)


def sample_generations(model: Any, tokenizer: Any, prompts: list[tuple[Any, Any]], *, sampling: SamplingConfig,
                       seed: int) -> list[dict]:
    """Sample one response per prompt (left padding), as `{prompt, completion, reference}`."""
    ids = [encode_prompt(tokenizer, prompt) for prompt, _ in prompts]
    batch = left_pad(ids, tokenizer.pad_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
            do_sample=True, **sampling.kwargs(),
            pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_token_ids(tokenizer, model),
        )
    model.train(was_training)
    new = out[:, batch["input_ids"].size(1):].tolist()
    stops = stop_token_ids(tokenizer, model)
    return [{"prompt": prompt, "completion": tokenizer.decode(_until_eos(tokens, stops),
                                                               skip_special_tokens=True),
             "reference": reference} for (prompt, reference), tokens in zip(prompts, new, strict=True)]


def _until_eos(tokens: list[int], stops: list[int]) -> list[int]:
    """The tokens before the first end token."""
    return next((tokens[:t] for t, token in enumerate(tokens) if token in stops), tokens)


def evaluate_and_sample(loop: TrainLoop, cfg: SFTConfig, tokenizer: Any, batches: list[dict],
                        prompts: list[tuple[Any, Any]]) -> dict[str, float]:
    """Held-out response loss and perplexity; samples written to `samples/step-N.jsonl` (main process)."""
    metrics: dict[str, float] = {}
    if batches:  # on every process or none: `eval_batches` pads a process without held-out examples
        loss = evaluate(loop, batches, sft_loss)
        metrics = {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}
    if prompts and loop.accelerator.is_main_process:
        rows = sample_generations(loop.accelerator.unwrap_model(loop.model), tokenizer, prompts,
                                  sampling=cfg.sampling, seed=cfg.run.seed + loop.step)
        path = loop.out_dir / "samples" / f"step-{loop.step}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return metrics


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def _plan(data: dict[str, Any], loop: TrainLoop, cfg: SFTConfig) -> dict[str, str]:
    n_tokens = sum(len(ex["input_ids"]) for ex in data["train"])
    n_terms = sum(sum(label != IGNORE_INDEX for label in ex["labels"]) for ex in data["train"])
    mean = n_tokens / len(data["train"])
    return {
        "tokens": f"{n_tokens:,} training tokens ({n_terms:,} trained), {mean:.1f} per example; "
                  f"~{mean * loop.global_batch:,.0f} tokens per optimizer step",
        "data": f"{len(data['eval'])} held-out examples; {data['truncated']} truncated, {data['dropped']} "
                f"dropped (truncation={cfg.truncation}, max_length={cfg.data.max_length}), "
                f"{data['skipped_rows']} bad rows skipped, {data.get('duplicate_rows', 0)} repeated rows",
        "model": f"{'LoRA r=' + str(cfg.model.lora_r) if cfg.model.lora_r > 0 else 'full fine-tuning'}"
                 f"{', packing' if cfg.packing else ''}",
    }


def run(cfg: SFTConfig) -> dict[str, Any]:
    """Fine-tune, evaluate held-out response loss, save `final/`; return the summary."""
    tokenizer = load_tokenizer(cfg.model)
    data = load_sft_data(cfg, tokenizer)
    model = load_causal_lm(cfg.model, tokenizer)
    model.train()
    dtype = next(model.parameters()).dtype
    collate = make_collate(cfg.packing, tokenizer.pad_token_id, cfg.data.max_length, dtype)
    train = data["train"]
    loop = TrainLoop("sft", cfg, model, n_examples=len(train))
    loop.print_plan(n_examples=len(train), extra=_plan(data, loop, cfg))
    batches = eval_batches(loop, data["eval"], make_collate(False, tokenizer.pad_token_id, 0, dtype),
                           cfg.optim.per_device_batch_size)
    start = loop.resume()
    if start == 0:
        first = evaluate_and_sample(loop, cfg, tokenizer, batches, data["eval_prompts"])
        loop.stage_state["first_eval_loss"] = first.get("eval/loss")
        if first:
            loop.log(first)
    for _ in range(start, loop.total_steps):
        t0 = time.perf_counter()
        micro = [collate([train[i] for i in idx]) for idx in loop.micro_batch_indices(len(train), loop.step)]
        n_tokens = sum(int(mb["input_ids"].numel()) for mb in micro)
        metrics = loop.update([to_device(mb, loop.accelerator.device) for mb in micro], sft_loss)
        metrics["perf/tokens_per_s"] = n_tokens * loop.world / (time.perf_counter() - t0)
        if cfg.run.eval_every and loop.step % cfg.run.eval_every == 0 and loop.step < loop.total_steps:
            metrics.update(evaluate_and_sample(loop, cfg, tokenizer, batches, data["eval_prompts"]))
        loop.end_step(metrics)
    final = evaluate_and_sample(loop, cfg, tokenizer, batches, data["eval_prompts"])
    if final:
        loop.log(final)
    summary = {
        "examples": len(train), "eval_examples": len(data["eval"]), "truncated": data["truncated"],
        "dropped": data["dropped"], "skipped_rows": data["skipped_rows"],
        "duplicate_rows": data.get("duplicate_rows", 0),
        "first_eval_loss": loop.stage_state.get("first_eval_loss"), "last_eval_loss": final.get("eval/loss"),
        **final,
    }
    return loop.finish(tokenizer, summary, merge_lora=cfg.model.save_merged)
