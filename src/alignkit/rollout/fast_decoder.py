"""A lean forward pass for decoding Llama-family models, used by `sample` when the model allows it.

Decoding a few rows is dominated on CPU by per-op cost and weight reads: the Hugging Face forward
spends ~30 ms of a 0.19 s benchmark rollout on per-module Python overhead alone (hooks, output
capturing, cache bookkeeping, mask building). `FastDecoder` runs the same maths as
`LlamaForCausalLM` (also Mistral and Qwen2, which share its layer) as plain tensor ops on the model's
own parameters: fused q/k/v and gate/up projections, one rotary application for q and k together,
a preallocated B×H×W×D key/value cache per layer and `scaled_dot_product_attention` over the columns
written so far. Its weights are reordered once per build into oneDNN's blocked layout where oneDNN
is available and the model is float32 (`alignkit.ops.packed_linear`), else stored transposed for a
plain `x @ W_t`. It is exact up to float rounding: the sampler's recorded log-probs match a
trainer's forward (tests/unit/rollout). The README's speed section has the measurements.

Anything else (other architectures, peft wrappers or other non-Linear projections, sliding-window
attention, non-SiLU MLPs, Gemma style norms, models on an accelerator) makes `FastDecoder.build`
return None and `sample` uses the Hugging Face forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alignkit.ops.packed_linear import onednn_available, packed_linear, reorder
from alignkit.ops.prefix import attention_window, distinct_rows

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class _Weight:
    """One linear layer's weight W (out×in) and bias, prepared for `x @ W^T + b` on few rows.

    Either reordered into oneDNN's blocked layout (`packed`, see `alignkit.ops.packed_linear`), or
    stored transposed (in×out) for a plain `x @ W_t`; both compute F.linear(x, W, b) to float rounding.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int, pack: bool) -> None:
        self.bias, self.packed = bias, pack
        self.weight = reorder(weight, rows) if pack else weight.t().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return packed_linear(x, self.weight, self.bias)
        out = x @ self.weight
        return out if self.bias is None else out + self.bias


@dataclass
class _Layer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    qkv: _Weight
    o: _Weight
    gate_up: _Weight
    down: _Weight
    eps1: torch.Tensor  # 0-d: no scalar-to-tensor fill per call
    eps2: torch.Tensor


def _cat_bias(*linears: torch.nn.Linear) -> torch.Tensor | None:
    biases = [lin.bias for lin in linears]
    if all(b is None for b in biases):
        return None
    return torch.cat([b if b is not None else lin.weight.new_zeros(lin.out_features)
                      for b, lin in zip(biases, linears, strict=True)])


