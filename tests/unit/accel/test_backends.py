"""The `cpu` backend gives the `plain` backend's results to float rounding, on every architecture.

One tiny random model per architecture: Llama, Mistral, Qwen2 (all of the CPU machinery: lean
decoder, packed prompt rows, one-token reward read), Qwen3 (packed rows only) and GPT-2 (none: the
fallback to `plain`). Each check runs the same inputs through `PlainBackend()` and `CpuBackend()`
and compares the outputs with torch.testing.assert_close's default float32 tolerances (rtol 1.3e-6,
atol 1e-5), gradients with respect to every parameter included. Packing is forced where a model
takes it (`SHARING_MARGIN` = inf: these rows are too short for the FLOP estimate to pick it), so the
packed forward is what is compared.
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from tests.conftest import TINY_PROMPTS
from tests.unit.accel.conftest import DECODED, KINDS, LAST_TOKEN, PACKED, causal_lm, classifier
from torch.testing import assert_close

from alignkit.accel import resolve
from alignkit.accel.cpu import CpuBackend, shared_prompts
from alignkit.accel.cpu.decoder import FastDecoder
from alignkit.accel.cpu.last_token import supports_last_token
from alignkit.accel.plain import PlainBackend
from alignkit.data.preference_groups import collate_preference_groups, tokenize_preference_groups
from alignkit.data.reward_groups import collate_reward_groups, tokenize_reward_groups
from alignkit.errors import AlignkitError
from alignkit.ops.masking import mask_positions
from alignkit.rollout.generate import sample, tokenize_prompts
from alignkit.rollout.logprobs import sequence_logprobs
from alignkit.trainers.dpo_forward import response_logps

PLAIN, CPU = PlainBackend(), CpuBackend()
EOS = list(range(2, 300, 9))  # a ninth of the vocabulary ends a response: some rows end early

PAIRS = [
    {"prompt": "The quick brown", "chosen": " fox jumps over the lazy dog.", "rejected": " dog."},
    {"prompt": "I loved this movie,", "chosen": " it was wonderful!", "rejected": " I hated every minute of it."},
]
RANKINGS = [  # the second group is shorter: its third slot is a masked filler
    {"prompt": "Once upon", "responses": [" a time there was a fox.", " a hill.", " nothing"]},
    {"prompt": "The", "responses": [" end.", " start of it all"]},
]


def _grads(model: torch.nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    """d loss / d parameter, zeros for a parameter the loss does not reach."""
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def _assert_grads_close(actual: list[torch.Tensor], expected: list[torch.Tensor], model: torch.nn.Module) -> None:
    for (name, _), a, e in zip(model.named_parameters(), actual, expected, strict=True):
        assert_close(a, e, msg=lambda m, name=name: f"{name}: {m}")


def _weights(values: torch.Tensor) -> torch.Tensor:
    """Distinct weights per element, so that a gradient mixing up rows would show."""
    return torch.arange(1.0, values.numel() + 1).view_as(values) / values.numel()


def _repeated(prompts: tuple[torch.Tensor, torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = prompts
    return ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)


# -- resolve -------------------------------------------------------------------------------------------


def test_resolve_picks_by_device_and_the_environment_overrides(monkeypatch):
    monkeypatch.delenv("ALIGNKIT_ACCEL", raising=False)
    assert isinstance(resolve("auto", "cpu"), CpuBackend)
    assert isinstance(resolve("auto", "cuda"), PlainBackend)
    assert isinstance(resolve("cpu", "cuda"), CpuBackend) and isinstance(resolve("plain", "cpu"), PlainBackend)
    with pytest.raises(AlignkitError, match=r"run\.accel.*bogus"):
        resolve("bogus")
    monkeypatch.setenv("ALIGNKIT_ACCEL", "plain")
    assert isinstance(resolve("cpu", "cpu"), PlainBackend) and isinstance(resolve("auto", "cpu"), PlainBackend)
    monkeypatch.setenv("ALIGNKIT_ACCEL", "cpu")
    assert isinstance(resolve("plain", "cuda"), CpuBackend)
    monkeypatch.setenv("ALIGNKIT_ACCEL", "bogus")
    with pytest.raises(AlignkitError, match=r"run\.accel"):
        resolve("auto")


def test_cpu_switches_are_read_from_the_environment(monkeypatch):
    for name in ("ALIGNKIT_TORCHSCRIPT", "ALIGNKIT_ONEDNN", "ALIGNKIT_MALLOC_KEEP"):
        monkeypatch.delenv(name, raising=False)
    assert CpuBackend.from_environment() == CpuBackend(torchscript=True, onednn=True, malloc_keep=True)
    monkeypatch.setenv("ALIGNKIT_TORCHSCRIPT", "0")
    monkeypatch.setenv("ALIGNKIT_MALLOC_KEEP", "0")
    backend = CpuBackend.from_environment()
    assert backend == CpuBackend(torchscript=False, onednn=True, malloc_keep=False)
    assert "off: TorchScript decode, glibc keeps freed memory" in backend.describe()


# -- sampling ------------------------------------------------------------------------------------------


def _decode(backend, model, ids: torch.Tensor, mask: torch.Tensor, steps: int,
            tokens: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Prefill then `steps` steps as `sample` drives a backend's decoder: the logits of every call
    (B×(steps+1)×V) and the tokens fed (greedy unless `tokens` are given)."""
    (batch, width_p), width = ids.shape, ids.shape[1] + steps
    key_mask = torch.zeros(batch, width, dtype=torch.bool)
    key_mask[:, :width_p] = mask
    positions = mask_positions(mask)
    with torch.inference_mode():
        prefill, step = backend.decoder(model, ids, mask, key_mask, width)
        out, fed, next_pos = [prefill(positions)], [], positions[:, -1] + 1
        for t in range(steps):
            token = out[-1].argmax(-1) if tokens is None else tokens[t]
            fed.append(token)
            key_mask[:, width_p + t] = True
            out.append(step(token, next_pos, width_p + t))
            next_pos = next_pos + 1
    return torch.stack(out, dim=1), fed


