"""The sentiment world's SFT pairs: prefix at a word boundary, prefix + continuation = the tweet."""

from __future__ import annotations

import json

import pytest

from alignkit.data.tokenize import encode_example
from alignkit.errors import AlignkitError
from alignkit.worlds import sentiment_lm as lm
from alignkit.worlds.sentiment_sft import write_sft_data

TWEETS = ["I love this so much, thanks everyone!", "@bob that is not good at all #fail", "ok",
          "Great day at the beach with friends today"] * 10


def test_write_sft_data_pairs_reassemble_tweets(tmp_path):
    tokenizer = lm.train_tokenizer(TWEETS, vocab_size=300)
    lm.save_tokenizer(tokenizer, tmp_path / "tokenizer")
    (tmp_path / "corpus").mkdir()
    for split in ("train", "heldout"):
        (tmp_path / "corpus" / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TWEETS))
    counts = write_sft_data(tmp_path)
    assert counts == {"train": 30, "heldout": 30}  # "ok" is too short to cut
    for line in (tmp_path / "sft_train.jsonl").read_text().splitlines():
        pair = json.loads(line)
        assert pair["prompt"] + pair["completion"] in TWEETS and pair["completion"].startswith(" ")
        n_prompt = len(tokenizer(pair["prompt"], add_special_tokens=False)["input_ids"])
        assert 2 <= n_prompt <= 8
        ex = encode_example(tokenizer, pair)  # same tokens as the whole tweet, then EOS
        assert ex["input_ids"] == tokenizer(pair["prompt"] + pair["completion"])["input_ids"] + [tokenizer.eos_token_id]


def test_write_sft_data_needs_a_built_world(tmp_path):
    with pytest.raises(AlignkitError, match="world sentiment build"):
        write_sft_data(tmp_path)
