"""A decoder reward model's last layer run only where its head reads: one position per sequence.

A reward model (Eq. 10.34) reads its scalar head at one token per sequence, the last real one. In
a causal decoder every layer but the last must run at every position (later layers attend to their
keys and values), but the last layer's output is read at that one position only: its keys and
values are needed everywhere, its query, attention output, residual and MLP only there.
`last_token_scores` runs the backbone up to the last layer with the Hugging Face forward (a forward
pre-hook takes the last layer's input and ends the pass), then that layer's k/v projections over
all positions and the rest of the layer, the final norm and the head on one row per sequence. The
scores equal the full forward's to float rounding, gradients included (tests/unit/accel).

The saving is most of one layer: q, o and the MLP, about 80% of a Llama layer's FLOPs, so
0.8 / L of the model for L layers: 20% for the benchmark's 4-layer model, 2.5% at 32 layers.
Used for Llama, Mistral and Qwen2 classifiers (also under a peft wrapper, as its projections are
called as modules) without a sliding window; anything else takes the full forward: DDP/FSDP-wrapped
models (whose wrapper must see the forward), forwards wrapped by accelerate's mixed-precision
autocast, peft prompt learning, offloaded layers. The pre-hook sits on the shared layer for the
duration of the call: do not run the same model from two threads at once.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from alignkit.accel.cpu.shared_prompts import attention_window

SUPPORTED_CLASSES = ("LlamaForSequenceClassification", "MistralForSequenceClassification",
                     "Qwen2ForSequenceClassification")


class _LastLayerInput(Exception):
    """Raised by the pre-hook: carries the last layer's input and rotary embeddings out of the forward."""

    def __init__(self, hidden: torch.Tensor, position_embeddings: Any) -> None:
        super().__init__("last layer reached")
        self.hidden, self.position_embeddings = hidden, position_embeddings


