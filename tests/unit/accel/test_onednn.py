"""`reorder_frozen_linears`: oneDNN-packed linear layers compute F.linear, never with stale weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from alignkit.accel.cpu import CpuBackend, onednn
from alignkit.accel.cpu.onednn import onednn_available, reorder_frozen_linears

pytestmark = pytest.mark.skipif(not onednn_available(torch.float32), reason="this torch build has no oneDNN")


def _mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.SiLU(), torch.nn.Linear(32, 8, bias=False))


def _reference(model: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    first, last = model[0], model[2]
    return F.linear(F.silu(F.linear(x, first.weight, first.bias)), last.weight)


def test_packed_forward_equals_linear_and_keeps_the_state_dict():
    model = _mlp()
    keys = list(model.state_dict())
    assert reorder_frozen_linears(model) == 2
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out, _reference(model, x), atol=1e-5, rtol=1e-5)
    assert list(model.state_dict()) == keys


def test_weights_changed_in_place_are_packed_again():
    model = CpuBackend().freeze(_mlp())
    x = torch.randn(4, 16)
    with torch.inference_mode():
        before = model(x)
        model[2].weight.mul_(-2.0)  # as an optimizer step would change it
        after = model(x)
    torch.testing.assert_close(after, -2.0 * before, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        model[0].weight = torch.nn.Parameter(torch.zeros(32, 16), requires_grad=False)  # replaced
        torch.testing.assert_close(model(x), _reference(model, x), atol=1e-5, rtol=1e-5)


def test_gradients_still_flow_through_a_packed_model():
    model = _mlp()
    reorder_frozen_linears(model)
    x = torch.randn(4, 16)
    model(x).sum().backward()  # weights require grad: the plain F.linear path
    expected = torch.autograd.grad(_reference(model, x).sum(), model[0].weight)[0]
    torch.testing.assert_close(model[0].weight.grad, expected)
    model.requires_grad_(False)
    x.requires_grad_(True)
    model(x).sum().backward()  # frozen weights, input needing its gradient
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_only_plain_float32_linears_are_packed():
    class Adapted(torch.nn.Linear):
        pass

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), Adapted(4, 4), torch.nn.Linear(4, 4).to(torch.bfloat16))
    assert reorder_frozen_linears(model) == 1


def test_the_cpu_backend_without_onednn_freezes_to_plain_linear_layers(monkeypatch):
    monkeypatch.setenv("ALIGNKIT_ONEDNN", "0")
    assert onednn_available(torch.float32)  # the switch is the backend's, not this module's
    model = CpuBackend.from_environment().freeze(_mlp())
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert torch.equal(model(x), _reference(model, x))  # F.linear itself


def test_storage_swaps_copies_and_pickles_are_safe():
    import copy
    import io

    model = CpuBackend().freeze(_mlp())
    x = torch.randn(4, 16)
    with torch.no_grad():
        model(x)
        model.to(torch.bfloat16).to(torch.float32)  # `param.data = ...`: same Parameter, new storage
        model[0].weight.data = torch.ones(32, 16)  # likewise, by hand
        torch.testing.assert_close(model(x), _reference(model, x), atol=1e-5, rtol=1e-5)
        twin = copy.deepcopy(model)
        twin[2].weight.mul_(3.0)
        torch.testing.assert_close(twin(x), 3.0 * model(x), atol=1e-4, rtol=1e-5)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)  # our own bytes, written just above
        torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=1e-5)


def test_inference_tensor_weights_and_adapter_models_take_the_plain_path():
    with torch.inference_mode():
        model = CpuBackend().freeze(_mlp())  # weights created in inference mode: no version counter
        x = torch.randn(2, 16)
        torch.testing.assert_close(model(x), _reference(model, x))
    from peft import LoraConfig, get_peft_model

    adapted = get_peft_model(_mlp(), LoraConfig(r=2, target_modules=["0"]))
    assert reorder_frozen_linears(adapted) == 0  # a merge writes weight.data, which nothing tracks
    model = CpuBackend().freeze(_mlp())
    x = torch.randn(2, 16)
    with torch.no_grad():
        model(x)  # packed copies made
        model[0].weight.data.mul_(-1.0)  # a write no version counter sees (as a LoRA merge writes)
        onednn.restore_linears(model)
        assert torch.equal(model(x), _reference(model, x))  # plain F.linear on the new weights
