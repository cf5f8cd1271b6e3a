"""SFT tokenization: exact response masks on real chat renderings, strict prompt prefixes, one BOS, truncation."""

from __future__ import annotations

import pytest
from tests.conftest import build_tiny_tokenizer

from alignkit.data.collate import collate_padded
from alignkit.data.tokenize import (
    conversation_segments,
    encode_example,
    encode_prompt,
    encode_text,
    tokenize_sft,
)
from alignkit.errors import AlignkitError
from alignkit.losses.sft import IGNORE_INDEX

CONVERSATION = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "how are you?"},
    {"role": "assistant", "content": "I am fine, thank you."},
    {"role": "user", "content": "The movie?"},
    {"role": "assistant", "content": "It was wonderful!"},
]
# Like the sentiment world's template: it renders BOS itself, and marks roles with plain text.
BOS_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<' + m['role'] + '>\n' + m['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant>\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def bos_tok():
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = BOS_TEMPLATE
    return tokenizer


def trained_spans(ex: dict) -> list[list[int]]:
    """Maximal runs of consecutive trained tokens."""
    spans, current = [], []
    for tok_id, label in zip(ex["input_ids"], ex["labels"], strict=True):
        if label != IGNORE_INDEX:
            assert label == tok_id
            current.append(tok_id)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


def test_single_turn_mask_token_by_token(tok):
    prompt = [{"role": "user", "content": "how are you?"}]
    ex = encode_example(tok, {"prompt": prompt, "completion": [{"role": "assistant", "content": "I am fine."}]})
    # the expected sequence, built independently: BOS + rendered prompt + response + EOS + template "\n"
    rendered = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    prompt_ids = [tok.bos_token_id] + encode_text(tok, rendered)
    response_ids = encode_text(tok, "I am fine.") + [tok.eos_token_id]
    assert ex["input_ids"] == prompt_ids + response_ids + encode_text(tok, "\n")
    expected = [IGNORE_INDEX] * len(prompt_ids) + response_ids + [IGNORE_INDEX]
    assert ex["labels"] == expected
    assert ex["prompt_length"] == len(prompt_ids)
    assert tok.decode(trained_spans(ex)[0]) == "I am fine.<|eos|>"


@pytest.mark.parametrize("fixture", ["tok", "bos_tok"])
def test_multi_turn_mask_covers_exactly_each_assistant_turn_and_eos(fixture, request):
    tokenizer = request.getfixturevalue(fixture)
    ex = encode_example(tokenizer, {"messages": CONVERSATION})
    spans = trained_spans(ex)
    assistant = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert [tokenizer.decode(s) for s in spans] == [c + "<|eos|>" for c in assistant]
    # token by token: each span is the content tokenized alone + EOS, right after that turn's context
    previous_end = 0
    for i, span in zip([2, 4], spans, strict=True):
        context = encode_prompt(tokenizer, CONVERSATION[:i])
        assert ex["input_ids"][: len(context)] == context  # the history is a strict prefix
        assert all(label == IGNORE_INDEX for label in ex["labels"][previous_end: len(context)])
        previous_end = len(context) + len(span)
        assert span == encode_text(tokenizer, CONVERSATION[i]["content"]) + [tokenizer.eos_token_id]
        assert ex["input_ids"][len(context): len(context) + len(span)] == span
    n_trained = sum(label != IGNORE_INDEX for label in ex["labels"])
    assert n_trained == sum(len(s) for s in spans)
    assert ex["input_ids"].count(tokenizer.bos_token_id) == 1 and ex["input_ids"][0] == tokenizer.bos_token_id


def test_segments_concatenate_to_the_full_rendering(tok):
    segments = conversation_segments(tok, CONVERSATION)
    assert "".join(text for text, _ in segments) == tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert [trained for _, trained in segments] == [False, True, False, True]


