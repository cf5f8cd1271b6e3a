"""DPO through the trainer's forward pass: one concatenated pass, policy == reference gives log 2."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.testing import assert_close

from alignkit.accel.cpu import CpuBackend, shared_prompts
from alignkit.accel.plain import PlainBackend
from alignkit.config import ModelConfig
from alignkit.data.preference_groups import (
    collate_preference_groups,
    encode_group,
    fit_group,
    mismatched_groups,
    tokenize_preference_groups,
)
from alignkit.errors import AlignkitError
from alignkit.losses.preference import dpo_loss, kto_loss
from alignkit.trainers.dpo import DPOConfig, collate_groups, make_loss_fn
from alignkit.trainers.dpo_forward import (
    Reference,
    kto_reference_point,
    response_logps,
    set_kto_reference_point,
)

BACKEND = CpuBackend()  # what a CPU run uses (the backends agree: tests/unit/accel/test_backends.py)

PAIRS = [
    {"prompt": "The quick brown", "chosen": " fox jumps over the lazy dog.", "rejected": " dog."},
    {"prompt": "I loved this movie,", "chosen": " it was wonderful!", "rejected": " I hated every minute of it."},
    {"prompt": "What a", "chosen": " beautiful, moving story about friendship.", "rejected": " film."},
]


@pytest.fixture(scope="module")
def tok_model(tiny_llama_dir):
    from alignkit.models.load import load_causal_lm, load_tokenizer

    cfg = ModelConfig(name_or_path=str(tiny_llama_dir))
    tokenizer = load_tokenizer(cfg)
    return tokenizer, load_causal_lm(cfg, tokenizer).eval()


def _groups(tokenizer, records=PAIRS, kind="preference", loss="sigmoid"):
    return tokenize_preference_groups(records, kind, loss, tokenizer, max_length=64).groups


def test_prompt_is_a_strict_prefix_of_every_response(tok_model):
    tokenizer, _ = tok_model
    for record in PAIRS:
        examples, plen = encode_group(tokenizer, record["prompt"], [record["chosen"], record["rejected"]])
        prompt_ids = examples[0]["input_ids"][:plen]
        assert examples[1]["input_ids"][:plen] == prompt_ids
        assert prompt_ids.count(tokenizer.bos_token_id) == 1


def test_concatenated_forward_equals_separate_forwards(tok_model):
    tokenizer, model = tok_model
    groups = _groups(tokenizer)
    with torch.no_grad():
        joint, n_tokens = response_logps(model, collate_preference_groups(groups, tokenizer.pad_token_id),
                                         BACKEND)  # B×K
        for b, group in enumerate(groups):
            for k, response in enumerate(group["responses"]):
                single = collate_preference_groups([{"responses": [response]}], 0)
                alone, n_alone = response_logps(model, single, BACKEND)
                assert_close(joint[b, k], alone[0, 0])
                assert n_tokens[b, k] == n_alone[0, 0]


def test_sequence_logprobs_equal_a_plain_loop_over_tokens(tok_model):
    tokenizer, model = tok_model
    groups = _groups(tokenizer)
    with torch.no_grad():
        joint, _ = response_logps(model, collate_preference_groups(groups, tokenizer.pad_token_id), BACKEND)
        for b, group in enumerate(groups):
            for k, response in enumerate(group["responses"]):
                ids = torch.tensor([response["input_ids"]])
                logp = model(input_ids=ids).logits[0].log_softmax(-1)
                expected = sum(logp[t - 1, tok] for t, tok in enumerate(response["labels"]) if tok != -100)
                assert_close(joint[b, k], expected)


@pytest.mark.parametrize("loss", ["sigmoid", "plackett_luce", "cdpo"])
def test_policy_equal_to_reference_gives_log_2(tok_model, loss):
    tokenizer, model = tok_model
    cfg = DPOConfig(loss=loss, beta=0.1, label_smoothing=0.1)
    batch = collate_preference_groups(_groups(tokenizer, loss=loss), tokenizer.pad_token_id)
    loss_sum, metrics = make_loss_fn(cfg, Reference(copy.deepcopy(model), model, BACKEND), BACKEND)(model, batch)
    assert_close(loss_sum / batch["n_terms"], torch.tensor(math.log(2.0)))
    assert_close(metrics["rewards/margins"], torch.tensor(0.0))


def test_forward_loss_is_dpo_on_the_sequence_logprobs(tok_model):
    tokenizer, model = tok_model
    torch.manual_seed(0)
    policy = copy.deepcopy(model)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = collate_preference_groups(_groups(tokenizer), tokenizer.pad_token_id)
    loss_sum, _ = make_loss_fn(DPOConfig(beta=0.5), Reference(model, policy, BACKEND), BACKEND)(policy, batch)
    with torch.no_grad():
        pol, ref = response_logps(policy, batch, BACKEND)[0], response_logps(model, batch, BACKEND)[0]
    expected, _ = dpo_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], beta=0.5)
    assert_close(loss_sum / 3, expected)
    loss_sum.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())


def test_lora_reference_is_the_base_with_adapters_disabled(tiny_llama_dir):
    from alignkit.models.load import load_causal_lm, load_tokenizer

    cfg = ModelConfig(name_or_path=str(tiny_llama_dir), lora_r=4)
    tokenizer = load_tokenizer(cfg)
    policy = load_causal_lm(cfg, tokenizer)
    base = load_causal_lm(ModelConfig(name_or_path=str(tiny_llama_dir)), tokenizer).eval()
    with torch.no_grad():  # make the adapters matter
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    batch = collate_preference_groups(_groups(tokenizer), tokenizer.pad_token_id)
    reference = Reference(None, policy, BACKEND)
    with torch.no_grad():
        assert_close(reference.logps(batch), response_logps(base, batch, BACKEND)[0])
        assert not torch.allclose(response_logps(policy, batch, BACKEND)[0], response_logps(base, batch, BACKEND)[0])
    assert policy.training  # the reference pass restores the policy's mode


def test_ranking_groups_of_different_sizes_are_masked(tok_model):
    tokenizer, model = tok_model
    records = [{"prompt": "What a", "responses": [" story.", " film.", " dog."]},
               {"prompt": "The quick", "responses": [" fox.", " dog."]}]
    groups = _groups(tokenizer, records, kind="ranking", loss="plackett_luce")
    batch = collate_preference_groups(groups, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 6 and batch["group_mask"].tolist() == [[True] * 3, [True, True, False]]
    reference = Reference(copy.deepcopy(model), model, BACKEND)
    loss_sum, _ = make_loss_fn(DPOConfig(loss="plackett_luce"), reference, BACKEND)(model, batch)
    # policy == reference: each list's loss is log K! (all orders equally likely): (log 6 + log 2) / 2
    assert_close(loss_sum / 2, torch.tensor((math.log(6) + math.log(2)) / 2))


def test_kto_from_preferences_and_unpaired_labels(tok_model):
    tokenizer, model = tok_model
    groups = _groups(tokenizer, loss="kto")
    assert [g["label"] for g in groups] == [True, False] * 3
    batch = collate_groups(groups, tokenizer.pad_token_id, "kto")
    assert batch["kto_labels"].tolist() == [True, False] * 3
    reference = Reference(copy.deepcopy(model), model, BACKEND)
    loss_sum, _ = make_loss_fn(DPOConfig(loss="kto"), reference, BACKEND)(model, batch)
    assert_close(loss_sum / 6, torch.tensor(0.5))  # r = z0 = 0: 1 - Sigmoid(0) for every example


def test_truncation_cuts_the_same_prompt_tokens_from_every_response(tok_model):
    tokenizer, _ = tok_model
    record = PAIRS[1]
    examples, plen = encode_group(tokenizer, record["prompt"], [record["chosen"], record["rejected"]])
    longest = max(len(e["input_ids"]) for e in examples)
    fitted, cut = fit_group(examples, plen, max_length=longest - 2, keep_prefix=1, policy="left")
    assert cut and all(len(e["input_ids"]) <= longest - 2 for e in fitted)
    assert fitted[0]["input_ids"][: plen - 2] == fitted[1]["input_ids"][: plen - 2]
    assert fitted[0]["input_ids"][0] == tokenizer.bos_token_id


def test_wrong_record_kind_for_the_loss_is_an_error(tok_model):
    tokenizer, _ = tok_model
    unpaired = [{"prompt": "Hi", "completion": " there", "label": True}]
    with pytest.raises(AlignkitError, match="loss 'sigmoid' trains on preference or ranking"):
        tokenize_preference_groups(unpaired, "unpaired", "sigmoid", tokenizer, max_length=32, source="d.jsonl")


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "cdpo", "simpo", "orpo", "kto", "plackett_luce"])
def test_every_loss_runs_through_the_forward_with_gradients(tok_model, loss):
    tokenizer, model = tok_model
    policy = copy.deepcopy(model).train()
    batch = collate_groups(_groups(tokenizer, loss=loss), tokenizer.pad_token_id, loss)
    reference = None if loss in ("simpo", "orpo") else Reference(model, policy, BACKEND)  # reference-free losses
    loss_sum, metrics = make_loss_fn(DPOConfig(loss=loss, label_smoothing=0.1), reference, BACKEND)(policy, batch)
    assert torch.isfinite(loss_sum) and {"rewards/chosen", "rewards/accuracy"} <= set(metrics)
    loss_sum.backward()
    assert all(torch.isfinite(p.grad).all() for p in policy.parameters() if p.grad is not None)


RANKINGS = [{"prompt": "Once upon", "responses": [" a time there was a fox.", " a hill.", " nothing"]},
            {"prompt": "The", "responses": [" end.", " start of it all"]}]  # a shorter group: an empty slot


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_forward_equals_full_forward_with_gradients(tiny_llama_dir, monkeypatch, attn):
    """One row per prompt (the CPU backend, packing forced): the plain pass's log-probs, token counts and
    gradients, for pairs and for rankings of different sizes."""
    from alignkit.models.load import load_causal_lm, load_tokenizer

    monkeypatch.setattr(shared_prompts, "SHARING_MARGIN", float("inf"))  # pack these tiny rows
    cfg = ModelConfig(name_or_path=str(tiny_llama_dir))
    tokenizer = load_tokenizer(cfg)
    model = load_causal_lm(cfg, tokenizer).eval()
    model.set_attn_implementation(attn)  # eager adds its mask to the scores: it gets the additive form
    assert model.config._attn_implementation == attn and shared_prompts.accepts_4d_masks(model.config)
    for groups in (_groups(tokenizer), _groups(tokenizer, RANKINGS, "ranking", "plackett_luce")):
        batch = collate_preference_groups(groups, tokenizer.pad_token_id)
        results = []
        for backend in (PlainBackend(), CpuBackend()):
            logps, n_tokens = response_logps(model, batch, backend)
            (logps * torch.arange(1.0, logps.numel() + 1).view_as(logps)).sum().backward()
            results.append((logps.detach(), n_tokens, [p.grad.clone() for p in model.parameters()]))
            model.zero_grad()
        (lp0, n0, g0), (lp1, n1, g1) = results
        assert_close(lp1, lp0, atol=1e-5, rtol=0)
        assert torch.equal(n1, n0)
        for a, b in zip(g1, g0, strict=True):
            assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_packed_rows_reach_a_lora_reference_and_not_a_model_that_cannot_take_them(tiny_llama_dir, monkeypatch):
    """A LoRA reference (adapters disabled) and a DDP-style wrapper get the packed rows' results; a model
    that reads 2D padding masks only (flash attention) gets the plain rows."""
    from alignkit.models.load import load_causal_lm, load_tokenizer

    monkeypatch.setattr(shared_prompts, "SHARING_MARGIN", float("inf"))
    cfg = ModelConfig(name_or_path=str(tiny_llama_dir), lora_r=4)
    tokenizer = load_tokenizer(cfg)
    policy = load_causal_lm(cfg, tokenizer)
    with torch.no_grad():  # make the adapters matter
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    batch = collate_preference_groups(_groups(tokenizer), tokenizer.pad_token_id)
    plain, cpu = PlainBackend(), CpuBackend()

    class Wrapped(torch.nn.Module):  # as DDP wraps a model: the model under `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **inputs):
            return self.module(**inputs)

    def flash(**inputs):  # reads 2D padding masks only
        assert inputs["attention_mask"].dim() == 2, "a 4D mask reached a flash-attention model"
        return policy(**inputs)

    flash.config = copy.deepcopy(policy.config)
    flash.config._attn_implementation = "flash_attention_2"
    with torch.no_grad():
        expected = response_logps(policy, batch, plain)[0]
        assert_close(Reference(None, policy, cpu).logps(batch), Reference(None, policy, plain).logps(batch),
                     atol=1e-5, rtol=0)
        assert_close(response_logps(Wrapped(policy), batch, cpu)[0], expected, atol=1e-5, rtol=0)
        assert_close(response_logps(flash, batch, cpu)[0], expected, atol=1e-5, rtol=0)


def test_mismatched_groups_pair_each_prompt_with_the_previous_groups_response():
    # prompts [1, 2] / [1, 3, 3] (untrained labels), responses [7, 8] / [9] (trained)
    ignore = -100
    groups = [{"responses": [{"input_ids": [1, 2, 7, 8], "labels": [ignore, ignore, 7, 8]}], "label": True, "row": 1},
              {"responses": [{"input_ids": [1, 3, 3, 9], "labels": [ignore, ignore, ignore, 9]}], "label": False,
               "row": 2},
              {"responses": [{"input_ids": [1, 4, 5], "labels": [ignore, ignore, 5]}], "label": True, "row": 3}]
    kl = mismatched_groups(groups)
    assert [g["responses"][0]["input_ids"] for g in kl] == [[1, 2, 5], [1, 3, 3, 7, 8], [1, 4, 9]]
    assert [g["responses"][0]["labels"] for g in kl] == [[ignore, ignore, 5], [ignore, ignore, ignore, 7, 8],
                                                         [ignore, ignore, 9]]
    assert [g["row"] for g in kl] == [1, 2, 3]
    with pytest.raises(ValueError, match="at least 2"):
        mismatched_groups(groups[:1])


def test_kto_reference_point_by_hand():
    assert_close(kto_reference_point(torch.tensor(3.0), 4), torch.tensor(0.75))
    assert_close(kto_reference_point(torch.tensor(-2.0), 4), torch.tensor(0.0))  # clamped at 0
    assert not kto_reference_point(torch.tensor(3.0, requires_grad=True), 4).requires_grad


def _seq_logp(model, ids, labels):
    """log pi(response | prompt) by a plain forward of one unpadded sequence."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return sum(logits[t - 1, ids[t]].item() for t in range(1, len(ids)) if labels[t] != -100)


