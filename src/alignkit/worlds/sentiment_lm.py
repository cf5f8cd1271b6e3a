"""Tokenizer, untrained base model and prompt sets of the sentiment world.

The tokenizer is a byte-level BPE trained on the training tweets, with distinct `<|bos|>`,
`<|eos|>` and `<|pad|>` tokens, a post-processor that prepends BOS, and a ChatML-like chat template
whose turns end with EOS. Prompts are tweet prefixes of a few tokens that end at a word boundary.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from alignkit.worlds.base import atomic_path

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# Renders `<|bos|><|user|>\nHi<|eos|><|assistant|>\n...`. The template emits BOS itself, so
# tokenize its text with add_special_tokens=False (as `apply_chat_template` does).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles must be system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def train_tokenizer(texts: list[str], vocab_size: int = 4096, model_max_length: int = 256):
    """Train a byte-level BPE on `texts` and wrap it as a `PreTrainedTokenizerFast`.

    Args:
        texts: Training texts.
        vocab_size: Vocabulary size, special tokens included.
        model_max_length: Longest sequence the model accepts (its max positions).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer, out_dir: str | Path) -> None:
    """Save a tokenizer directory atomically."""
    with atomic_path(out_dir) as tmp:
        tokenizer.save_pretrained(tmp)


def init_model(
    tokenizer,
    out_dir: str | Path,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 688,
    max_positions: int = 256,
    tie_embeddings: bool = True,
    seed: int = 0,
) -> int:
    """Save a randomly initialised Llama (safetensors + tokenizer) to `out_dir`; return its size.

    Returns:
        Number of parameters (tied embeddings counted once).
    """
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return sum(p.numel() for p in model.parameters())


def _boundary_cuts(tokens: list[str], min_tokens: int, max_tokens: int) -> list[int]:
    """Prefix lengths k in [min, max] where token k starts a new word (byte-level 'Ġ' = space).

    The whole text is never a prompt, so k < len(tokens).
    """
    return [k for k in range(min_tokens, min(max_tokens, len(tokens) - 1) + 1) if tokens[k].startswith("Ġ")]


def make_prompts(
    texts: list[str], tokenizer, min_tokens: int = 2, max_tokens: int = 8, seed: int = 0
) -> list[str]:
    """One prefix of `min_tokens`..`max_tokens` tokens per text, cut at a word boundary.

    The length is drawn uniformly among the word boundaries in range, so prompts of every length
    appear. Texts without such a boundary are skipped; duplicate prompts are dropped.

    Returns:
        Unique prompt texts in order of first appearance. Each re-encodes (without BOS) to the same
        `min_tokens`..`max_tokens` tokens: byte-level BPE never merges across a word start.
    """
    rng = random.Random(seed)
    backend = tokenizer.backend_tokenizer
    encodings = backend.encode_batch(texts, add_special_tokens=False)
    prompts: dict[str, None] = {}
    for encoding in encodings:
        cuts = _boundary_cuts(encoding.tokens, min_tokens, max_tokens)
        if not cuts:
            continue
        k = rng.choice(cuts)
        prompt = tokenizer.decode(encoding.ids[:k])
        if prompt.strip():
            prompts.setdefault(prompt, None)
    return list(prompts)
