"""`clip_grad_norm`: torch's clipping, minus the multiply by 1 when the norm is within the limit."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator

import alignkit.trainers.loop as loop


def _params(scale: float) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7)),
              torch.nn.Parameter(torch.randn(2))]
    for p in params[:2]:
        p.grad = torch.randn_like(p) * scale
    return params  # the last has no gradient


@pytest.mark.parametrize("scale", [0.01, 100.0], ids=["within", "clipped"])
def test_same_norm_and_gradients_as_torch(scale, monkeypatch):
    ours, theirs = _params(scale), _params(scale)
    calls = []
    clip = torch.nn.utils.clip_grads_with_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grads_with_norm_", lambda *a, **k: calls.append(1) or clip(*a, **k))
    norm = loop.clip_grad_norm(Accelerator(cpu=True), ours, 1.0)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert torch.equal(norm, expected)
    # by hand: the norm of all gradient entries together, before clipping
    by_hand = math.sqrt(sum(float((p.grad ** 2).sum()) for p in _params(scale)[:2]))
    assert by_hand == pytest.approx(float(expected), rel=1e-5)
    for a, b in zip(ours[:2], theirs[:2], strict=True):
        assert torch.equal(a.grad, b.grad)
    assert len(calls) == (1 if scale > 1 else 0)  # within the limit: no multiply at all
    if scale > 1:
        total = math.sqrt(sum(float((p.grad ** 2).sum()) for p in ours[:2]))
        assert total == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize(("bad", "max_norm"), [(float("nan"), 1.0), (float("inf"), 1.0), (float("inf"), math.inf)],
                         ids=["nan", "inf", "inf-without-limit"])
def test_nonfinite_norm_scales_like_torch(bad, max_norm):
    ours, theirs = _params(1.0), _params(1.0)
    for params in (ours, theirs):
        params[0].grad[0, 0] = bad
    norm = loop.clip_grad_norm(Accelerator(cpu=True), ours, max_norm)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    torch.testing.assert_close(norm, expected, rtol=0, atol=0, equal_nan=True)
    assert not math.isfinite(float(norm))
    for a, b in zip(ours[:2], theirs[:2], strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, equal_nan=True)


def test_sharded_or_other_setups_go_to_accelerate_with_every_parameter(monkeypatch):
    from accelerate.utils import DistributedType

    acc = Accelerator(cpu=True)
    params = _params(100.0)  # the last has no gradient: accelerate still gets it (FSDP compares lists)
    seen = []
    monkeypatch.setattr(type(acc), "distributed_type", property(lambda self: DistributedType.FSDP))
    monkeypatch.setattr(acc, "clip_grad_norm_", lambda p, max_norm: seen.append(list(p)) or torch.tensor(7.0))
    assert float(loop.clip_grad_norm(acc, iter(params), 1.0)) == 7.0
    assert len(seen) == 1 and len(seen[0]) == 3 and all(a is b for a, b in zip(seen[0], params, strict=True))


def test_no_limit_never_multiplies(monkeypatch):
    params = _params(1e6)
    before = [p.grad.clone() for p in params[:2]]
    monkeypatch.setattr(torch.nn.utils, "clip_grads_with_norm_", lambda *a, **k: pytest.fail("multiplied"))
    loop.clip_grad_norm(Accelerator(cpu=True), params, float("inf"))
    assert all(torch.equal(p.grad, b) for p, b in zip(params[:2], before, strict=True))