def test_kto_z0_is_the_mean_log_ratio_over_mismatched_pairs_of_the_global_batch(tok_model):
    """Ethayarajh et al.: x_i with y_(i-1), mean log pi/pi_ref over every micro-batch, clamped, detached."""
    tokenizer, model = tok_model
    policy = copy.deepcopy(model)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    reference = Reference(model, policy, BACKEND)
    groups = _groups(tokenizer, loss="kto")  # 6 unpaired examples
    micro = [collate_groups(groups[:4], tokenizer.pad_token_id, "kto"),
             collate_groups(groups[4:], tokenizer.pad_token_id, "kto")]
    z0 = set_kto_reference_point(policy, reference, micro, BACKEND)
    ratios = []
    for part in (groups[:4], groups[4:]):  # pairs are formed within each micro-batch
        for b, g in enumerate(part):
            prompt = [i for i, lab in zip(g["responses"][0]["input_ids"], g["responses"][0]["labels"],
                                          strict=True) if lab == -100]
            other = part[b - 1]["responses"][0]
            start = len([lab for lab in other["labels"] if lab == -100])
            ids = prompt + other["input_ids"][start:]
            labels = [-100] * len(prompt) + other["labels"][start:]
            ratios.append(_seq_logp(policy, ids, labels) - _seq_logp(model, ids, labels))
    expected = max(0.0, sum(ratios) / len(ratios))
    assert expected > 0  # the perturbation moves the policy away from the reference
    assert z0 == pytest.approx(expected, rel=1e-4)
    assert all(b["kto_z0"].item() == pytest.approx(z0) for b in micro)
    # the loss reads that z0, not the matched pairs' mean
    loss_sum, _ = make_loss_fn(DPOConfig(loss="kto"), reference, BACKEND)(policy, micro[0])
    pol, n = response_logps(policy, micro[0], BACKEND)
    expected_loss, _ = kto_loss(pol[:, 0], reference.logps(micro[0])[:, 0], micro[0]["kto_labels"], beta=0.1,
                                kl_ref=z0)
    assert_close(loss_sum / 4, expected_loss)