@pytest.mark.parametrize("repeats", [1, 3], ids=["distinct", "repeated"])
@pytest.mark.parametrize("kind", KINDS)
def test_decoder_logits(kind, repeats, tokenizer, prompts):
    model = causal_lm(kind, len(tokenizer))
    ids, mask = _repeated(prompts, repeats)
    assert not mask.all()  # padded prompts
    with torch.inference_mode():
        assert (FastDecoder.build(model, ids.shape[0], ids.shape[1] + 6) is not None) == (kind in DECODED)
    expected, tokens = _decode(PLAIN, model, ids, mask, 6)
    actual, _ = _decode(CPU, model, ids, mask, 6, tokens)  # the same tokens fed to both
    assert_close(actual, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_samples(kind, tokenizer, prompts):
    """top_k=1 from padded prompts, each repeated (k samples per prompt), rows ending early."""
    model = causal_lm(kind, len(tokenizer))
    ids, mask = _repeated(prompts, 2)
    greedy = partial(sample, model, ids, mask, max_new_tokens=10, top_k=1, pad_token_id=0)
    first = greedy(eos_token_id=tokenizer.eos_token_id, backend=PLAIN)
    eos = [tokenizer.eos_token_id, int(first.response_ids[0, 3])]  # row 0 (and its repeat) ends at step 3
    plain, cpu = (greedy(eos_token_id=eos, backend=backend) for backend in (PLAIN, CPU))
    assert plain.lengths.min() < plain.lengths.max()  # some rows ended early
    for name in ("response_ids", "response_mask", "ends_with_eos", "lengths"):
        assert torch.equal(getattr(cpu, name), getattr(plain, name)), name
    assert_close(cpu.logprobs, plain.logprobs)
    assert_close(cpu.entropy, plain.entropy)


# -- training forward passes ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_sequence_logprobs_of_repeated_prompts(kind, tokenizer, shared_rows):
    """k = 3 samples of each of 3 padded prompts, shuffled rows, responses ending early: the CPU backend
    runs each prompt once (packed rows) and gives the plain pass's log-probs, entropies and gradients."""
    model = causal_lm(kind, len(tokenizer))
    ids, mask = tokenize_prompts(tokenizer, TINY_PROMPTS[:3])
    order = [0, 1, 2, 2, 0, 1, 1, 2, 0]
    rollout = sample(model, ids[order], mask[order], max_new_tokens=8, temperature=0.9, eos_token_id=EOS,
                     pad_token_id=0, generator=torch.Generator().manual_seed(0), backend=PLAIN)
    assert not rollout.response_mask.all()
    logits, _, _ = CPU.rollout_logits(model, rollout)
    assert logits.shape[0] == (3 if kind in PACKED else len(order))  # one row per distinct prompt
    results = []
    for backend in (PLAIN, CPU):
        logprobs, entropy = sequence_logprobs(model, rollout, temperature=0.9, with_entropy=True, backend=backend)
        loss = (logprobs * _weights(logprobs)).sum() + entropy.sum()
        results.append((logprobs.detach(), entropy.detach(), _grads(model, loss)))
    (lp_plain, en_plain, g_plain), (lp_cpu, en_cpu, g_cpu) = results
    assert_close(lp_cpu, lp_plain)
    assert_close(en_cpu, en_plain)
    assert_close(lp_plain, rollout.logprobs)  # and the sampler's own record
    _assert_grads_close(g_cpu, g_plain, model)


@pytest.mark.parametrize("data", ["pairs", "rankings"])
@pytest.mark.parametrize("kind", KINDS)
def test_dpo_response_logps(kind, data, tokenizer, shared_rows):
    model = causal_lm(kind, len(tokenizer))
    records, record_kind, loss = ((PAIRS, "preference", "sigmoid") if data == "pairs"
                                  else (RANKINGS, "ranking", "plackett_luce"))
    groups = tokenize_preference_groups(records, record_kind, loss, tokenizer, max_length=64).groups
    batch = collate_preference_groups(groups, tokenizer.pad_token_id)
    assert shared_prompts.accepts_4d_masks(model.config) == (kind in PACKED)  # packed rows where the model takes them
    results = []
    for backend in (PLAIN, CPU):
        logps, n_tokens = response_logps(model, batch, backend)
        results.append((logps.detach(), n_tokens, _grads(model, (logps * _weights(logps)).sum())))
    (lp_plain, n_plain, g_plain), (lp_cpu, n_cpu, g_cpu) = results
    assert lp_plain.shape == batch["group_mask"].shape
    assert_close(lp_cpu, lp_plain)
    assert torch.equal(n_cpu, n_plain)
    _assert_grads_close(g_cpu, g_plain, model)


@pytest.mark.parametrize("kind", KINDS)
def test_reward_group_scores(kind, tokenizer, shared_rows):
    """Groups of responses to one prompt (a pair, three ranked, a single one), scored as groups and
    without groups: the CPU backend's packed rows and one-token read give the plain forward's rewards."""
    model = classifier(kind, len(tokenizer))
    assert supports_last_token(model) == (kind in LAST_TOKEN)
    groups = [{"prompt": "I loved this", "responses": [" movie, it was great!", " film."]},
              {"prompt": "The plot was", "responses": [" fine.", " fine but the ending felt rushed.", " bad"]},
              {"prompt": "What", "responses": [" a beautiful story."]}]
    batch = collate_reward_groups(tokenize_reward_groups(groups, tokenizer, max_length=64), tokenizer.pad_token_id)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for group_index in (batch["group_index"], None):
        results = []
        for backend in (PLAIN, CPU):
            scores = backend.group_scores(model, ids, mask, group_index)
            results.append((scores.detach(), _grads(model, (scores * _weights(scores)).sum())))
        (s_plain, g_plain), (s_cpu, g_cpu) = results
        assert s_plain.shape == (ids.shape[0],) and s_plain.std() > 0.1
        assert_close(s_cpu, s_plain)
        _assert_grads_close(g_cpu, g_plain, model)


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_models_give_the_same_outputs(kind, tokenizer, prompts):
    """`freeze` (the CPU backend: oneDNN-packed linear layers): the same logits and scores, no gradients."""
    ids, mask = prompts
    for build in (causal_lm, classifier):
        base = build(kind, len(tokenizer)).train()
        frozen = [backend.freeze(copy.deepcopy(base)) for backend in (PLAIN, CPU)]
        outputs = []
        for model in frozen:
            assert not model.training and not any(p.requires_grad for p in model.parameters())
            with torch.no_grad():
                first = model(input_ids=ids, attention_mask=mask.long(), position_ids=mask_positions(mask)).logits
            with torch.inference_mode():
                second = model(input_ids=ids, attention_mask=mask.long(), position_ids=mask_positions(mask)).logits
            outputs.append((first, second))
        (plain, plain_again), (cpu, cpu_again) = outputs
        assert_close(cpu, plain)
        assert_close(cpu_again, plain_again)
