"""Each RL algorithm (ppo, a2c, reinforce, rloo, grpo) learns a tiny bandit via `alignkit.trainers.rl.run`.

The task: three one-token prompts, responses of at most 2 tokens, and a hand-built reward model that
pays for *target* tokens (a fixed set of ~28% of the vocabulary). The reward model is a 1-layer Llama
sequence classifier whose weights are set by hand:

    embedding  e_t = (1[t in target], 1, 0, 0)       (a flag dimension and a constant one)
    attention  q = k = 0: uniform over the sequence;  v, o copy the flag dimension to the residual
    MLP        0
    head       reads the flag dimension at the last token (the EOS the scorer appends)

so the score of [BOS, x, y, EOS] is an increasing function of the fraction of target tokens in it,
and the prompts hold none. The tiny random policy starts with P(first response token in target)
~0.27; after 20 RL steps every algorithm puts > 0.6 on the target set (measured from the logits of
the saved `final/` model), and the reward it sampled during training rose.

Power: the same run with the reward model's head negated drives P(target) *down* (below half its
start) for every algorithm, so a flipped advantage or loss sign fails `test_rl_learns_the_bandit`.
Negating the advantages inside the trainer (a scratch monkeypatch of every `ALGORITHMS[...].targets`,
or the whole loss) gives P(target) < 0.05 for all five, as the negated reward does here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from alignkit.config import DataConfig, ModelConfig, OptimConfig, RunConfig, SamplingConfig
from alignkit.trainers import rl
from alignkit.trainers.rl_config import (
    A2CConfig,
    GRPOConfig,
    KLConfig,
    PPOConfig,
    ReinforceConfig,
    RewardSourceConfig,
    RLOOConfig,
)

PROMPTS = ["The", "I", "A"]  # one token each after the BOS
CONFIGS = {"ppo": PPOConfig, "a2c": A2CConfig, "reinforce": ReinforceConfig, "rloo": RLOOConfig,
           "grpo": GRPOConfig}
STEPS = 20


@dataclass(frozen=True)
class Bandit:
    policy: Path
    reward: Path
    negated_reward: Path
    prompts: Path
    targets: list[int]


def round_trip_tokens(tokenizer) -> list[int]:
    """The tokens that decode to text which re-encodes to that token alone (so the scorer sees the sampled
    token), but the prompts' tokens and the special tokens."""
    prompt_ids = {t for p in PROMPTS for t in tokenizer(p)["input_ids"]}
    return [t for t in range(len(tokenizer))
            if (text := tokenizer.decode([t], skip_special_tokens=True))
            and tokenizer.encode(text, add_special_tokens=False) == [t] and t not in prompt_ids]


def save_bandit_reward_model(tokenizer, targets: list[int], sign: float, out: Path) -> Path:
    """A 1-layer Llama classifier scoring sign * (fraction of target tokens), weights set by hand."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(hidden_size=4, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                         intermediate_size=4, vocab_size=len(tokenizer), max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, num_labels=1)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0 if "norm" in name else 0.0)  # RMSNorm gains 1, everything else 0
        embed = model.model.embed_tokens.weight
        embed[:, 1] = 1.0  # constant dimension: every token has the same norm but for its flag
        embed[targets, 0] = 1.0  # flag dimension
        attn = model.model.layers[0].self_attn  # q = k = 0: uniform attention over the sequence
        attn.v_proj.weight[0, 0] = 1.0
        attn.o_proj.weight[0, 0] = 1.0
        model.score.weight[0, 0] = sign
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small gain nothing from a second thread, and two threads on busy shared cores can take
    ten times longer (spinning intra-op workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bandit(tmp_path_factory, tiny_llama_dir) -> Bandit:
    from transformers import AutoTokenizer

    from alignkit.rollout.score import load_scorer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    round_trip = round_trip_tokens(tokenizer)
    targets, others = round_trip[::2], round_trip[1::2]  # every other one is rewarded
    assert 0.2 < len(targets) / len(tokenizer) < 0.35
    root = tmp_path_factory.mktemp("rl_bandit")
    reward = save_bandit_reward_model(tokenizer, targets, 1.0, root / "rm")
    negated = save_bandit_reward_model(tokenizer, targets, -1.0, root / "rm_negated")
    # The reward model does what it is built for: a target token scores above a non-target one.
    responses = [[targets[0], targets[1]], [targets[0]], [others[0], targets[1]], [others[0]], []]
    scores = load_scorer(str(reward))(["The"] * 5, tokenizer.batch_decode(responses)).tolist()
    assert scores[0] > scores[1] > scores[2] > scores[3] + 0.1 and scores[3] == pytest.approx(scores[4])
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS * 8))
    return Bandit(tiny_llama_dir, reward, negated, prompts, targets)


def p_target(model_dir: Path, targets: list[int]) -> float:
    """P(first response token in `targets`) under a saved policy, averaged over the prompts (temperature 1)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        probs = [model(torch.tensor([tokenizer(p)["input_ids"]])).logits[0, -1].float().softmax(-1)[targets].sum()
                 for p in PROMPTS]
    return float(torch.stack(probs).mean())


def train(algorithm: str, reward: Path, bandit: Bandit, out: Path) -> tuple[float, list[float]]:
    """Run the stage; (P(target) of `final/`, the mean sampled reward of each step)."""
    cfg = CONFIGS[algorithm](
        run=RunConfig(output_dir=str(out), seed=0, log_every=1, progress=False),  # trackers: the defaults
        model=ModelConfig(name_or_path=str(bandit.policy)),
        data=DataConfig(path=str(bandit.prompts), eval_fraction=0.0),
        optim=OptimConfig(lr=1e-2, scheduler="constant", max_steps=STEPS, per_device_batch_size=32,
                          max_grad_norm=1.0),
        reward=RewardSourceConfig(model=str(reward)),
        kl=KLConfig(coef=1e-3, adaptive=False),
        prompts_per_step=8, samples_per_prompt=4, sampling=SamplingConfig(max_new_tokens=2), eval_prompts=0,
    )  # each algorithm keeps its own epochs / minibatches (PPO: 4 x 4; the others: 1 x 1)
    rl.run(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward/model"] for r in rows if "reward/model" in r]
    assert len(rewards) == STEPS
    return p_target(out / "final", bandit.targets), rewards


@pytest.mark.parametrize("algorithm", list(CONFIGS))
def test_rl_learns_the_bandit(tmp_path, bandit, algorithm):
    before = p_target(bandit.policy, bandit.targets)
    assert 0.2 < before < 0.35  # the random policy is near uniform
    after, rewards = train(algorithm, bandit.reward, bandit, tmp_path / algorithm)
    assert after > 0.6 and after > before + 0.3, f"{algorithm}: P(target) {before:.3f} -> {after:.3f}"
    late = sum(rewards[-3:]) / 3
    assert late > 2 * rewards[0], f"{algorithm}: sampled reward {rewards[0]:.3f} -> {late:.3f}"


@pytest.mark.parametrize("algorithm", list(CONFIGS))
def test_a_negated_reward_is_avoided(tmp_path, bandit, algorithm):
    """The negative control: with the reward's sign flipped the same run unlearns the target tokens, so the
    assertions above fail for a trainer that climbs the wrong way."""
    before = p_target(bandit.policy, bandit.targets)
    after, rewards = train(algorithm, bandit.negated_reward, bandit, tmp_path / algorithm)
    assert after < before / 2, f"{algorithm}: P(target) {before:.3f} -> {after:.3f}"
    assert sum(rewards[-3:]) / 3 > rewards[0]  # it still climbs its own (negated) reward
