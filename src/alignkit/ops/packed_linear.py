"""Linear layers of frozen models multiplied by oneDNN with their weights reordered once (CPU, fp32).

A frozen model (the reference policy, a reward model used as a scorer, an evaluated checkpoint) runs
the same weights through many no-grad forward passes. oneDNN, which torch's x86 CPU builds ship,
multiplies faster when the weight is first reordered into its blocked layout, which is what
torch.compile's CPU backend does for linear layers (`torch.ops.mkldnn._reorder_linear_weight` +
`_linear_pointwise`). Measured on the benchmark's model (2 cores, bench/): a 8×48-token no-grad
forward took 23 ms instead of 34 ms; a 4096×256 projection of 264 rows 2.8 ms instead of 4.1 ms;
an 8-row decode step's products 0.8 ms instead of 2.0 ms.

`pack_frozen_linears(model)` keeps every `nn.Linear` as it is (same parameters, same state dict)
and gives it a forward that uses a reordered copy of its weight when it can: float32 CPU input, no
gradient needed (inference or no-grad mode, or weight and input both without `requires_grad`).
Otherwise, and after any change to the weight (its version counter or storage moved), it falls back
to `F.linear` or reorders again, so a packed layer never computes with stale weights. The copy costs
the memory of the packed weights once more. `ALIGNKIT_ONEDNN_PACK=0` turns packing off.
"""

from __future__ import annotations

import os
import types

import torch
import torch.nn.functional as F

ROWS_HINT = 64  # oneDNN picks the layout for about this many rows; measured not to matter beyond 8


def onednn_available(dtype: torch.dtype) -> bool:
    """Whether float weights of `dtype` can be reordered for oneDNN here (float32, oneDNN build, not disabled)."""
    return (dtype == torch.float32 and os.environ.get("ALIGNKIT_ONEDNN_PACK", "1") != "0"
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def reorder(weight: torch.Tensor, rows: int = ROWS_HINT) -> torch.Tensor:
    """W (out×in, float32, CPU) in oneDNN's blocked layout, for `packed_linear`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), max(rows, 8))


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, W, b) with W reordered by `reorder` (no autograd)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight, bias = self.weight, self.bias
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                              or (bias is not None and bias.requires_grad))
    if needs_grad or x.dtype != torch.float32 or x.device.type != "cpu" or weight.device.type != "cpu":
        return F.linear(x, weight, bias)
    key = (id(weight), weight.data_ptr(), weight._version)
    state = self.__dict__.get("_alignkit_packed")
    if state is None or state[0] != key:
        state = (key, reorder(weight))
        self.__dict__["_alignkit_packed"] = state
    return packed_linear(x, state[1], bias)


def pack_frozen_linears(model: torch.nn.Module) -> int:
    """Give the model's float32 CPU `nn.Linear` layers the packed forward; returns how many.

    Only plain `nn.Linear` modules without accelerate hooks are touched (not LoRA or quantised
    layers); the weights are reordered lazily, at the first forward that can use them.
    """
    count = 0
    for module in model.modules():
        if (type(module) is torch.nn.Linear and not hasattr(module, "_hf_hook")
                and module.weight.device.type == "cpu" and onednn_available(module.weight.dtype)):
            module.forward = types.MethodType(_forward, module)
            count += 1
    return count


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    """`model` in eval mode, without gradients, its linear layers packed (`pack_frozen_linears`)."""
    model.eval().requires_grad_(False)
    pack_frozen_linears(model)
    return model
