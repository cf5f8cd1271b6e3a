"""`alignkit pretrain`: causal language modelling on raw text.

Texts are tokenized (BOS from the tokenizer, EOS appended), concatenated and cut into blocks of
`block_size` tokens; every block is one training example. Used to build a world's base model, and
for continued pretraining of any causal LM on a user's own text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from alignkit.config import DataConfig, ModelConfig, OptimConfig, RunConfig
from alignkit.data.load import load_records, record_rows, split_records
from alignkit.errors import AlignkitError
from alignkit.losses.sft import causal_lm_loss_sum
from alignkit.models.load import load_causal_lm, load_tokenizer
from alignkit.trainers.loop import TrainLoop, evaluate


@dataclass
class PretrainConfig:
    """Causal language modelling on raw text records `{text}`."""

    LIMITS: ClassVar[dict[str, str]] = {"block_size": ">= 2", "eval_blocks": ">= 0"}

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=50))
    block_size: int = 128
    """Tokens per training example (texts are concatenated, then cut into blocks)."""
    text_field: str = "text"
    """Record field holding the text."""
    from_scratch: bool = False
    """Initialise the weights randomly from the model's config instead of loading them."""
    eval_blocks: int = 256
    """At most this many held-out blocks are used for evaluation (0: no evaluation)."""


def _texts(records: list[dict], field_name: str, source: str) -> list[str]:
    texts = []
    for row, rec in zip(record_rows(records), records, strict=True):
        value = rec.get(field_name)
        if not isinstance(value, str) or not value.strip():
            raise AlignkitError(f"{source}, row {row}, field '{field_name}': expected non-empty text")
        texts.append(value)
    return texts


def make_blocks(texts: list[str], tokenizer: Any, block_size: int) -> torch.Tensor:
    """Tokenize, append EOS, concatenate, cut into N x block_size (the remainder is dropped)."""
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    stream = [tok for seq in ids for tok in (*seq, tokenizer.eos_token_id)]
    n = len(stream) // block_size
    if n == 0:
        raise AlignkitError(f"the data holds {len(stream)} tokens, fewer than one block of {block_size}")
    return torch.tensor(stream[: n * block_size], dtype=torch.long).view(n, block_size)


def _load_data(cfg: PretrainConfig) -> tuple[list[str], list[str]]:
    if not cfg.data.path:
        raise AlignkitError("option `data.path` is required: a file or dataset of {text} records")
    records = load_records(cfg.data.path)[: cfg.data.limit]
    _texts(records, cfg.text_field, cfg.data.path)  # checked before the split: an error names the file's row
    if cfg.data.eval_path:
        eval_records = load_records(cfg.data.eval_path)
    else:
        records, eval_records = split_records(records, cfg.data.eval_fraction, cfg.run.seed)
    return (_texts(records, cfg.text_field, cfg.data.path),
            _texts(eval_records, cfg.text_field, cfg.data.eval_path or cfg.data.path))


def _load_model(cfg: PretrainConfig, tokenizer: Any) -> torch.nn.Module:
    if not cfg.from_scratch:
        return load_causal_lm(cfg.model, tokenizer)

    torch.manual_seed(cfg.run.seed)
    config = AutoConfig.from_pretrained(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return model


def lm_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    """Summed next-token loss of a batch of full blocks."""
    logits = model(input_ids=batch["input_ids"]).logits
    loss, _ = causal_lm_loss_sum(logits, batch["input_ids"])
    return loss, {}


def run(cfg: PretrainConfig) -> dict[str, Any]:
    """Train, evaluate held-out perplexity, save `final/`; return the summary."""
    train_texts, eval_texts = _load_data(cfg)
    tokenizer = load_tokenizer(cfg.model)
    blocks = make_blocks(train_texts, tokenizer, cfg.block_size)
    eval_blocks = (make_blocks(eval_texts, tokenizer, cfg.block_size)[: cfg.eval_blocks]
                   if eval_texts and cfg.eval_blocks else None)
    model = _load_model(cfg, tokenizer)
    model.train()
    o = cfg.optim
    loop = TrainLoop("pretrain", cfg, model, n_examples=len(blocks))
    loop.print_plan(n_examples=len(blocks), extra={
        "tokens": f"{blocks.numel():,} training tokens in blocks of {cfg.block_size}; "
                  f"{loop.global_batch * cfg.block_size:,} tokens per optimizer step"})

    def eval_batches() -> list[dict]:  # this process's share, as many batches on every process
        return loop.eval_batches(eval_blocks, lambda rows: {"input_ids": torch.stack(rows),
                                                            "n_terms": len(rows) * (cfg.block_size - 1)},
                                 o.per_device_batch_size)

    start = loop.resume()
    for _ in range(start, loop.total_steps):
        micro = [{"input_ids": blocks[idx].to(loop.accelerator.device), "n_terms": len(idx) * (cfg.block_size - 1)}
                 for idx in loop.micro_batch_indices(len(blocks), loop.step)]
        metrics = loop.update(micro, lm_loss)
        if eval_blocks is not None and cfg.run.eval_every and loop.step % cfg.run.eval_every == 0:
            metrics["eval/loss"] = evaluate(loop, eval_batches(), lm_loss)
        loop.end_step(metrics)
    summary: dict[str, Any] = {"train_blocks": len(blocks), "block_size": cfg.block_size}
    if eval_blocks is not None:
        eval_loss = evaluate(loop, eval_batches(), lm_loss)
        summary.update({"eval/loss": eval_loss, "eval/perplexity": math.exp(eval_loss)})
        loop.log({"eval/loss": eval_loss, "eval/perplexity": math.exp(eval_loss)})
    return loop.finish(tokenizer, summary)