@pytest.mark.parametrize("prompt,completion", [("The quick", " brown fox"), ("won", "derful story")])
def test_string_prompt_is_strict_prefix_and_one_bos(tok, prompt, completion):
    ex = encode_example(tok, {"prompt": prompt, "completion": completion})
    prompt_ids = encode_prompt(tok, prompt)
    assert ex["input_ids"][: len(prompt_ids)] == prompt_ids and len(prompt_ids) < len(ex["input_ids"])
    assert ex["prompt_length"] == len(prompt_ids)
    assert ex["input_ids"].count(tok.bos_token_id) == 1 and ex["input_ids"][0] == tok.bos_token_id
    response = ex["input_ids"][len(prompt_ids):]
    assert response == encode_text(tok, completion) + [tok.eos_token_id]
    assert ex["labels"] == [IGNORE_INDEX] * len(prompt_ids) + response


def test_string_concatenation_would_have_merged_the_boundary(tok):
    """The case above is not vacuous: tokenizing the joined text changes the tokens at the boundary."""
    joined = tok("wonderful story", add_special_tokens=True)["input_ids"]
    assert joined[: len(encode_prompt(tok, "won"))] != encode_prompt(tok, "won")


def test_pad_equal_to_eos_still_trains_eos():
    tokenizer = build_tiny_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    examples = [encode_example(tokenizer, {"prompt": "The plot", "completion": c})
                for c in [" was fine.", " was fine but the ending felt rushed."]]
    batch = collate_padded(examples, tokenizer.pad_token_id)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        assert batch["labels"][i, n - 1] == tokenizer.eos_token_id  # the EOS is trained
        assert batch["attention_mask"][i, :n].all() and not batch["attention_mask"][i, n:].any()
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()  # the padding (same id) is not
    assert batch["n_terms"] == sum(sum(label != IGNORE_INDEX for label in ex["labels"]) for ex in examples)


def test_train_on_prompt_trains_every_token_but_the_first(tok):
    ex = encode_example(tok, {"messages": CONVERSATION}, train_on_prompt=True)
    assert ex["labels"][0] == IGNORE_INDEX and ex["labels"][1:] == ex["input_ids"][1:]


def test_truncation_left_cuts_the_prompt_keeps_bos_and_response(tok):
    record = {"prompt": "The plot was fine but the ending felt rushed and", "completion": " I hated it."}
    full = encode_example(tok, record)
    response = full["input_ids"][full["prompt_length"]:]
    out = tokenize_sft([record, record], tok, max_length=len(response) + 4)
    assert out.truncated == 2 and out.dropped == 0
    ex = out.examples[0]
    assert len(ex["input_ids"]) == len(response) + 4
    assert ex["input_ids"][0] == tok.bos_token_id and ex["input_ids"][-len(response):] == response
    assert ex["input_ids"][1:4] == full["input_ids"][full["prompt_length"] - 3: full["prompt_length"]]
    assert ex["labels"][-len(response):] == response and ex["prompt_length"] == 4


def test_truncation_drop_counts_and_short_examples_pass(tok):
    long = {"prompt": "The plot was fine but the ending felt rushed.", "completion": " Yes."}
    short = {"prompt": "Hi", "completion": " there."}
    out = tokenize_sft([long, short], tok, max_length=12, truncation="drop")
    assert out.dropped == 1 and out.truncated == 0 and len(out.examples) == 1
    assert out.examples[0] == encode_example(tok, short)


def test_fully_truncated_response_names_row_or_is_skipped(tok):
    records = [{"prompt": "Hi", "completion": " there."}] * 3
    with pytest.raises(AlignkitError, match=r"train.jsonl, row 7, field 'completion': the response is fully"):
        tokenize_sft(records, tok, max_length=1, source="train.jsonl", rows=[7, 8, 9])
    out = tokenize_sft(records, tok, max_length=1, rows=[7, 8, 9], on_bad_rows="skip")
    assert [row for row, _, _ in out.skipped] == [7, 8, 9] and not out.examples


