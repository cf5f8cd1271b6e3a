"""Shared fixtures: a tiny local tokenizer and a tiny random Llama, saved in Hugging Face format.

No network: the tokenizer is a byte-level BPE trained here on a few sentences, the model is randomly
initialised. Both are session-scoped directories; load them with `AutoTokenizer.from_pretrained`,
`AutoModelForCausalLM.from_pretrained` or alignkit's loaders. Tests must not modify them.
The sampler and backend tests use the tokenizer in memory (`tokenizer`) and `TINY_PROMPTS` left-padded
(`prompts`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "I loved this movie, it was wonderful and the actors were great!",
    "Terrible film. I hated every minute of it.",
    "The plot was fine but the ending felt rushed.",
    "What a beautiful, moving story about friendship.",
    "User: how are you? Assistant: I am fine, thank you.",
]

TINY_PROMPTS = ["The quick brown fox", "I loved", "Terrible film. I hated every minute", "What"]
"""Four prompts of different lengths: left-padded together (`prompts`), some rows are padded."""

TINY_SPECIAL_TOKENS = {"pad_token": "<|pad|>", "bos_token": "<|bos|>", "eos_token": "<|eos|>"}


def build_tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer with `<|pad|>` (id 0), `<|bos|>` (1, prepended) and `<|eos|>` (2).

    It has alignkit's default chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from alignkit.models.load import DEFAULT_CHAT_TEMPLATE

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(TINY_SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TINY_TEXTS * 4, trainer)
    bos_id = backend.token_to_id("<|bos|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **TINY_SPECIAL_TOKENS)
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def build_tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    """A randomly initialised 2-layer Llama (hidden 32, 4 heads, tied embeddings), ids as the tiny tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=64,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**kwargs))


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """Directory of the tiny tokenizer (pad `<|pad|>`, bos `<|bos|>`, eos `<|eos|>`, chat template)."""
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tiny_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """Directory of a tiny random Llama (safetensors) with the tiny tokenizer saved beside it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    out = tmp_path_factory.mktemp("tiny_llama")
    build_tiny_llama(len(tokenizer)).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def reward_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """A tiny reward model (the tiny Llama with a scalar head drawn from N(0, 1/(d+1))), HF format."""
    from alignkit.config import ModelConfig
    from alignkit.models.load import load_sequence_classifier, load_tokenizer
    from alignkit.models.reward_model import init_head
    from alignkit.models.save import save_pretrained_atomic

    cfg = ModelConfig(name_or_path=str(tiny_llama_dir))
    tokenizer = load_tokenizer(cfg)
    model = load_sequence_classifier(cfg, num_labels=1, tokenizer=tokenizer)
    init_head(model)
    return save_pretrained_atomic(model, tokenizer, tmp_path_factory.mktemp("rm") / "rm")


@pytest.fixture(scope="module")
def tokenizer():
    """The tiny tokenizer, built in memory once per test module (do not change it)."""
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """(ids, mask) of `TINY_PROMPTS`, left-padded by `tokenize_prompts` (some rows are padded)."""
    from alignkit.rollout.generate import tokenize_prompts

    ids, mask = tokenize_prompts(tokenizer, TINY_PROMPTS)
    assert not mask.all()  # left padding is exercised
    return ids, mask


def assert_trained_copy_saved(final_dir: Path, initial_dir: Path) -> None:
    """`final_dir` loads with `AutoModelForCausalLM` as the initial model's architecture, with the same
    parameter names and shapes, finite weights that training moved, and finite logits."""
    from transformers import AutoModelForCausalLM

    saved, initial = (AutoModelForCausalLM.from_pretrained(d).eval() for d in (final_dir, initial_dir))
    assert type(saved) is type(initial)
    a, b = saved.state_dict(), initial.state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert all(torch.isfinite(v).all() for v in a.values())
    assert any(not torch.equal(a[k], b[k]) for k in a), "the saved weights are the initial ones"
    with torch.no_grad():
        logits = saved(input_ids=torch.tensor([[1, 5, 6, 7]])).logits
    assert logits.shape == (1, 4, saved.config.vocab_size) and torch.isfinite(logits).all()
