"""What each CPU trick of the `cpu` backend buys, on the bench model and on a model of SmolLM2-135M's shape.

    .venv/bin/python bench/tricks.py [--models bench,smollm2] [--repeats 5] [--output bench/results/tricks.json]

Each trick is timed against the `plain` path it replaces, in one process, interleaved (A, B, A, B,
...) after a warm-up, median of `--repeats`; both sides compute the same numbers (checked here to
float rounding), so only the time differs. Models are random, built from their configs:
`bench` = Llama hidden 256, 4 layers, 4 heads, vocab 4096 (the `make bench` model); `smollm2` =
SmolLM2-135M's config (hidden 576, 30 layers, 9 query / 3 key-value heads, intermediate 1536,
vocab 49152, tied embeddings). Shapes follow the bench: 8 rows, 16 prompt + 32 response tokens;
RL groups are 2 prompts x 4 samples. The glibc allocator setting is process-wide, so it is timed
in two child processes (an SFT-sized forward + backward + AdamW step, with `ALIGNKIT_MALLOC_KEEP`
1 and 0).

Tricks: the lean decoder with TorchScript (vs the same decoder as Python, vs the Hugging Face
forward with a StaticCache), oneDNN-reordered weights of a frozen model (no-grad forward),
prompt-packed rows (RL log-probs, DPO log-probs, reward scores: forward + backward), the
one-token reward read (reward scores, forward + backward), the allocator.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from alignkit.accel.cpu import CpuBackend
from alignkit.accel.plain import PlainBackend
from alignkit.rollout.generate import sample
from alignkit.rollout.logprobs import sequence_logprobs

BENCH_DIR = Path(__file__).resolve().parent
MODELS = {
    "bench": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                  intermediate_size=688, vocab_size=4096, tie_word_embeddings=False),
    "smollm2": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                    rms_norm_eps=1e-5),
}
PAD, BOS, EOS = 0, 1, 2
ROWS, PROMPT, RESPONSE, PROMPTS, SAMPLES = 8, 16, 32, 2, 4


def config(name: str, **extra: Any) -> LlamaConfig:
    return LlamaConfig(**MODELS[name], max_position_embeddings=256, pad_token_id=PAD, bos_token_id=BOS,
                       eos_token_id=EOS, attn_implementation="sdpa", **extra)


def timed(fn: Any, repeats: int, other: Any) -> tuple[float, float]:
    """Median seconds of `fn` and of `other`, interleaved after one warm-up each."""
    fn(), other()
    a, b = [], []
    for _ in range(repeats):
        for out, f in ((a, fn), (b, other)):
            t0 = time.perf_counter()
            f()
            out.append(time.perf_counter() - t0)
    return statistics.median(a), statistics.median(b)


def row(trick: str, model: str, what: str, cpu_s: float, plain_s: float, plain_name: str = "plain") -> dict:
    line = {"trick": trick, "model": model, "work": what, "cpu_ms": cpu_s * 1e3, f"{plain_name}_ms": plain_s * 1e3,
            "speedup": plain_s / cpu_s}
    print(f"  {trick:32s} {model:8s} {what:44s} {cpu_s * 1e3:9.1f} ms vs {plain_s * 1e3:9.1f} ms ({plain_name}): "
          f"{plain_s / cpu_s:5.2f}x", flush=True)
    return line


def prompts(gen: torch.Generator, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PROMPTS distinct prompts (the second left-padded by 3) repeated SAMPLES times: ROWS x PROMPT."""
    ids = torch.randint(3, vocab, (PROMPTS, PROMPT), generator=gen)
    ids[:, 0] = BOS
    mask = torch.ones(PROMPTS, PROMPT, dtype=torch.bool)
    ids[1, :3], mask[1, :3] = PAD, False
    ids[1, 3] = BOS
    return ids.repeat_interleave(SAMPLES, 0), mask.repeat_interleave(SAMPLES, 0)


def decode_tricks(name: str, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(config(name)).eval()
    ids, mask = prompts(torch.Generator().manual_seed(1), model.config.vocab_size)
    kwargs = dict(max_new_tokens=RESPONSE, min_new_tokens=RESPONSE, eos_token_id=EOS, pad_token_id=PAD)

    def run(backend: Any) -> Any:
        return lambda: sample(model, ids, mask, generator=torch.Generator().manual_seed(2), backend=backend, **kwargs)

    cpu, python, plain = CpuBackend(), CpuBackend(torchscript=False), PlainBackend()
    a, b = run(cpu)(), run(plain)()
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=1e-4)
    what = f"sample {ROWS} rows x {RESPONSE} tokens"
    out = [row("decoder + TorchScript", name, what, *timed(run(cpu), repeats, run(plain)))]
    out.append(row("TorchScript (vs same decoder in Python)", name, what, *timed(run(cpu), repeats, run(python)),
                   plain_name="python"))
    return out