def test_bad_template_increment_is_an_error(tok):
    tokenizer = build_tiny_tokenizer()
    # a template that renders the last message differently from earlier ones: renderings do not extend
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] if loop.last else m['role'] }}{% endfor %}"
    with pytest.raises(AlignkitError, match="prefix"):
        encode_example(tokenizer, {"messages": CONVERSATION[1:3]})



class _CountingTokenizer:
    """The tiny tokenizer, counting its calls."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.bos_token_id, self.eos_token_id = inner.bos_token_id, inner.eos_token_id

    def __call__(self, text, add_special_tokens=True):
        self.calls += 1
        return self.inner(text, add_special_tokens=add_special_tokens)


def test_a_given_prefix_saves_the_tokenizer_calls_and_changes_nothing():
    from alignkit.data.tokenize import encode_example, special_prefix

    tok = _CountingTokenizer(build_tiny_tokenizer())
    record = {"prompt": "I loved", "completion": " it"}
    plain = encode_example(tok, record)
    calls = tok.calls
    prefix = special_prefix(tok)
    assert prefix == [tok.bos_token_id] and tok.calls == calls + 2  # two encodes of "a"
    tok.calls = 0
    assert encode_example(tok, record, prefix=prefix) == plain
    assert tok.calls == calls - 2  # only the prompt and the completion


# Like Qwen3's template: an assistant turn before the last user turn loses its <think>...</think> block.
THINK_DROPPING_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}{%- set content = m['content'] -%}"
    "{%- if m['role'] == 'assistant' and loop.index0 < ns.last_user and '</think>' in content -%}"
    "{%- set content = content.split('</think>')[-1] -%}{%- endif -%}"
    "{{ '<' + m['role'] + '>\n' + content + eos_token + '\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<assistant>\n' }}{%- endif -%}"
)
THINKING = [
    {"role": "user", "content": "how are you?"},
    {"role": "assistant", "content": "<think>hmm</think>I am fine."},
    {"role": "user", "content": "The movie?"},
    {"role": "assistant", "content": "<think>recall</think>It was wonderful!"},
]


@pytest.fixture(scope="module")
def think_tok():
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = THINK_DROPPING_TEMPLATE
    return tokenizer


def test_template_dropping_think_from_history_trains_one_row_per_assistant_turn(think_tok):
    with pytest.raises(AlignkitError, match="prefix"):  # no single rendering extends turn by turn
        conversation_segments(think_tok, THINKING)
    out = tokenize_sft([{"messages": THINKING}], think_tok, max_length=512)
    assert len(out.examples) == 2 and not out.skipped
    for i, ex in zip([1, 3], out.examples, strict=True):
        context = encode_prompt(think_tok, THINKING[:i])  # the context as the template renders it before turn i
        assert ex["input_ids"][: len(context)] == context and ex["prompt_length"] == len(context)
        assert all(label == IGNORE_INDEX for label in ex["labels"][: len(context)])  # earlier turns not trained
        assert [think_tok.decode(s) for s in trained_spans(ex)] == [THINKING[i]["content"] + "<|eos|>"]
        assert ex["input_ids"].count(think_tok.bos_token_id) == 1 and ex["input_ids"][0] == think_tok.bos_token_id
    history = think_tok.decode(out.examples[1]["input_ids"][: out.examples[1]["prompt_length"]])
    assert "I am fine." in history and "hmm" not in history  # the history without its <think> block
    assert encode_example(think_tok, {"messages": THINKING}) == out.examples[1]  # the final response's row


def test_think_dropping_template_keeps_preference_prompts_strict_prefixes(think_tok):
    from alignkit.data.preference_groups import encode_group

    responses = [[{"role": "assistant", "content": c}] for c in ("<think>a</think>Great.", "Bad.")]
    examples, prompt_length = encode_group(think_tok, THINKING[:3], responses)
    assert prompt_length == len(encode_prompt(think_tok, THINKING[:3]))
    assert [think_tok.decode(s) for s in trained_spans(examples[0])] == ["<think>a</think>Great.<|eos|>"]
