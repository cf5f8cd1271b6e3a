"""`FastDecoder`'s forward as one function over plain tensors, run by TorchScript's interpreter.

A decode step of a few rows is bound by per-op cost: ~130 small ops whose Python dispatch costs
as much as their kernels. `decoder_layers` is written in the subset of Python that TorchScript
compiles, and `run_layers` runs it through `torch.jit.script`: the same aten ops in the same order
(results bit-identical to running it as Python), without Python between them. Measured on the
benchmark's model (8 rows, 2 cores): a decode step took 1.24 ms instead of 1.54 ms. TorchScript is
deprecated in PyTorch (torch.compile, measured slower here, is its successor; see the README's
speed page), so when it is missing or fails to compile the same function runs as Python; the CPU
backend's `torchscript=False` (`ALIGNKIT_TORCHSCRIPT=0`) chooses that too. The interpreter runs
without graph optimisations
(`torch.jit.optimized_execution(False)`): no fusion, no per-shape re-profiling as prompt widths change.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, List, Optional  # noqa: UP035 (TorchScript reads typing's names)

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm: w * (x / rms(x)), computed in float32 and cast back as Hugging Face does (eps: 0-d)."""
    if x.dtype == torch.float32:
        # mean(x^2) + eps as eps + |x|^2 / d: 4 kernels where F.rms_norm runs ~7 (~10 us less per call
        # in the decode loop, where weight reads have just evicted the caches); equal to float rounding.
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        return (x * torch.addcmul(eps, norm, norm, value=1.0 / x.shape[-1]).rsqrt_()) * weight
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], reordered: bool) -> torch.Tensor:  # noqa: UP045
    """F.linear(x, W, b) with W reordered for oneDNN (`reordered`, `alignkit.accel.cpu.onednn`) or stored as W^T."""
    if reordered:  # `reordered_linear`'s call, inlined: TorchScript needs the empty scalar list typed
        scalars: List[Optional[number]] = []  # noqa: F821, UP006, UP045 (TorchScript's Scalar; not evaluated)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", scalars, "")
    out = x @ weight
    if bias is None:
        return out
    return out + bias


def decoder_layers(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: Optional[torch.Tensor],  # noqa: UP045
                   start: int, attn_mask: Optional[torch.Tensor], norms: List[torch.Tensor],  # noqa: UP006, UP045
                   weights: List[torch.Tensor], biases: List[Optional[torch.Tensor]],  # noqa: UP006, UP045
                   k_caches: List[torch.Tensor], v_caches: List[torch.Tensor],  # noqa: UP006
                   shape: List[int], scaling: float, reordered: bool) -> torch.Tensor:  # noqa: UP006
    """Next-token logits B×V after embedded tokens x (B×T×H) written at cache columns start..start+T-1.

    `cos`, `sin` (sin signed for `roll`-based rotary): W×D tables read at `positions` (B×T), or B×T×D
    already read (positions None). Per layer l: norms[4l:4l+4] = (input norm weight, its eps, post-
    attention norm weight, its eps), weights/biases[4l:4l+4] = (qkv, o, gate_up, down); then the final
    norm's (weight, eps) and the LM head. shape = [query heads, key/value heads, head dim].
    """
    batch, width_t = x.shape[0], x.shape[1]
    n_heads, n_kv, head_dim = shape[0], shape[1], shape[2]
    stop, half, n_qk = start + width_t, head_dim // 2, n_heads + n_kv
    if positions is not None:
        cos, sin = cos[positions], sin[positions]
    cos, sin = cos[:, None], sin[:, None]
    for i in range(len(k_caches)):
        k_cache, v_cache = k_caches[i], v_caches[i]
        h = rms_norm(x, norms[4 * i], norms[4 * i + 1])
        qkv = linear(h, weights[4 * i], biases[4 * i], reordered).view(batch, width_t, n_qk + n_kv, head_dim)
        qkv = qkv.transpose(1, 2)  # B×(Hq+2Hkv)×T×D
        qk, v = qkv[:, :n_qk], qkv[:, n_qk:]
        # rotate_half(qk) * sin = roll(qk, D/2) * [-sin_1, sin_2]: 3 kernels instead of 5
        qk = torch.addcmul(qk * cos, qk.roll(half, -1), sin)
        k_cache[:, :, start:stop] = qk[:, n_heads:]
        v_cache[:, :, start:stop] = v
        attn = F.scaled_dot_product_attention(qk[:, :n_heads], k_cache[:, :, :stop], v_cache[:, :, :stop],
                                              attn_mask=attn_mask, scale=scaling, enable_gqa=n_heads != n_kv)
        x = x + linear(attn.transpose(1, 2).reshape(batch, width_t, -1), weights[4 * i + 1], biases[4 * i + 1], reordered)
        gate, up = linear(rms_norm(x, norms[4 * i + 2], norms[4 * i + 3]), weights[4 * i + 2], biases[4 * i + 2],
                          reordered).chunk(2, -1)
        x = x + linear(F.silu(gate) * up, weights[4 * i + 3], biases[4 * i + 3], reordered)
    last = rms_norm(x[:, -1], norms[-2], norms[-1])
    return linear(last, weights[-1], biases[-1], reordered)


_COMPILED: dict[str, Any] = {}


def scripted_layers() -> Any:
    """`decoder_layers` compiled by TorchScript (once per process), or None when scripting fails."""
    if "fn" not in _COMPILED:
        fn: Any = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script's own notice
                fn = torch.jit.script(decoder_layers)
        except Exception as err:  # noqa: BLE001 (a torch without TorchScript, or a newer one that refuses it)
            log.info("TorchScript unavailable (%s: %s); decoding with the Python forward", type(err).__name__, err)
        _COMPILED["fn"] = fn
    return _COMPILED["fn"]


def run_layers(script: bool, *args: Any) -> torch.Tensor:
    """`decoder_layers(*args)`, through TorchScript's interpreter when `script` and it compiles (without
    the JIT's graph optimisations), else as Python."""
    fn = scripted_layers() if script else None
    if fn is None:
        return decoder_layers(*args)
    with torch.jit.optimized_execution(False):
        return fn(*args)
