"""Micro-benchmark: tokens/s of alignkit's `sample` against `model.generate(do_sample=True)`.

A randomly initialised Llama (hidden 256, 4 layers, vocab 4096), batch 64, prompts of 6-10 tokens
(left-padded), 24 new tokens, plain sampling at temperature 1. Runs are interleaved (ours, theirs,
ours, ...) after one warm-up each, so drift in machine load hits both. EOS is set to an id the model
cannot produce early (min_new_tokens = max_new_tokens), so both produce exactly B × 24 tokens.

    .venv/bin/python bench/generate_speed.py [--repeats 3] [--batch 64] [--new-tokens 24] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alignkit.rollout.generate import sample

PAD, BOS, EOS = 0, 1, 2


def build_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=688,
        vocab_size=4096,
        max_position_embeddings=512,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    return LlamaForCausalLM(config).eval()


def build_prompts(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts of 6..10 tokens (BOS first), B×10 ids and mask."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(6, 11, (batch,), generator=g)
    ids = torch.full((batch, 10), PAD, dtype=torch.long)
    mask = torch.zeros((batch, 10), dtype=torch.bool)
    for i, n in enumerate(lengths.tolist()):
        ids[i, 10 - n :] = torch.cat([torch.tensor([BOS]), torch.randint(3, 4096, (n - 1,), generator=g)])
        mask[i, 10 - n :] = True
    return ids, mask


def run_ours(model, ids, mask, new_tokens: int, seed: int) -> int:
    rollout = sample(
        model,
        ids,
        mask,
        max_new_tokens=new_tokens,
        eos_token_id=EOS,
        pad_token_id=PAD,
        generator=torch.Generator().manual_seed(seed),
        min_new_tokens=new_tokens,
    )
    return rollout.response_ids.numel()


def run_hf(model, ids, mask, new_tokens: int, seed: int) -> int:
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask.long(),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            eos_token_id=EOS,
            pad_token_id=PAD,
        )
    return out[:, ids.shape[1] :].numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model()
    ids, mask = build_prompts(args.batch)
    runners = {"alignkit sample": run_ours, "HF generate": run_hf}
    for run in runners.values():  # warm-up (lazy imports, allocator)
        run(model, ids, mask, args.new_tokens, seed=0)
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for repeat in range(args.repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            n_tokens = run(model, ids, mask, args.new_tokens, seed=repeat + 1)
            rates[name].append(n_tokens / (time.perf_counter() - start))
    print(f"batch {args.batch}, prompt <=10, {args.new_tokens} new tokens, threads {torch.get_num_threads()}")
    for name, values in rates.items():
        runs = ", ".join(f"{v:,.0f}" for v in values)
        print(f"{name:>16}: median {sorted(values)[len(values) // 2]:,.0f} tok/s  (runs: {runs})")


if __name__ == "__main__":
    main()
