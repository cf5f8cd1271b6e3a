"""SFT data of the sentiment world: tweet prefix -> continuation pairs from the world's corpus.

`write_sft_data(world_root)` reads `corpus/train.jsonl` and `corpus/heldout.jsonl` (written by the
world build) and writes `sft_train.jsonl` / `sft_heldout.jsonl` with records `{prompt, completion}`:
the prompt is the text of the first 2-8 tokens of a tweet, cut at a word boundary (as the world's
prompts are), and the completion is the rest, starting with its space. `prompt + completion` is
the tweet, and `alignkit sft` tokenizes string records by plain concatenation, so the pair gives
the same tokens as the tweet. `alignkit world sentiment build` writes them (step `sft_data`);
then `alignkit sft configs/sentiment/sft.yaml`.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from alignkit.errors import AlignkitError
from alignkit.worlds.base import read_jsonl_field, world_root, write_jsonl
from alignkit.worlds.sentiment_lm import _boundary_cuts

SPLITS = {"train": "sft_train.jsonl", "heldout": "sft_heldout.jsonl"}


def make_pairs(texts: list[str], tokenizer: Any, min_tokens: int = 2, max_tokens: int = 8,
               seed: int = 0) -> list[dict[str, str]]:
    """One `{prompt, completion}` per text: a prefix of `min_tokens`..`max_tokens` tokens at a word start.

    Texts without such a cut (too short) are skipped. The cut length is drawn uniformly among the
    word boundaries in range.
    """
    rng = random.Random(seed)
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    pairs = []
    for text, encoding in zip(texts, encodings, strict=True):
        cuts = _boundary_cuts(encoding.tokens, min_tokens, max_tokens)
        if not cuts:
            continue
        start = encoding.offsets[rng.choice(cuts)][0]  # character where the cut token begins
        prompt, completion = text[:start], text[start:]
        if prompt.strip() and completion.strip():
            pairs.append({"prompt": prompt, "completion": completion})
    return pairs


def write_sft_data(root: str | Path, *, min_tokens: int = 2, max_tokens: int = 8, seed: int = 0) -> dict[str, int]:
    """Write `sft_train.jsonl` and `sft_heldout.jsonl` into the world directory `root`.

    Returns:
        The number of pairs written per split.

    Raises:
        AlignkitError: The world's corpus or tokenizer is missing (build the world first).
    """
    root = Path(root)
    if not (root / "tokenizer").is_dir():
        raise AlignkitError(f"{root / 'tokenizer'} does not exist: run `alignkit world sentiment build` first")
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    counts = {}
    for split, name in SPLITS.items():
        texts = read_jsonl_field(root / "corpus" / f"{split}.jsonl", "text")
        pairs = make_pairs(texts, tokenizer, min_tokens, max_tokens, seed)
        counts[split] = write_jsonl(root / name, pairs)
    return counts


if __name__ == "__main__":
    world = Path(sys.argv[1]) if len(sys.argv) > 1 else world_root("sentiment")
    print(f"wrote SFT pairs in {world}: {write_sft_data(world)}")
