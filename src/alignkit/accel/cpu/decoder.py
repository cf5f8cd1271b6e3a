"""A lean forward pass for decoding Llama-family models: the CPU backend's sampler when the model allows it.

Decoding a few rows is dominated on CPU by per-op cost and weight reads: the Hugging Face forward
spends ~30 ms of a 0.19 s benchmark rollout on per-module Python overhead alone (hooks, output
capturing, cache bookkeeping, mask building). `FastDecoder` runs the same maths as
`LlamaForCausalLM` (also Mistral and Qwen2, which share its layer) as plain tensor ops on the model's
own parameters: fused q/k/v and gate/up projections, one rotary application for q and k together,
a preallocated B×H×W×D key/value cache per layer and `scaled_dot_product_attention` over the columns
written so far, in one function run by TorchScript's interpreter (`alignkit.accel.cpu.decode_layers`).
Its weights are reordered once per build into oneDNN's blocked layout where oneDNN is available and
the model is float32 (`alignkit.accel.cpu.onednn`), else stored transposed for a plain `x @ W_t`.
It is exact up to float rounding: the sampler's recorded log-probs match a trainer's forward
(tests/unit/accel). docs/performance.md has the measurements.

Anything else (other architectures, peft wrappers or other non-Linear projections, sliding-window
attention, non-SiLU MLPs, Gemma style norms, models on an accelerator) makes `FastDecoder.build`
return None and the backend decodes with the Hugging Face forward (`alignkit.accel.plain`).
"""

from __future__ import annotations

import torch

from alignkit.accel.cpu.decode_layers import run_layers
from alignkit.accel.cpu.onednn import onednn_available, reorder_weight
from alignkit.accel.cpu.shared_prompts import attention_window, distinct_rows
from alignkit.ops.masking import mask_positions

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


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

    def __init__(self, model: torch.nn.Module, batch: int, width: int, *, reorder: bool = True,
                 script: bool = True) -> None:
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

        self.reordered = reordered = reorder and onednn_available(dtype)
        self.script = script
        # cos/sin of every position the decoder can see, computed once (positions < width); rope types
        # whose frequencies depend on the longest position in the call are left to the module per call.
        self.rotary_table = None
        rope_type = str(getattr(self.rotary, "rope_type", "default"))
        if "dynamic" not in rope_type and "longrope" not in rope_type:
            probe = torch.zeros(1, 1, dtype=dtype, device=device)
            self.rotary_table = _signed_sin(*self.rotary(probe, torch.arange(width, device=device)[None]))
        # decode_layers.decoder_layers' flat lists: 4 norm tensors and 4 projections per layer, then the
        # final norm and the LM head; weights reordered for oneDNN or transposed for x @ W^T.
        self.norms: list[torch.Tensor] = []
        self.weights: list[torch.Tensor] = []
        self.biases: list[torch.Tensor | None] = []

        def add(w: torch.Tensor, b: torch.Tensor | None) -> None:
            self.weights.append(reorder_weight(w, batch) if reordered else w.t().contiguous())
            self.biases.append(b)

        for layer in inner.layers:
            att, mlp = layer.self_attn, layer.mlp
            self.norms += [layer.input_layernorm.weight, eps(layer.input_layernorm),
                           layer.post_attention_layernorm.weight, eps(layer.post_attention_layernorm)]
            add(torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]),
                _cat_bias(att.q_proj, att.k_proj, att.v_proj))
            add(att.o_proj.weight, att.o_proj.bias)
            add(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), _cat_bias(mlp.gate_proj, mlp.up_proj))
            add(mlp.down_proj.weight, mlp.down_proj.bias)
        self.norms += [inner.norm.weight, eps(inner.norm)]
        add(model.lm_head.weight, model.lm_head.bias)
        shape = (batch, self.n_kv, width, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in inner.layers]
        self.v_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in inner.layers]

    @classmethod
    def build(cls, model: torch.nn.Module, batch: int, width: int, *, reorder: bool = True,
              script: bool = True) -> FastDecoder | None:
        """A decoder for `model`, or None when its architecture needs the Hugging Face forward."""
        if _unsupported_reason(model, width) is not None:
            return None
        return cls(model, batch, width, reorder=reorder, script=script)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, start: int, attn_mask: torch.Tensor | None,
                 caches: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None) -> torch.Tensor:
        """Next-token logits B×V after tokens `ids` (B×T), written at cache columns start..start+T-1.

        `caches` (keys, values per layer) defaults to the decoder's own B-row cache.
        """
        k_caches, v_caches = caches or (self.k_cache, self.v_cache)
        x = self.embed(ids)
        if self.rotary_table is not None:
            (cos, sin), rows = (t[0] for t in self.rotary_table), positions  # W×D tables, read at positions
        else:
            (cos, sin), rows = _signed_sin(*self.rotary(x, positions)), None  # B×T×D
        return run_layers(self.script, x, cos, sin, rows, start, attn_mask, self.norms, self.weights, self.biases,
                          k_caches, v_caches, [self.n_heads, self.n_kv, self.head_dim], float(self.scaling),
                          self.reordered)

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
            row_positions = mask_positions(mask_rows)
        causal = torch.ones(width_p, width_p, dtype=torch.bool, device=prompt_ids.device).tril()
        # Real queries see real keys at or before them; a pad query sees only itself, which keeps its
        # (never attended) row finite instead of a softmax over nothing.
        mask = (causal & mask_rows[:, None, None, :]) | torch.eye(width_p, dtype=torch.bool, device=ids.device)
        if ids is prompt_ids:
            return self._forward(ids, row_positions, 0, mask)
        shape = (ids.shape[0], self.n_kv, width_p, self.head_dim)
        keys = [torch.empty(shape, dtype=c.dtype, device=c.device) for c in self.k_cache]
        values = [torch.empty(shape, dtype=c.dtype, device=c.device) for c in self.v_cache]
        logits = self._forward(ids, row_positions, 0, mask, caches=(keys, values))
        for cache, part in zip(self.k_cache + self.v_cache, keys + values, strict=True):
            cache[:, :, :width_p] = part[inverse]
        return logits[inverse]

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor | None,
             column: int) -> torch.Tensor:
        """Next-token logits B×V after `tokens` (B) at `positions` (B), written at cache `column`.

        `key_mask` is B×W over cache columns, bool (True: attend) or an additive float bias; columns
        > `column` are ignored. None: every column up to `column` is attended (~5% faster steps).
        """
        mask = None if key_mask is None else key_mask[:, None, None, : column + 1]
        return self._forward(tokens[:, None], positions[:, None], column, mask)
