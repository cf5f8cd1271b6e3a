"""Segment rewards (Xiao & Zhu, Sec. 10.4.1.3, Eq. 10.67-10.70): split a response, score each piece in context.

A response y is split into segments y_1 ... y_n (by sentences, or into chunks of a fixed number of
tokens). The reward of segment k is the reward model read at the last token of y_k in the
sequence [x, y_1, ..., y_n] (Eq. 10.67: r^k = r(x, y, y_k); a causal backbone sees x, y_1 .. y_k
there), and the reward of the response is their sum (Eq. 10.68). Because attention is causal, the
reading at the end of y_k equals the reward of the prefix sequence [x, y_1 .. y_k] scored alone;
training uses those prefix sequences (`segment_prefixes`) with segment scores s(y_k) and the
pointwise loss (Eq. 10.70), so one forward pass per prefix runs through the ordinary model call.

Segments are tokenized one by one and their ids concatenated (the prompt stays a strict prefix,
see `alignkit.data.tokenize`), and the last segment ends with EOS, read there like a whole response.
"""

from __future__ import annotations

import re
from typing import Any

from alignkit.data.tokenize import encode_prompt, encode_text
from alignkit.errors import AlignkitError

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`; the whitespace after a sentence starts the next one, so "".join gives `text`."""
    cuts = [m.start() for m in _SENTENCE_END.finditer(text) if 0 < m.start() and m.end() < len(text)]
    pieces, start = [], 0
    for cut in cuts:
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return [p for p in pieces if p]


def parse_segmentation(spec: str) -> tuple[str, int]:
    """`none`, `sentences` or `chunks:N` -> (kind, N); errors name the option `segments`."""
    if spec in ("none", "sentences"):
        return spec, 0
    kind, _, size = spec.partition(":")
    if kind == "chunks" and size.isdigit() and int(size) > 0:
        return kind, int(size)
    raise AlignkitError(f"option `segments`: expected 'none', 'sentences' or 'chunks:N' (N > 0), got {spec!r}")


def split_text(text: str, spec: str, tokenizer: Any = None) -> list[str]:
    """Segments of `text` as strings (for labelling): `none`, `sentences`, or `chunks:N` tokens of `tokenizer`.

    Sentences concatenate back to `text` exactly; token chunks are decoded one by one.
    """
    kind, size = parse_segmentation(spec)
    if kind == "none":
        return [text]
    if kind == "sentences":
        return split_sentences(text) or [text]
    if tokenizer is None:
        raise AlignkitError(f"option `segments`: {spec!r} needs a tokenizer (the policy's)")
    ids = encode_text(tokenizer, text)
    # Cut the decoded text at chunk ends rather than decoding chunks alone: tokenizers that strip a
    # leading space or split a character across tokens would not give back the text when joined.
    cuts = [len(tokenizer.decode(ids[:end])) for end in range(size, len(ids), size)]
    whole = tokenizer.decode(ids)
    bounds = [0, *cuts, len(whole)]
    pieces = [whole[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
    return pieces or [text]


def segment_ids(tokenizer: Any, response: str, spec: str) -> list[list[int]]:
    """Token ids of each segment of `response` (the last one gets EOS appended)."""
    kind, size = parse_segmentation(spec)
    if kind == "chunks":
        ids = encode_text(tokenizer, response)
        pieces = [ids[i : i + size] for i in range(0, len(ids), size)] or [[]]
    else:
        pieces = [encode_text(tokenizer, s) for s in (split_sentences(response) if kind == "sentences" else [response])]
    if tokenizer.eos_token_id is not None:
        pieces[-1] = pieces[-1] + [tokenizer.eos_token_id]
    return [p for p in pieces if p]


def segment_sequence(tokenizer: Any, prompt: Any, segments: list[list[int]]) -> tuple[list[int], list[int]]:
    """ids of [x, y_1, ..., y_n] and the column of the last token of each segment (where r^k is read)."""
    ids = encode_prompt(tokenizer, prompt)
    ends = []
    for seg in segments:
        ids = ids + seg
        ends.append(len(ids) - 1)
    return ids, ends


def segment_prefixes(tokenizer: Any, prompt: Any, segments: list[str]) -> list[list[int]]:
    """ids of each prefix [x, y_1 .. y_k], k = 1..n, for training on segment scores (last one with EOS)."""
    if not segments:
        raise AlignkitError("a segment record needs at least one segment")
    pieces = [encode_text(tokenizer, s) for s in segments]
    if tokenizer.eos_token_id is not None:
        pieces[-1] = pieces[-1] + [tokenizer.eos_token_id]
    ids, ends = segment_sequence(tokenizer, prompt, pieces)
    return [ids[: end + 1] for end in ends]
