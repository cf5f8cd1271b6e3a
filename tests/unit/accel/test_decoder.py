"""`FastDecoder`, the CPU backend's lean Llama-family forward: same tokens and log-probs as Hugging Face's."""

from __future__ import annotations

import pytest
import torch
from tests.unit.accel.conftest import causal_lm

import alignkit.accel.cpu.decode_layers as decode_layers
from alignkit.accel.cpu import CpuBackend
from alignkit.accel.cpu.decoder import FastDecoder
from alignkit.accel.cpu.onednn import onednn_available
from alignkit.accel.plain import PlainBackend
from alignkit.rollout.generate import sample
from alignkit.rollout.logprobs import sequence_logprobs

PACKINGS = pytest.mark.parametrize("packed", [True, False], ids=["onednn-reordered", "transposed"])


def _tiny(kind: str, vocab: int) -> torch.nn.Module:
    if kind == "llama-rope-scaled":
        return causal_lm("llama", vocab, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    if kind == "llama-rope-dynamic":  # frequencies depend on the positions of each call: no cos/sin table
        return causal_lm("llama", vocab, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                          "rope_theta": 10000.0})
    return causal_lm(kind, vocab)


def _skip_without_onednn(packed: bool) -> None:
    if packed and not onednn_available(torch.float32):
        pytest.skip("this torch build has no oneDNN")


def _sample(model, tokenizer, prompts, *, backend, **kwargs):
    kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    return sample(model, *prompts, max_new_tokens=16, pad_token_id=tokenizer.pad_token_id,
                  generator=torch.Generator().manual_seed(7), backend=backend, **kwargs)


@PACKINGS
@pytest.mark.parametrize("kind", ["llama", "llama-rope-scaled", "llama-rope-dynamic", "qwen2", "mistral"])
def test_fast_decoder_matches_hugging_face_forward(kind, packed, tokenizer, prompts):
    _skip_without_onednn(packed)
    model = _tiny(kind, len(tokenizer))
    decoder = FastDecoder.build(model, 4, 32, reorder=packed)
    assert decoder is not None and decoder.reordered == packed
    assert (decoder.rotary_table is None) == (kind == "llama-rope-dynamic")
    fast = _sample(model, tokenizer, prompts, backend=CpuBackend(onednn=packed), temperature=0.8)
    slow = _sample(model, tokenizer, prompts, backend=PlainBackend(), temperature=0.8)
    assert torch.equal(fast.response_ids, slow.response_ids)
    assert torch.equal(fast.response_mask, slow.response_mask)
    torch.testing.assert_close(fast.logprobs, slow.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.entropy, slow.entropy, atol=1e-5, rtol=0)
    # ... and both equal the training forward pass
    recomputed = sequence_logprobs(model, fast, temperature=0.8, backend=PlainBackend())
    assert (recomputed - fast.logprobs).abs().max() < 1e-5


def test_fast_decoder_refuses_what_it_does_not_implement(tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    assert FastDecoder.build(causal_lm("gpt2", len(tokenizer)), 2, 16) is None
    assert FastDecoder.build(causal_lm("qwen3", len(tokenizer)), 2, 16) is None  # q/k norms
    windowed = MistralForCausalLM(MistralConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                num_key_value_heads=4, intermediate_size=64,
                                                vocab_size=len(tokenizer), sliding_window=8))
    assert FastDecoder.build(windowed, 2, 16) is None  # the window would cut the context
    assert FastDecoder.build(windowed, 2, 8) is not None
    gelu = causal_lm("llama", len(tokenizer), hidden_act="gelu")
    assert FastDecoder.build(gelu, 2, 16) is None

    class Adapted(torch.nn.Linear):  # e.g. an adapter or quantised layer swapped in place
        pass

    swapped = causal_lm("llama", len(tokenizer))
    old = swapped.model.layers[1].mlp.down_proj
    swapped.model.layers[1].mlp.down_proj = Adapted(old.in_features, old.out_features, bias=False)
    assert FastDecoder.build(swapped, 2, 16) is None


def test_entropy_is_finite_when_some_logits_are_minus_infinity(tokenizer, prompts):
    model = causal_lm("llama", len(tokenizer))
    with torch.no_grad():
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(len(tokenizer)))
        model.lm_head.bias[5:9] = float("-inf")  # tokens the model can never produce
    for backend in (CpuBackend(), PlainBackend()):
        rollout = _sample(model, tokenizer, prompts, backend=backend)
        assert torch.isfinite(rollout.entropy).all() and (rollout.entropy[rollout.response_mask] > 0).all()


