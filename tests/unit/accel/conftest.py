"""Tiny random models of every architecture the backends cover (and one they do not), for tests/unit/accel.

`causal_lm(kind, vocab)` and `classifier(kind, vocab)` build 2-layer models (hidden 32, 4 heads)
with the tiny tokenizer's ids (pad 0, bos 1, eos 2) in eval mode, seeded so that a kind always gives
the same weights. Kinds: `llama` (grouped-query attention, attention and MLP biases), `mistral` (no
sliding window), `qwen2` (q/k/v biases only), `qwen3` (q/k norms), `gpt2` (learned positions: none
of the CPU backend's machinery covers it). The `shared_rows` fixture makes the CPU backend pack every batch
that repeats a prompt. The `tokenizer` and `prompts` fixtures are in tests/conftest.py.
"""

from __future__ import annotations

import pytest
import torch

from alignkit.accel.cpu import shared_prompts

KINDS = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
DECODED = ("llama", "mistral", "qwen2")  # FastDecoder's architectures
PACKED = ("llama", "mistral", "qwen2", "qwen3")  # packed prompt rows (accepts_4d_masks)
LAST_TOKEN = ("llama", "mistral", "qwen2")  # one-token reward read (supports_last_token)


@pytest.fixture
def shared_rows(monkeypatch):
    """Pack every batch with repeated prompts, whatever the FLOP estimate says (these tiny rows are not
    what `sharing_pays` is tuned for), so that the packed forward is what a test compares."""

    monkeypatch.setattr(shared_prompts, "SHARING_MARGIN", float("inf"))


_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_DECODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, max_position_embeddings=256, tie_word_embeddings=False, **_IDS)


def _config(kind: str, vocab: int, **overrides):
    import transformers

    if kind == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, vocab_size=vocab,
                                       **_IDS, **overrides)
    extra = {"llama": dict(attention_bias=True, mlp_bias=True), "mistral": dict(sliding_window=None),
             "qwen3": dict(head_dim=8)}.get(kind, {})
    name = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}[kind]
    return getattr(transformers, name)(**{**_DECODER, **extra, "vocab_size": vocab, **overrides})


def causal_lm(kind: str, vocab: int, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random causal LM of `kind` (see the module docstring), in eval mode."""
    import transformers

    name = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel"}[kind]
    torch.manual_seed(seed)
    return getattr(transformers, name)(_config(kind, vocab, **overrides)).eval()


def classifier(kind: str, vocab: int, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random reward model of `kind` (one label, its head drawn from N(0, 1 / hidden): rewards of
    order 1, not the near-zero ones of Hugging Face's initialisation)."""
    import transformers

    name = {"llama": "LlamaForSequenceClassification", "mistral": "MistralForSequenceClassification",
            "qwen2": "Qwen2ForSequenceClassification", "qwen3": "Qwen3ForSequenceClassification",
            "gpt2": "GPT2ForSequenceClassification"}[kind]
    torch.manual_seed(seed)
    model = getattr(transformers, name)(_config(kind, vocab, num_labels=1, **overrides)).eval()
    head = model.score
    with torch.no_grad():
        head.weight.normal_(std=head.in_features**-0.5)
    return model
