"""Linear layers of frozen models multiplied by oneDNN with their weights reordered once (CPU, fp32).

A frozen model (the reference policy, a reward model used as a scorer, an evaluated checkpoint) runs
the same weights through many no-grad forward passes. oneDNN, which torch's x86 CPU builds ship,
multiplies faster when the weight is first reordered into its blocked layout, which is what
torch.compile's CPU backend does for linear layers (`torch.ops.mkldnn._reorder_linear_weight` +
`_linear_pointwise`). Measured on the benchmark's model (2 cores, bench/): a 8×48-token no-grad
forward took 23 ms instead of 34 ms; a 4096×256 projection of 264 rows 2.8 ms instead of 4.1 ms;
an 8-row decode step's products 0.8 ms instead of 2.0 ms.

`reorder_frozen_linears(model)` keeps every `nn.Linear` as it is (same parameters, same state dict)
and gives it a forward that uses a reordered copy of its weight when it can: float32 CPU input, no
gradient needed (inference or no-grad mode, or weight and input both without `requires_grad`).
Otherwise it falls back to `F.linear`, and after a change to the weight (a new tensor, or its
version counter moved by an in-place update) it reorders again. Writes through `weight.data` are
not tracked (`restore_linears` drops the copies). The copy costs the memory of the reordered weights
once more. The CPU backend's `onednn=False` (`ALIGNKIT_ONEDNN=0`) turns reordering off.
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F

ROWS_HINT = 64  # oneDNN picks the layout for about this many rows; measured not to matter beyond 8


def onednn_available(dtype: torch.dtype) -> bool:
    """Whether float weights of `dtype` can be reordered for oneDNN here (float32, a oneDNN build)."""
    return (dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def reorder_weight(weight: torch.Tensor, rows: int = ROWS_HINT) -> torch.Tensor:
    """W (out×in, float32, CPU) in oneDNN's blocked layout, for `reordered_linear`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), max(rows, 8))


def reordered_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, W, b) with W reordered by `reorder_weight` (no autograd)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


# module -> (its weight Parameter, a view of the storage reordered, the weight's version then, the reordered
# copy). Kept outside the module so that copying or pickling a model never meets the opaque oneDNN
# tensor.
_REORDERED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight, bias = module.weight, module.bias
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                              or (bias is not None and bias.requires_grad))
    if (needs_grad or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.device.type != "cpu"
            or weight.device.type != "cpu" or weight.is_inference()):  # inference tensors have no version
        return F.linear(x, weight, bias)
    state = _REORDERED.get(module)
    if (state is None or state[0] is not weight or state[1].data_ptr() != weight.data_ptr()
            or state[2] != weight._version):
        # state[1] (a view of the reordered storage) keeps that storage alive: `param.data = new` (as
        # `module.to` does) moves the data pointer, and a freed address can never come back unnoticed.
        state = (weight, weight.detach(), weight._version, reorder_weight(weight))
        _REORDERED[module] = state
    return reordered_linear(x, state[3], bias)


def _inside_adapters(model: torch.nn.Module) -> bool:
    """Whether `model` holds peft tuner layers (LoRA merges write `weight.data`, which no version tracks)."""
    return any(hasattr(m, "base_layer") and hasattr(m, "merge") for m in model.modules())


def reorder_frozen_linears(model: torch.nn.Module) -> int:
    """Give the model's float32 CPU `nn.Linear` layers the reordered forward; returns how many.

    Only plain `nn.Linear` modules without accelerate hooks, in models without peft adapters, are
    touched; the weights are reordered lazily, at the first forward that can use them. A weight that
    is replaced or changed in place (optimizer step, `load_state_dict`, `.to`) is reordered again;
    writes through `weight.data` bypass the version counter: call `restore_linears(model)` after them.
    """
    if _inside_adapters(model):
        return 0
    count = 0
    for module in model.modules():
        if (type(module) is torch.nn.Linear and not hasattr(module, "_hf_hook")
                and module.weight.device.type == "cpu" and onednn_available(module.weight.dtype)):
            module.forward = functools.partial(_forward, module)
            count += 1
    return count


def restore_linears(model: torch.nn.Module) -> None:
    """Drop the reordered copies and forwards of `model`'s linear layers (plain `nn.Linear` again)."""
    for module in model.modules():
        _REORDERED.pop(module, None)
        if isinstance(module.__dict__.get("forward"), functools.partial) and module.forward.func is _forward:
            del module.forward