def _backbone(model: torch.nn.Module) -> tuple[Any, Any] | None:
    """(Hugging Face classifier, its decoder backbone) when `last_token_scores` applies, else None."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    if type(hf).__name__ not in SUPPORTED_CLASSES or getattr(hf, "score", None) is None:
        return None
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return None  # virtual tokens / prefix keys that the hand-run last layer would not see
    if any("_original_forward" in m.__dict__ for m in (model, hf)):
        return None  # forward wrapped by accelerate (mixed-precision autocast the early exit would leave)
    backbone = getattr(hf, hf.base_model_prefix, None)
    if backbone is None or not hasattr(backbone, "layers") or not hasattr(backbone, "norm"):
        return None
    if attention_window(hf.config) is not None or getattr(hf.config, "pretraining_tp", 1) != 1:
        return None
    if any(hasattr(m, "_hf_hook") for m in backbone.layers[: hf.config.num_hidden_layers][-1].modules()):
        return None  # offloaded or dispatched layer: its weights arrive through accelerate's hook
    return hf, backbone


def supports_last_token(model: torch.nn.Module) -> bool:
    """Whether `last_token_scores` can score `model` (a plain or peft-wrapped Llama-family classifier)."""
    return _backbone(model) is not None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def last_token_scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      position_ids: torch.Tensor, last: torch.Tensor, rows: torch.Tensor | None = None,
                      keys_mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """Head outputs N at (row `rows[n]`, column `last[n]`): the classifier's logits there, fewer FLOPs.

    None when `model` needs the full forward (`supports_last_token` is False). With a 2D padding mask
    (B×T, rows = 0..B-1 by default), `last[b]` must be row b's last real token (every key the row
    attends to is at or before it), as `last_token_index(attention_mask)` gives. With a 4D mask (B×1×T×T
    bool, True: attend; `alignkit.accel.cpu.shared_prompts.shared_prompt_layout`), several sequences share a row and
    each read n sees the keys of mask row `last[n]`; when `attention_mask` is the additive form an
    eager model reads (`alignkit.accel.cpu.shared_prompts.mask_for_attention`), pass the bool mask as `keys_mask`.

    Shapes:
        input_ids, position_ids: B×T; attention_mask: B×T or B×1×T×T; last, rows: N long; returns N
        (head dtype).
    """
    resolved = _backbone(model)
    if resolved is None:
        return None
    hf, backbone = resolved
    layer = backbone.layers[: hf.config.num_hidden_layers][-1]  # the last layer the HF forward runs

    def stop(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        raise _LastLayerInput(hidden, kwargs.get("position_embeddings"))

    handle = layer.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        raise RuntimeError("the last decoder layer was never called")  # pragma: no cover
    except _LastLayerInput as reached:
        hidden, rotary = reached.hidden, reached.position_embeddings
    finally:
        handle.remove()
    if rotary is None:
        rotary = backbone.rotary_emb(hidden, position_ids)
    rows = torch.arange(hidden.shape[0], device=hidden.device) if rows is None else rows
    if attention_mask.dim() == 4:
        keys_mask = attention_mask if keys_mask is None else keys_mask
        keys_seen = keys_mask[rows, 0, last].bool()[:, None, None, :]  # N×1×1×T: this read's keys
    else:
        keys_seen = attention_mask.bool()[rows][:, None, None, :]  # real tokens, all at or before `last`
    return _last_layer(layer, backbone, hf.score, hidden, rotary, keys_seen, rows, last)


def _last_layer(layer: Any, backbone: Any, head: torch.nn.Module, hidden: torch.Tensor, rotary: Any,
                keys_seen: torch.Tensor, rows: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The last decoder layer, final norm and head at (rows, last), keys and values over all columns."""
    attn = layer.self_attn
    (batch, width, _), reads = hidden.shape, rows.shape[0]
    head_dim, n_kv = attn.head_dim, attn.k_proj.out_features // attn.head_dim
    normed = layer.input_layernorm(hidden)  # B×T×H
    picked = normed[rows, last][:, None]  # N×1×H
    query = attn.q_proj(picked).view(reads, 1, -1, head_dim).transpose(1, 2)  # N×Hq×1×D
    key = attn.k_proj(normed).view(batch, width, n_kv, head_dim).transpose(1, 2)  # B×Hkv×T×D
    value = attn.v_proj(normed).view(batch, width, n_kv, head_dim).transpose(1, 2)
    cos, sin = (t.unsqueeze(1) for t in rotary)  # B×1×T×D
    cos_q, sin_q = cos[rows, :, last][:, :, None], sin[rows, :, last][:, :, None]  # N×1×1×D
    query = (query * cos_q + _rotate_half(query) * sin_q).to(key.dtype)
    key = (key * cos + _rotate_half(key) * sin).to(value.dtype)
    attend = partial(F.scaled_dot_product_attention, dropout_p=attn.attention_dropout if attn.training else 0.0,
                     scale=attn.scaling, enable_gqa=query.shape[1] != n_kv)
    if reads == batch and torch.equal(rows, torch.arange(batch, device=rows.device)):
        out = attend(query, key, value, attn_mask=keys_seen)  # N×Hq×1×D
    else:
        out = _grouped_reads(attend, query, key, value, keys_seen, rows)
    x = hidden[rows, last][:, None] + attn.o_proj(out.transpose(1, 2).reshape(reads, 1, -1))
    x = x + layer.mlp(layer.post_attention_layernorm(x))
    return head(backbone.norm(x))[:, 0, 0]


def _grouped_reads(attend: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   keys_seen: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Attention of N reads that share rows (sequences sharing a prompt's row) against their row's keys, uncopied.

    The reads of row g become query slots 0..k_g-1 of a B×Hq×k×D query (k the most reads of a row),
    each with its own mask row; empty slots see column 0 only (finite, never read).

    Shapes:
        query: N×Hq×1×D; key, value: B×Hkv×T×D; keys_seen: N×1×1×T; rows: N. returns N×Hq×1×D.
    """
    batch, reads = key.shape[0], rows.shape[0]
    order = torch.argsort(rows, stable=True)
    counts = torch.bincount(rows, minlength=batch)
    slot = torch.empty_like(rows)
    slot[order] = torch.arange(reads, device=rows.device) - (counts.cumsum(0) - counts)[rows[order]]
    slots = int(counts.max())
    grouped = query.new_zeros(batch, query.shape[1], slots, query.shape[3])
    grouped[rows, :, slot] = query[:, :, 0]
    mask = keys_seen.new_zeros(batch, 1, slots, keys_seen.shape[-1])
    mask[:, 0, :, 0] = True  # empty slots
    mask[rows, 0, slot] = keys_seen[:, 0, 0]
    return attend(grouped, key, value, attn_mask=mask)[rows, :, slot][:, :, None]  # N×Hq×1×D
