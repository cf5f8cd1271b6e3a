"""Batched sampling with a preallocated KV cache, and prompt tokenization.

`sample` is alignkit's own decoding loop (faster than `model.generate` for RL-sized batches, see
`bench/generate_speed.py`): prompts are left-padded, positions are cumsum(mask) - 1 so padding does
not shift them, the KV cache is preallocated for prompt + max_new_tokens by the acceleration
backend's decoder (`alignkit.accel`: a `transformers.StaticCache`, or the CPU backend's lean
decoder), and tokens are drawn by inverting the CDF (B uniforms per step instead of
`torch.multinomial`'s B×V exponentials, the largest saving on CPU). Every random draw uses the
caller's `torch.Generator`, so a seed fixes the token ids. `alignkit.rollout.logprobs.sequence_logprobs`
recomputes the recorded log-probs with one forward pass over prompt + response, as a trainer does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from functools import partial
from itertools import dropwhile

import torch

from alignkit.accel import Backend, resolve
from alignkit.data.tokenize import render
from alignkit.ops.masking import mask_positions
from alignkit.rollout.sampling import draw_token
from alignkit.rollout.types import Rollout


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """The ids that end a response: the tokenizer's EOS and every id of the model's generation config.

    Chat models often end a turn with a token other than the tokenizer's EOS and list several in
    `generation_config.eos_token_id` (e.g. `<|im_end|>`, `<end_of_turn>`, `<|eot_id|>`); sampling stops
    at any of them, and the response mask (hence the reward and KL index) ends at the first.
    """
    ids = [tokenizer.eos_token_id]
    config = getattr(model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    ids += list(extra) if isinstance(extra, (list, tuple)) else [extra]
    return list(dict.fromkeys(i for i in ids if i is not None))


def tokenize_prompts(
    tokenizer, prompts: list[str | list[dict[str, str]]], *, chat: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize prompts for generation: left-padded ids and mask, exactly one leading BOS.

    A conversation prompt (a list of `{role, content}` messages, TRL's conversational prompt-only
    format) is rendered by the tokenizer's chat template with the generation prompt appended; with
    `chat=True` so is each string prompt, as one user message. The BOS rule: when the tokenizer has a BOS distinct from its
    EOS, each row starts with exactly one BOS (added if missing, duplicates from a template that
    writes its own BOS removed); tokenizers without a BOS (or with BOS == EOS, like GPT-2) get none.

    Shapes:
        returns: (prompt_ids B×P long, left-padded with the pad id; prompt_mask B×P bool).
    """
    texts = [
        p if isinstance(p, str) and not chat else render(
            tokenizer, [{"role": "user", "content": p}] if isinstance(p, str)
            else [{"role": m["role"], "content": m["content"]} for m in p], add_generation_prompt=True)
        for p in prompts
    ]
    rows = tokenizer(texts, add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and bos != tokenizer.eos_token_id:
        rows = [[bos, *dropwhile(lambda t: t == bos, row)] for row in rows]
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = True
    return ids, mask


def sample(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    generator: torch.Generator | None = None,
    min_new_tokens: int = 0,
    backend: Backend | None = None,
) -> Rollout:
    """Sample responses to left-padded prompts with a preallocated KV cache.

    At step t each row draws y_t ~ softmax(filter(logits_t / temperature)), where `filter` applies
    min-new-tokens (EOS removed while t < `min_new_tokens`), top-k and top-p. The recorded log-prob is
    log softmax(logits_t / temperature)[y_t] *without* the filters, the distribution a trainer
    recomputes (see `Rollout.logprobs`). After a row's first EOS it receives pad tokens (masked);
    the loop stops when every row has produced EOS or after `max_new_tokens` steps. Greedy decoding
    is `top_k=1`. The model runs in eval mode (dropout off) and its previous mode is restored.

    Args:
        model: A causal LM (`PreTrainedModel` or peft wrapper) whose config supports `StaticCache`.
        prompt_ids: B×P long, left-padded (from `tokenize_prompts`).
        prompt_mask: B×P bool (or 0/1), True on real prompt tokens; each row has at least one.
        max_new_tokens: Maximum response length R_max >= 1.
        temperature: Softmax temperature > 0.
        top_k: Keep the k most likely tokens (0: off).
        top_p: Nucleus probability mass in (0, 1] (1: off).
        eos_token_id: Id (or ids) that end a response.
        pad_token_id: Id written after EOS.
        generator: Source of every random draw; the same seed gives the same token ids.
        min_new_tokens: EOS is not sampled before this many tokens.
        backend: The acceleration backend that decodes (default: `alignkit.accel.resolve()`).

    Returns:
        A `Rollout`; R is the number of steps run (<= `max_new_tokens`).
    """
    if max_new_tokens < 1 or temperature <= 0 or not 0 < top_p <= 1:
        raise ValueError(
            f"need max_new_tokens >= 1, temperature > 0, 0 < top_p <= 1; got "
            f"{max_new_tokens}, {temperature}, {top_p}"
        )
    prompt_mask = prompt_mask.to(torch.bool)
    if not prompt_mask[:, -1].all():
        # A right-padded prompt would be continued from its pad: the classic silent generation bug.
        raise ValueError("prompts must be left-padded: the last column of prompt_mask must be all True")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            draw = partial(draw_token, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            lengths = (max_new_tokens, min_new_tokens)
            rollout = _sample_loop(model, prompt_ids, prompt_mask, draw, lengths, eos_token_id, pad_token_id,
                                   backend or resolve())
    finally:
        model.train(was_training)
    # Inference-mode tensors cannot enter autograd; trainers use these ids in a forward with gradients.
    return Rollout(**{f.name: getattr(rollout, f.name).clone() for f in fields(rollout)})


def _sample_loop(model, prompt_ids, prompt_mask, draw, lengths, eos_token_id, pad_token_id, backend) -> Rollout:
    """The decoding loop of `sample` (in inference mode); `draw` is `draw_token` with the sampling options."""
    max_new_tokens, min_new_tokens = lengths
    device = prompt_ids.device
    (batch, width_p), width = prompt_ids.shape, prompt_ids.shape[1] + max_new_tokens
    eos = torch.as_tensor(eos_token_id, device=device).reshape(-1)
    key_mask = torch.zeros(batch, width, dtype=torch.bool, device=device)  # B×(P+R_max)
    key_mask[:, :width_p] = prompt_mask
    prefill, step_logits = backend.decoder(model, prompt_ids, prompt_mask, key_mask, width)
    positions = mask_positions(prompt_mask)  # B×P
    logits = prefill(positions)
    next_pos = positions[:, -1] + 1  # B: position of the first response token
    tokens, logprobs, entropies = [], [], []
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    n_done = 0  # rows done before this step (a Python int: the loop's one sync per step)
    for step in range(max_new_tokens):
        block_eos = eos if step < min_new_tokens else None
        token, logprob, entropy = draw(logits, block_eos)
        ended = torch.isin(token, eos)
        if n_done:  # rows that ended before get pad tokens, log-prob and entropy 0 (none: nothing to mask)
            token, logprob, entropy = (torch.where(done, fill, x) for fill, x in
                                       ((pad_token_id, token), (0.0, logprob), (0.0, entropy)))
        tokens.append(token)
        logprobs.append(logprob)
        entropies.append(entropy)
        key_mask[:, width_p + step] = ~done if n_done else True
        done = done | ended
        n_done = int(done.sum())
        if n_done == batch or step == max_new_tokens - 1:
            break
        logits = step_logits(tokens[-1], next_pos, width_p + step)
        next_pos = next_pos + 1
    response_mask = key_mask[:, width_p : width_p + len(tokens)].clone()  # B×R
    response_ids = torch.stack(tokens, dim=1)
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        logprobs=torch.stack(logprobs, dim=1),
        ends_with_eos=(torch.isin(response_ids, eos) & response_mask).any(dim=1),
        lengths=response_mask.sum(dim=1),
        entropy=torch.stack(entropies, dim=1),
    )