def frozen_tricks(name: str, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    plain_model = LlamaForCausalLM(config(name)).eval().requires_grad_(False)
    model = LlamaForCausalLM(config(name)).eval()
    model.load_state_dict(plain_model.state_dict())
    CpuBackend().freeze(model)
    ids = torch.randint(3, model.config.vocab_size, (ROWS, PROMPT + RESPONSE), generator=torch.Generator().manual_seed(1))

    def forward(m: Any) -> Any:
        def go() -> Any:
            with torch.no_grad():
                return m(input_ids=ids).logits
        return go

    torch.testing.assert_close(forward(model)(), forward(plain_model)(), atol=1e-4, rtol=1e-4)
    return [row("oneDNN-reordered frozen weights", name, f"no-grad forward {ROWS} x {PROMPT + RESPONSE} tokens",
                *timed(forward(model), repeats, forward(plain_model)))]


def _rollout(name: str) -> tuple[Any, Any]:
    from alignkit.rollout.types import Rollout

    torch.manual_seed(0)
    model = LlamaForCausalLM(config(name))
    ids, mask = prompts(torch.Generator().manual_seed(1), model.config.vocab_size)
    resp = torch.randint(3, model.config.vocab_size, (ROWS, RESPONSE), generator=torch.Generator().manual_seed(3))
    rmask = torch.ones(ROWS, RESPONSE, dtype=torch.bool)
    rollout = Rollout(prompt_ids=ids, prompt_mask=mask, response_ids=resp, response_mask=rmask,
                      logprobs=torch.zeros(ROWS, RESPONSE), ends_with_eos=torch.zeros(ROWS, dtype=torch.bool),
                      lengths=rmask.sum(1), entropy=None)
    return model, rollout


def rl_packing(name: str, repeats: int) -> list[dict]:
    model, rollout = _rollout(name)

    def step(backend: Any) -> Any:
        def go() -> None:
            model.zero_grad(set_to_none=True)
            sequence_logprobs(model, rollout, backend=backend).sum().backward()
        return go

    torch.testing.assert_close(sequence_logprobs(model, rollout, backend=CpuBackend()),
                               sequence_logprobs(model, rollout, backend=PlainBackend()), atol=1e-4, rtol=1e-4)
    return [row("packed prompt rows (RL log-probs)", name, f"fwd+bwd {PROMPTS} prompts x {SAMPLES} samples",
                *timed(step(CpuBackend()), repeats, step(PlainBackend())))]


def reward_tricks(name: str, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config(name, num_labels=1))
    gen = torch.Generator().manual_seed(1)
    width = PROMPT + RESPONSE
    # 4 pairs (8 rows) that share their prompt within a pair, right-padded to their lengths
    ids = torch.randint(3, model.config.vocab_size, (ROWS, width), generator=gen)
    ids[:, 0] = BOS
    ids[1::2, :PROMPT] = ids[0::2, :PROMPT]
    mask = torch.ones(ROWS, width, dtype=torch.long)
    index = torch.arange(ROWS).view(-1, 2)

    def step(backend: Any, groups: Any) -> Any:
        def go() -> None:
            model.zero_grad(set_to_none=True)
            backend.group_scores(model, ids, mask, groups).sum().backward()
        return go

    cpu, plain = CpuBackend(), PlainBackend()
    torch.testing.assert_close(cpu.group_scores(model, ids, mask, index), plain.group_scores(model, ids, mask, index),
                               atol=1e-4, rtol=1e-4)
    what = f"fwd+bwd {ROWS // 2} pairs x {width} tokens"
    return [row("one-token reward read", name, what, *timed(step(cpu, None), repeats, step(plain, None))),
            row("packed pairs + one-token read", name, what, *timed(step(cpu, index), repeats, step(plain, index)))]


ALLOCATOR_CHILD = """
import os, statistics, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
import sys; sys.path.insert(0, {bench!r})
from tricks import config
from alignkit.accel.cpu import CpuBackend
torch.set_num_threads(2)
CpuBackend.from_environment().prepare_process()
torch.manual_seed(0)
model = LlamaForCausalLM(config({name!r}))
opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
ids = torch.randint(3, model.config.vocab_size, (8, 48))
times = []
for i in range(12):
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t0)
print(statistics.median(times[2:]))
"""


def allocator(name: str, repeats: int) -> list[dict]:
    def child(keep: str) -> float:
        env = dict(os.environ, ALIGNKIT_MALLOC_KEEP=keep, OMP_NUM_THREADS="2")
        code = ALLOCATOR_CHILD.format(bench=str(BENCH_DIR), name=name)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])

    on, off = [], []
    for _ in range(max(1, repeats // 2)):
        on.append(child("1"))
        off.append(child("0"))
    return [row("glibc keeps freed memory", name, "SFT step fwd+bwd+AdamW 8 x 48 tokens",
                statistics.median(on), statistics.median(off), plain_name="glibc_default")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="bench,smollm2")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--output", default=str(BENCH_DIR / "results" / "tricks.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    rows: list[dict] = []
    for name in args.models.split(","):
        print(f"tricks: model {name}", flush=True)
        for fn in (decode_tricks, frozen_tricks, rl_packing, reward_tricks, allocator):
            rows += fn(name, args.repeats)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"rows": rows, "threads": 2, "repeats": args.repeats}, indent=1))
    print(f"tricks: wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
