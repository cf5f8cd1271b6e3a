"""`FastDecoder`, the sampler's lean Llama-family forward: same tokens and log-probs as Hugging Face's."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import build_tiny_llama

import alignkit.rollout.decode_layers as decode_layers
import alignkit.rollout.fast_decoder as fast_decoder
import alignkit.rollout.generate as generate
from alignkit.rollout.fast_decoder import FastDecoder
from alignkit.rollout.generate import sample
from alignkit.rollout.logprobs import sequence_logprobs


def _tiny(kind: str, vocab: int) -> torch.nn.Module:
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, vocab_size=vocab, max_position_embeddings=256, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    if kind == "llama":  # grouped-query attention, attention and MLP biases
        return build_tiny_llama(vocab, num_key_value_heads=2, attention_bias=True, mlp_bias=True).eval()
    if kind == "llama-rope-scaled":
        return build_tiny_llama(vocab, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                        "rope_theta": 10000.0}).eval()
    if kind == "llama-rope-dynamic":  # frequencies depend on the positions of each call: no cos/sin table
        return build_tiny_llama(vocab, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                        "rope_theta": 10000.0}).eval()
    if kind == "qwen2":  # q/k/v biases only
        from transformers import Qwen2Config, Qwen2ForCausalLM

        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    if kind == "mistral":
        from transformers import MistralConfig, MistralForCausalLM

        return MistralForCausalLM(MistralConfig(**common, sliding_window=None)).eval()
    raise ValueError(kind)


def _sample(model, tokenizer, prompts, *, fast: bool, monkeypatch, **kwargs):
    monkeypatch.setattr(generate, "USE_FAST_DECODER", fast)
    kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    return sample(model, *prompts, max_new_tokens=16, pad_token_id=tokenizer.pad_token_id,
                  generator=torch.Generator().manual_seed(7), **kwargs)


@pytest.mark.parametrize("packed", [True, False], ids=["onednn-packed", "transposed"])
@pytest.mark.parametrize("kind", ["llama", "llama-rope-scaled", "llama-rope-dynamic", "qwen2", "mistral"])
def test_fast_decoder_matches_hugging_face_forward(kind, packed, tokenizer, prompts, monkeypatch):
    if packed and not fast_decoder.onednn_available(torch.float32):
        pytest.skip("this torch build has no oneDNN")
    monkeypatch.setattr(fast_decoder, "onednn_available", lambda dtype: packed)
    model = _tiny(kind, len(tokenizer))
    decoder = FastDecoder.build(model, 4, 32)
    assert decoder is not None and decoder.packed == packed
    assert (decoder.rotary_table is None) == (kind == "llama-rope-dynamic")
    fast = _sample(model, tokenizer, prompts, fast=True, monkeypatch=monkeypatch, temperature=0.8)
    slow = _sample(model, tokenizer, prompts, fast=False, monkeypatch=monkeypatch, temperature=0.8)
    assert torch.equal(fast.response_ids, slow.response_ids)
    assert torch.equal(fast.response_mask, slow.response_mask)
    torch.testing.assert_close(fast.logprobs, slow.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.entropy, slow.entropy, atol=1e-5, rtol=0)
    # ... and both equal the training forward pass
    recomputed = sequence_logprobs(model, fast, temperature=0.8)
    assert (recomputed - fast.logprobs).abs().max() < 1e-5


def test_fast_decoder_refuses_what_it_does_not_implement(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(tokenizer)))
    assert FastDecoder.build(gpt2, 2, 16) is None
    windowed = MistralForCausalLM(MistralConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                num_key_value_heads=4, intermediate_size=64,
                                                vocab_size=len(tokenizer), sliding_window=8))
    assert FastDecoder.build(windowed, 2, 16) is None  # the window would cut the context
    assert FastDecoder.build(windowed, 2, 8) is not None
    gelu = build_tiny_llama(len(tokenizer), hidden_act="gelu")
    assert FastDecoder.build(gelu, 2, 16) is None

    class Adapted(torch.nn.Linear):  # e.g. an adapter or quantised layer swapped in place
        pass

    swapped = build_tiny_llama(len(tokenizer))
    old = swapped.model.layers[1].mlp.down_proj
    swapped.model.layers[1].mlp.down_proj = Adapted(old.in_features, old.out_features, bias=False)
    assert FastDecoder.build(swapped, 2, 16) is None


def test_entropy_is_finite_when_some_logits_are_minus_infinity(tokenizer, prompts, monkeypatch):
    model = _tiny("llama", len(tokenizer))
    with torch.no_grad():
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(len(tokenizer)))
        model.lm_head.bias[5:9] = float("-inf")  # tokens the model can never produce
    for fast in (True, False):
        rollout = _sample(model, tokenizer, prompts, fast=fast, monkeypatch=monkeypatch)
        assert torch.isfinite(rollout.entropy).all() and (rollout.entropy[rollout.response_mask] > 0).all()


def test_unsupported_model_still_samples_through_hugging_face(tokenizer, prompts):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(tokenizer))).eval()
    rollout = sample(gpt2, *prompts, max_new_tokens=6, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(0))
    assert (sequence_logprobs(gpt2, rollout) - rollout.logprobs).abs().max() < 1e-5


def test_sampler_entropy_equals_training_forward_entropy(tokenizer, prompts, monkeypatch):
    model = _tiny("llama", len(tokenizer))
    for fast in (True, False):
        rollout = _sample(model, tokenizer, prompts, fast=fast, monkeypatch=monkeypatch, temperature=0.7,
                          top_k=5)  # filtered sampling: the recorded entropy is still the policy's own
        _, entropy = sequence_logprobs(model, rollout, temperature=0.7, with_entropy=True)
        assert (entropy - rollout.entropy).abs().max() < 1e-5
        assert (rollout.entropy[~rollout.response_mask] == 0).all()


def test_repeated_prompts_are_prefilled_once_and_match(tokenizer, prompts, monkeypatch):
    """k samples per prompt (rows repeated): one prefill per distinct prompt, same tokens and log-probs."""
    model = _tiny("llama", len(tokenizer))
    ids, mask = prompts
    repeated = (ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0))
    calls = []
    original = FastDecoder._forward
    monkeypatch.setattr(FastDecoder, "_forward", lambda self, x, *a, **k: calls.append(x.shape) or original(self, x, *a, **k))
    fast = _sample(model, tokenizer, repeated, fast=True, monkeypatch=monkeypatch)
    assert calls[0] == ids.shape  # the prefill ran on the 4 distinct prompts, not the 12 rows
    slow = _sample(model, tokenizer, repeated, fast=False, monkeypatch=monkeypatch)
    assert torch.equal(fast.response_ids, slow.response_ids)
    torch.testing.assert_close(fast.logprobs, slow.logprobs, atol=1e-5, rtol=0)
    assert (sequence_logprobs(model, fast) - fast.logprobs).abs().max() < 1e-5


def _spy_step_masks(monkeypatch) -> list:
    masks: list = []
    original = FastDecoder.step
    monkeypatch.setattr(FastDecoder, "step",
                        lambda self, tokens, pos, key_mask, column: masks.append(key_mask)
                        or original(self, tokens, pos, key_mask, column))
    return masks


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_decode_mask_is_the_prompt_padding_alone(padded, tokenizer, prompts, monkeypatch):
    """Rows that end early do not need their later columns masked: same tokens as Hugging Face's masked
    decode; the fast decoder's mask is None for unpadded prompts, else -inf exactly on the prompt pads."""
    model = _tiny("llama", len(tokenizer))
    ids, mask = prompts
    if not padded:
        ids = ids[:, -1:].repeat(1, 3)  # 4 unpadded prompts of 3 tokens
        mask = torch.ones_like(ids, dtype=torch.bool)
    eos = list(range(3, len(tokenizer), 8))  # an eighth of the vocabulary ends a row: rows end early
    masks = _spy_step_masks(monkeypatch)
    fast = _sample(model, tokenizer, (ids, mask), fast=True, monkeypatch=monkeypatch, eos_token_id=eos)
    slow = _sample(model, tokenizer, (ids, mask), fast=False, monkeypatch=monkeypatch, eos_token_id=eos)
    lengths = fast.lengths
    assert lengths.min() < lengths.max() and lengths.min() < len(masks)  # steps ran after a row had ended
    assert torch.equal(fast.response_ids, slow.response_ids)
    assert torch.equal(fast.response_mask, slow.response_mask)
    torch.testing.assert_close(fast.logprobs, slow.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.entropy, slow.entropy, atol=1e-5, rtol=0)
    if not padded:
        assert all(m is None for m in masks)
        return
    bias = masks[0]
    assert all(m is bias for m in masks)
    expected = torch.zeros(bias.shape)
    expected[:, : mask.shape[1]][~mask] = float("-inf")
    assert torch.equal(bias, expected)


