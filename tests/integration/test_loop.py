"""The shared training loop: exact gradient accumulation, non-finite steps, data positions."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import build_tiny_llama, build_tiny_tokenizer

from alignkit.config import resolve_config
from alignkit.errors import AlignkitError
from alignkit.losses.sft import IGNORE_INDEX, causal_lm_loss_sum
from alignkit.trainers.loop import TrainLoop, global_batch_indices, shard_indices
from alignkit.trainers.pretrain import PretrainConfig

VOCAB = 300


def make_batch(lengths: list[int], seed: int = 0) -> dict:
    """Right-padded random sequences of unequal lengths; labels ignore the padding."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, VOCAB, (n,), generator=gen)
        mask[i, :n] = 1
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def padded_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss, _ = causal_lm_loss_sum(logits, batch["labels"])
    return loss, {}


def slice_batch(batch: dict, rows: list[int]) -> dict:
    out = {k: v[rows] for k, v in batch.items()}
    width = int(out["attention_mask"].sum(1).max())  # trim to this micro-batch's own longest row
    out = {k: v[:, :width] for k, v in out.items()}
    out["n_terms"] = int((out["labels"][:, 1:] != IGNORE_INDEX).sum())
    return out


def one_step(tmp_path, micro: int, accum: int, batch: dict, name: str):
    cfg = resolve_config(PretrainConfig, None, [
        "--output-dir", str(tmp_path / name), "--optim.per_device_batch_size", str(micro),
        "--optim.grad_accum_steps", str(accum), "--optim.max_steps", "1", "--optim.max_grad_norm", "0",
        "--run.report_to", "[]", "--run.progress", "false"])
    model = build_tiny_llama(VOCAB, seed=0, attention_dropout=0.0)
    loop = TrainLoop("test", cfg, model)
    loop.resume()
    grads = {}
    inner = loop.optimizer.optimizer

    def capture(*args, **kwargs):
        grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters()})

    inner.step = capture
    micro_batches = [slice_batch(batch, list(range(a * micro, (a + 1) * micro))) for a in range(accum)]
    metrics = loop.update(micro_batches, padded_loss)
    loop.close()
    return metrics["loss/total"], grads


def test_accumulation_is_exact_with_unequal_lengths(tmp_path):
    batch = make_batch([3, 17, 9, 25, 5, 12, 30, 7], seed=1)
    # the reference: one pass over the whole batch, summed token losses / token count
    model = build_tiny_llama(VOCAB, seed=0, attention_dropout=0.0)
    loss_sum, _ = padded_loss(model, batch)
    n_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    (loss_sum / n_tokens).backward()
    ref_grads = {n: p.grad for n, p in model.named_parameters()}
    for micro, accum in [(8, 1), (2, 4), (1, 8)]:
        loss, grads = one_step(tmp_path, micro, accum, batch, f"r{micro}x{accum}")
        assert loss == pytest.approx(loss_sum.item() / n_tokens, abs=1e-6)
        for name, ref in ref_grads.items():
            torch.testing.assert_close(grads[name], ref, atol=1e-6, rtol=0, msg=f"{micro}x{accum} {name}")


def test_mean_of_micro_means_would_differ(tmp_path):
    """The check above can fail: the naive normalisation gives a different loss on these lengths."""
    batch = make_batch([3, 17, 9, 25, 5, 12, 30, 7], seed=1)
    model = build_tiny_llama(VOCAB, seed=0)
    per_micro = []
    for a in range(8):
        part = slice_batch(batch, [a])
        loss_sum, _ = padded_loss(model, part)
        per_micro.append(loss_sum.item() / part["n_terms"])
    exact, _ = one_step(tmp_path, 1, 8, batch, "naive")
    assert abs(sum(per_micro) / 8 - exact) > 1e-3


def test_global_batches_cover_each_epoch_once_and_shard_disjointly():
    seen = [i for s in range(5) for i in global_batch_indices(10, 4, s, seed=3)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert global_batch_indices(10, 4, 2, seed=3) == seen[8:12]  # a pure function of the step
    idx = list(range(8))
    two = shard_indices(idx, 2, 2, 2, 0) + shard_indices(idx, 2, 2, 2, 1)
    assert sorted(i for mb in two for i in mb) == idx
    assert shard_indices(idx, 2, 4, 1, 0) == [[0, 1], [2, 3], [4, 5], [6, 7]]


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_nonfinite_loss_names_step_and_leaves_weights(tmp_path, mode):
    cfg = resolve_config(PretrainConfig, None, [
        "--output-dir", str(tmp_path / mode), "--optim.per_device_batch_size", "2", "--optim.max_steps", "4",
        "--run.on_nonfinite", mode, "--run.report_to", "[]", "--run.progress", "false"])
    model = build_tiny_llama(VOCAB, seed=0)
    loop = TrainLoop("test", cfg, model)
    loop.resume()
    batch = make_batch([5, 8], seed=2)
    batch["n_terms"] = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def nan_at_step_2(model, b):
        loss, m = padded_loss(model, b)
        return (loss * float("nan") if loop.step == 1 else loss), m

    loop.update([batch], nan_at_step_2)  # step 1 is fine
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    if mode == "stop":
        with pytest.raises(AlignkitError, match="at step 2"):
            loop.update([batch], nan_at_step_2)
    else:
        metrics = loop.update([batch], nan_at_step_2)
        assert metrics["optim/skipped"] == 1.0
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    if mode == "skip":  # the next step trains again
        loop.update([batch], nan_at_step_2)
        assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
        assert loop.stage_state["skipped_steps"] == 1  # checkpointed with the stage state
        tokenizer = build_tiny_tokenizer()
        summary = loop.finish(tokenizer, {})
        assert summary["skipped_steps"] == 1
        return
    loop.close()
