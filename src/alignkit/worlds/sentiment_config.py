"""Options of `alignkit world sentiment build` (each field's docstring is its `--help` text)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class SentimentBuildConfig:
    """Build the sentiment world: tokenizer, base LM, gold scorer and prompt sets."""

    cache_dir: str | None = None
    """alignkit cache directory; the world goes to `<cache_dir>/worlds/sentiment`
    (default: $ALIGNKIT_CACHE, else ~/.cache/alignkit)."""
    seed: int = 0
    """Seed of model initialisation, pretraining order and prompt lengths."""
    force: bool = False
    """Rebuild every step even if its output exists (the embedding cache is kept: it is checked by hash)."""
    progress: bool = True
    """Show progress bars with ETA."""
    threads: int = 2
    """torch CPU threads during the build (0: leave torch's default)."""
    heldout_percent: float = 2.0
    """Percent of tweets held out (chosen by a hash of the text, so the split is stable)."""
    vocab_size: int = 4096
    """Byte-level BPE vocabulary size, special tokens included."""
    hidden_size: int = 256
    """Base model hidden size."""
    num_layers: int = 4
    """Base model transformer layers."""
    num_heads: int = 4
    """Base model attention heads."""
    intermediate_size: int = 688
    """Base model MLP width."""
    tie_embeddings: bool = True
    """Tie the input embeddings and the output head."""
    max_positions: int = 256
    """Base model maximum sequence length."""
    pretrain_steps: int = 450
    """Pretraining optimizer steps (450 x 16 x 128 tokens: ~4 minutes on 2 cores)."""
    pretrain_batch_size: int = 16
    """Pretraining blocks per optimizer step."""
    pretrain_lr: float = 1e-3
    """Pretraining peak learning rate (AdamW; linear warm-up, cosine decay)."""
    pretrain_warmup_steps: int = 40
    """Pretraining warm-up steps."""
    block_size: int = 128
    """Pretraining tokens per block."""
    prompt_min_tokens: int = 2
    """Fewest tokens of a prompt (a tweet prefix ending at a word boundary)."""
    prompt_max_tokens: int = 8
    """Most tokens of a prompt."""
    n_heldout_prompts: int = 512
    """Held-out prompts kept (from held-out tweets; >= 256 keeps evaluation noise near +-0.03)."""
    n_train_prompts: int = 0
    """Training prompts kept (0: one per training tweet with a word boundary in range)."""
    gold_batch_size: int = 128
    """Texts per forward pass of the gold encoder."""
    gold_max_length: int = 128
    """Gold encoder truncation length in word pieces (tweets have ~30)."""
    gold_l2: float = 1e-3
    """L2 penalty of the gold logistic-regression head (on standardised embeddings)."""
    gold_weighting: Literal["confidence", "none"] = "confidence"
    """Weight each training tweet by its annotator agreement, or equally."""
    gold_limit: int = 0
    """Fit the gold head on a random N training tweets only (0: all); for quick test builds."""


