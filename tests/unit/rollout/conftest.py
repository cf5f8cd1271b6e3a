"""Fixtures shared by the sampler tests: the tiny tokenizer and four left-padded prompts."""

from __future__ import annotations

import pytest
from tests.conftest import build_tiny_tokenizer

from alignkit.rollout.generate import tokenize_prompts

PROMPTS = ["The quick brown fox", "I loved", "Terrible film. I hated every minute", "What"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """(ids, mask) of `PROMPTS`, left-padded (some rows are padded)."""
    ids, mask = tokenize_prompts(tokenizer, PROMPTS)
    assert not mask.all()  # left padding is exercised
    return ids, mask