@pytest.mark.parametrize(("options", "match"), [
    ({"optim": {"per_device_batch_size": 1}}, "per_device_batch_size"),
    ({"precompute_ref": True}, "precompute_ref"),
])
def test_kto_options_that_cannot_form_its_reference_point_are_errors(options, match):
    from alignkit.config import OptimConfig
    from alignkit.trainers.dpo import _check

    cfg = DPOConfig(loss="kto", **{k: v for k, v in options.items() if k != "optim"})
    if "optim" in options:
        cfg.optim = OptimConfig(**options["optim"])
    with pytest.raises(AlignkitError, match=match):
        _check(cfg)


def test_ipo_per_token_divides_each_log_prob_by_its_length():
    from alignkit.trainers.dpo import LOSS_INPUTS, GroupLogps

    # chosen: 4 tokens, log-ratio (-8) - (-12) = 4 -> 1 per token; rejected: 2 tokens, (-6) - (-4) = -2 -> -1
    s = GroupLogps(policy=torch.tensor([[-8.0, -6.0]]), ref=torch.tensor([[-12.0, -4.0]]),
                   n_tokens=torch.tensor([[4.0, 2.0]]), mask=torch.ones(1, 2, dtype=torch.bool), labels=None)
    from alignkit.losses.preference import ipo_loss

    # beta 0.25: target 2. Summed: (4 + 2 - 2)^2 = 16; per token: (1 + 1 - 2)^2 = 0
    assert_close(ipo_loss(**LOSS_INPUTS["ipo"](s, DPOConfig(loss="ipo", beta=0.25)))[0], torch.tensor(16.0))
    per_token = DPOConfig(loss="ipo", beta=0.25, ipo_per_token=True)
    assert_close(ipo_loss(**LOSS_INPUTS["ipo"](s, per_token))[0], torch.tensor(0.0))