def test_unmasked_step_equals_the_all_true_mask(tokenizer, prompts):
    model = _tiny("llama", len(tokenizer))
    ids = prompts[0][:, -1:].repeat(1, 3)
    positions = torch.arange(3).expand(4, 3)
    logits = []
    with torch.inference_mode():
        for key_mask in (None, torch.ones(4, 8, dtype=torch.bool), torch.zeros(4, 8)):
            decoder = FastDecoder.build(model, 4, 8)
            decoder.prefill(ids, positions, torch.ones_like(ids, dtype=torch.bool))
            logits.append(decoder.step(ids[:, 0], torch.full((4,), 3), key_mask, 3))
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits[2], logits[0], rtol=0, atol=1e-6)


def _decode_logits(model, ids, steps: int) -> torch.Tensor:
    """Prefill `ids` (B×P, unpadded) then `steps` greedy decode steps; the logits of every call, stacked."""
    batch, width_p = ids.shape
    positions = torch.arange(width_p).expand(batch, width_p)
    with torch.inference_mode():
        decoder = FastDecoder.build(model, batch, width_p + steps)
        out = [decoder.prefill(ids, positions, torch.ones_like(ids, dtype=torch.bool))]
        for step in range(steps):
            out.append(decoder.step(out[-1].argmax(-1), torch.full((batch,), width_p + step), None, width_p + step))
    return torch.stack(out)