def test_sampler_entropy_equals_training_forward_entropy(tokenizer, prompts):
    model = causal_lm("llama", len(tokenizer))
    for backend in (CpuBackend(), PlainBackend()):
        rollout = _sample(model, tokenizer, prompts, backend=backend, temperature=0.7,
                          top_k=5)  # filtered sampling: the recorded entropy is still the policy's own
        _, entropy = sequence_logprobs(model, rollout, temperature=0.7, with_entropy=True, backend=PlainBackend())
        assert (entropy - rollout.entropy).abs().max() < 1e-5
        assert (rollout.entropy[~rollout.response_mask] == 0).all()


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("repeats", [1, 3], ids=["distinct", "repeated"])
def test_rows_ending_early_sample_as_hugging_face_does(padded, repeats, tokenizer, prompts):
    """Padded or unpadded prompts, each once or k times (their prefill shared), rows that end early
    (the decoder masks only the prompts' padding; a row's later columns are its own): the same tokens,
    log-probs and entropies as Hugging Face's masked decode, sampling at temperature 1."""
    model = causal_lm("llama", len(tokenizer))
    ids, mask = prompts
    if not padded:
        ids = ids[:, -1:].repeat(1, 3)  # 4 unpadded prompts of 3 tokens
        mask = torch.ones_like(ids, dtype=torch.bool)
    ids, mask = ids.repeat_interleave(repeats, 0), mask.repeat_interleave(repeats, 0)
    eos = list(range(3, len(tokenizer), 8))  # an eighth of the vocabulary ends a row: rows end early
    fast = _sample(model, tokenizer, (ids, mask), backend=CpuBackend(), eos_token_id=eos)
    slow = _sample(model, tokenizer, (ids, mask), backend=PlainBackend(), eos_token_id=eos)
    assert fast.lengths.min() < fast.lengths.max()  # steps ran after a row had ended
    assert torch.equal(fast.response_ids, slow.response_ids)
    assert torch.equal(fast.response_mask, slow.response_mask)
    torch.testing.assert_close(fast.logprobs, slow.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.entropy, slow.entropy, atol=1e-5, rtol=0)
    assert (sequence_logprobs(model, fast, backend=PlainBackend()) - fast.logprobs).abs().max() < 1e-5


def test_unmasked_step_equals_the_all_true_mask(tokenizer, prompts):
    model = causal_lm("llama", len(tokenizer))
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


def _decode_logits(model, ids, steps: int, *, reorder: bool = True, script: bool = True) -> torch.Tensor:
    """Prefill `ids` (B×P, unpadded) then `steps` greedy decode steps; the logits of every call, stacked."""
    batch, width_p = ids.shape
    positions = torch.arange(width_p).expand(batch, width_p)
    with torch.inference_mode():
        decoder = FastDecoder.build(model, batch, width_p + steps, reorder=reorder, script=script)
        out = [decoder.prefill(ids, positions, torch.ones_like(ids, dtype=torch.bool))]
        for step in range(steps):
            out.append(decoder.step(out[-1].argmax(-1), torch.full((batch,), width_p + step), None, width_p + step))
    return torch.stack(out)


@PACKINGS
@pytest.mark.parametrize("kind", ["llama", "llama-rope-dynamic", "llama-bf16"])
def test_torchscript_decode_is_bit_identical_to_python(kind, packed, tokenizer, prompts):
    """`decoder_layers` through TorchScript's interpreter runs the very ops of the Python function:
    logits of prefill and steps, and sampled rollouts from padded, repeated prompts (prefill of the
    distinct rows, the padding bias in every step) with rows ending early."""
    _skip_without_onednn(packed)
    if decode_layers.scripted_layers() is None:
        pytest.skip("TorchScript cannot compile the decoder with this torch")
    model = _tiny(kind.removesuffix("-bf16"), len(tokenizer))
    if kind.endswith("bf16"):
        model = model.to(torch.bfloat16)
    ids, mask = prompts
    repeated = (ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0))
    assert not repeated[1].all()  # padded
    eos = list(range(3, len(tokenizer), 8))  # rows end early

    def run(script: bool):
        logits = _decode_logits(model, ids[:, -1:].repeat(1, 3), 5, reorder=packed, script=script)
        rollout = _sample(model, tokenizer, repeated, backend=CpuBackend(torchscript=script, onednn=packed),
                          eos_token_id=eos)
        return logits, rollout

    scripted, scripted_rollout = run(True)
    python, python_rollout = run(False)
    assert torch.equal(python, scripted)
    assert scripted_rollout.lengths.min() < scripted_rollout.lengths.max()
    for name in ("response_ids", "response_mask", "logprobs", "entropy"):
        assert torch.equal(getattr(python_rollout, name), getattr(scripted_rollout, name)), name


def test_a_torch_that_cannot_script_decodes_as_python(tokenizer, prompts, monkeypatch):
    model = causal_lm("llama", len(tokenizer))
    ids = prompts[0][:, -1:].repeat(1, 3)
    expected = _decode_logits(model, ids, 3, script=False)
    monkeypatch.setattr(decode_layers, "_COMPILED", {})  # not compiled yet in this process ...

    def refuse(fn):
        raise RuntimeError("TorchScript was removed")

    monkeypatch.setattr(torch.jit, "script", refuse)  # ... and the compiler refuses
    assert decode_layers.scripted_layers() is None
    assert torch.equal(_decode_logits(model, ids, 3, script=True), expected)