def _signed_sin(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, [-sin_1, sin_2]) over the two halves of the head dimension, for `roll`-based rotary."""
    half = sin.shape[-1] // 2
    return cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _unsupported_reason(model: torch.nn.Module, width: int) -> str | None:
    """Why `model` cannot use the fast path (None when it can)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return "not a Llama/Mistral/Qwen2 causal LM"
    inner = getattr(model, "model", None)
    if type(model).__name__ not in {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}:
        return f"class {type(model).__name__}"
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "unexpected module layout"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act}"
    window = attention_window(config)
    if window is not None and window < width:
        return f"sliding window {window} < {width}"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    if model.lm_head.weight.device.type != "cpu":
        # Built for CPU decoding (transposed weight copies, measured there); on accelerators the
        # copies would double weight memory for a gain we have not measured.
        return f"device {model.lm_head.weight.device.type}"
    for layer in inner.layers:
        linears = [getattr(layer.self_attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        linears += [getattr(layer.mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        # Swapped-in modules (LoRA injected in place, quantised or offloaded layers) compute something
        # else than their `.weight`: only plain Linear layers without hooks are read directly.
        if any(type(m) is not torch.nn.Linear or hasattr(m, "_hf_hook") for m in linears):
            return "non-Linear (adapter, quantised or offloaded) projection"
    return None


class FastDecoder:
    """Prefill and one-token decode steps of a Llama-family model with its own KV cache.

    Build it with `FastDecoder.build(model, batch, width)` inside `torch.inference_mode()`;
    it reads the model's current weights (q/k/v and gate/up are concatenated once, at build time).
    Columns of the cache are absolute: prompt columns 0..P-1, response token t at column P + t.
    """

    def __init__(self, model: torch.nn.Module, batch: int, width: int) -> None:
        inner = model.model
        config = model.config
        attn0 = inner.layers[0].self_attn
        self.head_dim, self.scaling = attn0.head_dim, attn0.scaling
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.embed = inner.embed_tokens  # called as a module: its hooks see every pass (bench/common.Probe)
        self.rotary = inner.rotary_emb
        self.dtype = dtype = self.embed.weight.dtype
        device = self.embed.weight.device

        def eps(norm: torch.nn.Module) -> torch.Tensor:  # 0-d, made once
            return torch.tensor(norm.variance_epsilon, dtype=torch.float32, device=device)

        self.norm_w, self.norm_eps = inner.norm.weight, eps(inner.norm)
        pack = self.packed = onednn_available(dtype)
        # cos/sin of every position the decoder can see, computed once (positions < width); rope types
        # whose frequencies depend on the longest position in the call are left to the module per call.
        self.rotary_table = None
        rope_type = str(getattr(self.rotary, "rope_type", "default"))
        if "dynamic" not in rope_type and "longrope" not in rope_type:
            probe = torch.zeros(1, 1, dtype=dtype, device=device)
            self.rotary_table = _signed_sin(*self.rotary(probe, torch.arange(width, device=device)[None]))

        def weight(w: torch.Tensor, b: torch.Tensor | None) -> _Weight:
            return _Weight(w, b, batch, pack)

        self.lm_head = weight(model.lm_head.weight, model.lm_head.bias)
        self.layers = []
        for layer in inner.layers:
            att, mlp = layer.self_attn, layer.mlp
            self.layers.append(_Layer(
                ln1=layer.input_layernorm.weight, ln2=layer.post_attention_layernorm.weight,
                qkv=weight(torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]),
                           _cat_bias(att.q_proj, att.k_proj, att.v_proj)),
                o=weight(att.o_proj.weight, att.o_proj.bias),
                gate_up=weight(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                               _cat_bias(mlp.gate_proj, mlp.up_proj)),
                down=weight(mlp.down_proj.weight, mlp.down_proj.bias),
                eps1=eps(layer.input_layernorm), eps2=eps(layer.post_attention_layernorm),
            ))
        shape = (batch, self.n_kv, width, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        self.gqa = self.n_heads != self.n_kv

    @classmethod
    def build(cls, model: torch.nn.Module, batch: int, width: int) -> FastDecoder | None:
        """A decoder for `model`, or None when its architecture needs the Hugging Face forward."""
        if _unsupported_reason(model, width) is not None:
            return None
        return cls(model, batch, width)

    @staticmethod
    def _rms(x: torch.Tensor, weight: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """LlamaRMSNorm: w * (x / rms(x)), computed in float32 and cast back as Hugging Face does (eps: 0-d)."""
        if x.dtype == torch.float32:
            # mean(x^2) + eps as eps + |x|^2 / d: 4 kernels where F.rms_norm runs ~7 (~10 us less per call
            # in the decode loop, where weight reads have just evicted the caches); equal to float rounding.
            norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
            return (x * torch.addcmul(eps, norm, norm, value=1.0 / x.shape[-1]).rsqrt_()) * weight
        xf = x.float()
        return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, start: int, attn_mask: torch.Tensor,
                 caches: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None) -> torch.Tensor:
        """Hidden states B×T×H of tokens `ids` (B×T) written at cache columns start..start+T-1.

        `caches` (keys, values per layer) defaults to the decoder's own B-row cache.
        """
        k_caches, v_caches = caches or (self.k_cache, self.v_cache)
        batch, width_t = ids.shape
        stop = start + width_t
        x = self.embed(ids)
        if self.rotary_table is not None:
            cos, sin = (table[0][positions] for table in self.rotary_table)  # B×T×D each, sin signed
        else:
            cos, sin = _signed_sin(*self.rotary(x, positions))
        cos, sin = cos[:, None], sin[:, None]
        half = self.head_dim // 2
        n_qk = self.n_heads + self.n_kv
        for layer, k_cache, v_cache in zip(self.layers, k_caches, v_caches, strict=True):
            h = self._rms(x, layer.ln1, layer.eps1)
            qkv = layer.qkv(h).view(batch, width_t, n_qk + self.n_kv, self.head_dim)
            qkv = qkv.transpose(1, 2)  # B×(Hq+2Hkv)×T×D
            qk, v = qkv[:, :n_qk], qkv[:, n_qk:]
            # rotate_half(qk) * sin = roll(qk, D/2) * [-sin_1, sin_2]: 3 kernels instead of 5
            qk = torch.addcmul(qk * cos, qk.roll(half, -1), sin)
            k_cache[:, :, start:stop] = qk[:, self.n_heads:]
            v_cache[:, :, start:stop] = v
            attn = F.scaled_dot_product_attention(
                qk[:, : self.n_heads], k_cache[:, :, :stop], v_cache[:, :, :stop], attn_mask=attn_mask,
                scale=self.scaling, enable_gqa=self.gqa)
            x = x + layer.o(attn.transpose(1, 2).reshape(batch, width_t, -1))
            gate, up = layer.gate_up(self._rms(x, layer.ln2, layer.eps2)).chunk(2, -1)
            x = x + layer.down(F.silu(gate) * up)
        return x

    def _logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self._rms(last_hidden, self.norm_w, self.norm_eps))

    def prefill(self, prompt_ids: torch.Tensor, positions: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """Next-token logits B×V after left-padded prompts (B×P ids, positions, bool mask).

        Identical prompt rows (k samples per prompt, as RL and labelling sample) are run once and
        their keys and values copied to every row that repeats them.
        """
        width_p = prompt_ids.shape[1]
        ids, mask_rows, inverse = distinct_rows(prompt_ids, prompt_mask)
        if ids.shape[0] == prompt_ids.shape[0]:  # no repeated prompt: write the cache directly
            ids, mask_rows, row_positions = prompt_ids, prompt_mask, positions
        else:
            row_positions = (mask_rows.long().cumsum(dim=1) - 1).clamp(min=0)
        causal = torch.ones(width_p, width_p, dtype=torch.bool, device=prompt_ids.device).tril()
        # Real queries see real keys at or before them; a pad query sees only itself, which keeps its
        # (never attended) row finite instead of a softmax over nothing.
        mask = (causal & mask_rows[:, None, None, :]) | torch.eye(width_p, dtype=torch.bool, device=ids.device)
        if ids is prompt_ids:
            return self._logits(self._forward(ids, row_positions, 0, mask)[:, -1])
        shape = (ids.shape[0], self.n_kv, width_p, self.head_dim)
        keys = [torch.empty(shape, dtype=c.dtype, device=c.device) for c in self.k_cache]
        values = [torch.empty(shape, dtype=c.dtype, device=c.device) for c in self.v_cache]
        hidden = self._forward(ids, row_positions, 0, mask, caches=(keys, values))
        for cache, part in zip(self.k_cache + self.v_cache, keys + values, strict=True):
            cache[:, :, :width_p] = part[inverse]
        return self._logits(hidden[:, -1])[inverse]

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor | None,
             column: int) -> torch.Tensor:
        """Next-token logits B×V after `tokens` (B) at `positions` (B), written at cache `column`.

        `key_mask` is B×W over cache columns, bool (True: attend) or an additive float bias; columns
        > `column` are ignored. None: every column up to `column` is attended (~5% faster steps).
        """
        mask = None if key_mask is None else key_mask[:, None, None, : column + 1]
        return self._logits(self._forward(tokens[:, None], positions[:, None], column, mask)[:, -1])