@pytest.mark.parametrize("packed", [True, False], ids=["onednn-packed", "transposed"])
@pytest.mark.parametrize("kind", ["llama", "llama-rope-dynamic", "llama-bf16"])
def test_torchscript_decode_is_bit_identical_to_python(kind, packed, tokenizer, prompts, monkeypatch):
    """`decoder_layers` through TorchScript's interpreter runs the very ops of the Python function:
    logits of prefill and steps, and sampled rollouts from padded, repeated prompts (prefill of the
    distinct rows, the padding bias in every step) with rows ending early."""
    if packed and not fast_decoder.onednn_available(torch.float32):
        pytest.skip("this torch build has no oneDNN")
    monkeypatch.setattr(fast_decoder, "onednn_available", lambda dtype: packed)
    model = _tiny(kind.removesuffix("-bf16"), len(tokenizer))
    if kind.endswith("bf16"):
        model = model.to(torch.bfloat16)
    ids, mask = prompts
    repeated = (ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0))
    assert not repeated[1].all()  # padded
    eos = list(range(3, len(tokenizer), 8))  # rows end early

    def run():
        logits = _decode_logits(model, ids[:, -1:].repeat(1, 3), 5)
        rollout = _sample(model, tokenizer, repeated, fast=True, monkeypatch=monkeypatch, eos_token_id=eos)
        return logits, rollout

    monkeypatch.setattr(decode_layers, "_COMPILED", {})
    scripted, scripted_rollout = run()
    assert isinstance(decode_layers._COMPILED["fn"], torch.jit.ScriptFunction)
    monkeypatch.setattr(decode_layers, "_COMPILED", {"fn": decode_layers.decoder_layers})
    python, python_rollout = run()
    assert torch.equal(python, scripted)
    assert scripted_rollout.lengths.min() < scripted_rollout.lengths.max()
    for name in ("response_ids", "response_mask", "logprobs", "entropy"):
        assert torch.equal(getattr(python_rollout, name), getattr(scripted_rollout, name)), name


def test_torchscript_off_or_failing_falls_back_to_python(monkeypatch):
    monkeypatch.setattr(decode_layers, "_COMPILED", {})
    monkeypatch.setenv("ALIGNKIT_TORCHSCRIPT", "0")
    assert decode_layers.compiled_layers() is decode_layers.decoder_layers
    monkeypatch.setattr(decode_layers, "_COMPILED", {})
    monkeypatch.delenv("ALIGNKIT_TORCHSCRIPT")

    def refuse(fn):
        raise RuntimeError("TorchScript was removed")

    monkeypatch.setattr(torch.jit, "script", refuse)
    assert decode_layers.compiled_layers() is decode_layers.decoder_layers


def test_run_layers_leaves_the_jit_optimisation_flag_as_it_was(tokenizer, prompts, monkeypatch):
    monkeypatch.setattr(decode_layers, "_COMPILED", {})
    seen = []
    compiled = decode_layers.compiled_layers()
    monkeypatch.setattr(decode_layers, "_COMPILED",
                        {"fn": lambda *a: seen.append(torch._C._get_graph_executor_optimize()) or compiled(*a)})
    _decode_logits(_tiny("llama", len(tokenizer)), prompts[0][:, -1:], 2)
    assert seen == [False] * 3 and torch._C._get_graph_executor_optimize()
