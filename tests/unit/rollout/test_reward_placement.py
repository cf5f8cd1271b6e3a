"""Reward placement (the score lands on the EOS, never a pad), score shaping, RL targets, values, eval."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import build_tiny_llama, build_tiny_tokenizer

from alignkit.losses.kl import kl_penalized_rewards
from alignkit.losses.rl_algorithms import ALGORITHMS, group_targets, rloo_targets
from alignkit.models.value_head import ValueModel
from alignkit.rollout.evaluate import distinct_n, sequence_kl
from alignkit.rollout.generate import sample, tokenize_prompts
from alignkit.rollout.logprobs import response_values
from alignkit.rollout.rewards import ScoreNormalizer, score_index, shape_scores

PROMPTS = ["The quick brown fox", "I loved", "Terrible film. I hated every minute", "What"] * 3


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def eos_heavy_rollout(tokenizer):
    """A rollout where some rows end with EOS early (then pads) and some are cut at max_new_tokens."""
    model = build_tiny_llama(len(tokenizer), tie_word_embeddings=False).eval()
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] *= 0
        bias = torch.zeros(len(tokenizer))
        bias[tokenizer.eos_token_id] = 3.0
        model.lm_head.bias = torch.nn.Parameter(bias)
    ids, mask = tokenize_prompts(tokenizer, PROMPTS)
    rollout = sample(model, ids, mask, max_new_tokens=10, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(3))
    assert rollout.ends_with_eos.any() and not rollout.ends_with_eos.all(), "need both kinds of rows"
    assert (~rollout.response_mask).any(), "need pads after an EOS"
    return rollout


def test_reward_index_is_the_eos_index(eos_heavy_rollout, tokenizer):
    r = eos_heavy_rollout
    index = score_index(r.response_ids, r.response_mask)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for row in range(r.batch_size):
        ids = r.response_ids[row].tolist()
        if r.ends_with_eos[row]:
            assert index[row] == ids.index(eos)  # the first (only) EOS
        else:
            assert index[row] == r.response_ids.shape[1] - 1 and ids[index[row]] != pad
        assert r.response_mask[row, index[row]]  # never a pad
    assert torch.equal(index, r.response_last_index())


def test_kl_shaped_rewards_put_the_score_on_the_eos(eos_heavy_rollout):
    r = eos_heavy_rollout
    mask = r.response_mask
    scores = torch.arange(1.0, r.batch_size + 1.0)
    ref_logprobs = r.logprobs - 0.1 * mask  # log pi - log pi_ref = 0.1 on every response token
    rewards, metrics = kl_penalized_rewards(scores, r.logprobs, ref_logprobs, mask, kl_coef=0.5,
                                            last_index=score_index(r.response_ids, mask))
    penalty = torch.where(mask, torch.full_like(rewards, -0.05), 0.0)
    placed = rewards - penalty  # what is left is the score, at exactly one column per row
    for row in range(r.batch_size):
        nonzero = placed[row].abs() > 1e-6
        assert nonzero.sum() == 1
        col = int(nonzero.nonzero())
        assert placed[row, col] == pytest.approx(scores[row].item(), abs=1e-5)
        assert mask[row, col] and (r.response_ids[row, col] == 2) == bool(r.ends_with_eos[row])
    assert (rewards[~mask] == 0).all()  # nothing on pads
    torch.testing.assert_close(metrics["objective/kl"], (0.1 * mask.sum(1).float()).mean())


def test_score_index_hand_built_and_empty_row_refused():
    ids = torch.tensor([[5, 6, 2, 0], [5, 6, 7, 8], [2, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    assert score_index(ids, mask).tolist() == [2, 3, 0]
    with pytest.raises(ValueError, match="at least one token"):
        score_index(ids, torch.zeros_like(mask))


def test_shape_scores_normalise_eos_trick_clip():
    norm = ScoreNormalizer("initial")
    raw = torch.tensor([0.0, 1.0, 2.0, 3.0])
    eos = torch.tensor([True, True, False, True])
    scores, metrics = shape_scores(raw, eos, normalizer=norm, missing_eos_penalty=-1.0, clip=1.2)
    z = (raw - raw.mean()) / raw.std(unbiased=False)
    expected = torch.where(eos, z, torch.tensor(-1.0)).clamp(-1.2, 1.2)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    assert metrics["reward/clipfrac"] == pytest.approx(0.5)  # |z| = 1.34 for the first and last
    # "initial": the statistics of the first batch stay fixed.
    again, _ = shape_scores(raw + 10, torch.ones(4, dtype=torch.bool), normalizer=norm)
    torch.testing.assert_close(again, z + 10 / raw.std(unbiased=False), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="non-finite"):
        shape_scores(torch.tensor([float("nan")]), torch.ones(1, dtype=torch.bool), normalizer=norm)


def test_running_normalizer_equals_whole_data_moments_and_round_trips():
    torch.manual_seed(0)
    batches = [torch.randn(n) * 3 + 1 for n in (5, 8, 3)]
    norm = ScoreNormalizer("running")
    for b in batches:
        norm.update(b)
    data = torch.cat(batches).double()
    assert norm.mean == pytest.approx(float(data.mean()))
    assert norm.var == pytest.approx(float(data.var(unbiased=False)))
    copy = ScoreNormalizer("running")
    copy.load_state_dict(norm.state_dict())
    torch.testing.assert_close(copy(batches[0]), norm(batches[0]))
    assert torch.equal(ScoreNormalizer("none")(batches[0]), batches[0])


def test_rloo_targets_equal_plain_leave_one_out_of_sequence_rewards():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    rewards = torch.where(mask, torch.randn(4, 3), 0.0)
    adv, _ = rloo_targets(rewards, None, None, mask, gamma=1.0, lam=1.0, k=2, whiten=False)
    seq = rewards.sum(1)
    for p in range(2):
        for i in range(2):
            row, other = 2 * p + i, 2 * p + (1 - i)
            assert torch.allclose(adv[row][mask[row]], seq[row] - seq[other])
            assert (adv[row][~mask[row]] == 0).all()
    scores = torch.tensor([1.0, 3.0, 2.0, 2.0])
    group, _ = group_targets(rewards, None, scores, mask, gamma=1.0, lam=1.0, k=2, whiten=False)
    assert group[0, 0] < 0 < group[1, 0] and (group[2:] == 0).all()  # equal scores: no signal


def test_every_algorithm_gives_finite_losses_and_gradients():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    rewards, old_values = torch.randn(4, 4), torch.randn(4, 4)
    scores = torch.randn(4)
    old = torch.randn(4, 4).clamp(max=-0.1)
    for name, algo in ALGORITHMS.items():
        adv, ret = algo.targets(rewards, old_values, scores, mask, gamma=1.0, lam=0.95, k=2, whiten=True)
        logprobs = (old + 0.05).requires_grad_(True)
        values = old_values.clone().requires_grad_(True)
        batch = {"old_logprobs": old, "ref_logprobs": old - 0.1, "advantages": adv, "returns": ret,
                 "old_values": old_values, "response_mask": mask}
        loss, metrics = algo.loss(logprobs, values if algo.critic else None, batch, cliprange=0.2,
                                  cliprange_value=0.2, value_coef=0.5, kl_coef=0.1)
        loss.backward()
        assert torch.isfinite(loss) and "loss/policy" in metrics, name
        assert logprobs.grad[~mask].abs().sum() == 0, name  # pads get no gradient
        assert (values.grad is not None) == algo.critic, name


def test_response_values_batched_left_padded_equal_unbatched(tokenizer):
    lm = build_tiny_llama(len(tokenizer))
    head = torch.nn.Linear(32, 1)
    value = ValueModel(lm.model, head).eval()
    ids, mask = tokenize_prompts(tokenizer, PROMPTS[:4])
    rollout = sample(lm.eval(), ids, mask, max_new_tokens=6, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        batched = response_values(value, rollout)
        for row in range(rollout.batch_size):
            single = rollout.select([row])
            keep = single.prompt_mask[0]  # drop the left padding entirely
            single.prompt_ids, single.prompt_mask = single.prompt_ids[:, keep], single.prompt_mask[:, keep]
            torch.testing.assert_close(response_values(value, single)[0], batched[row], atol=1e-5, rtol=0)


def test_sequence_kl_zero_for_same_model_and_positive_otherwise(tokenizer):
    policy = build_tiny_llama(len(tokenizer), seed=0).eval()
    other = build_tiny_llama(len(tokenizer), seed=1).eval()
    ids, mask = tokenize_prompts(tokenizer, PROMPTS[:4])
    rollout = sample(policy, ids, mask, max_new_tokens=5, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(0))
    exact, k1 = sequence_kl(policy, policy, rollout)
    assert exact.abs().max() < 1e-5 and k1.abs().max() < 1e-5
    exact, _ = sequence_kl(policy, other, rollout)
    assert (exact > 0).all()


def test_distinct_n_plain_definition():
    assert distinct_n([[1, 2, 1, 2], [1, 2]], 1) == 2 / 6
    assert distinct_n([[1, 2, 1, 2], [1, 2]], 2) == 2 / 4  # (1,2), (2,1)
    assert distinct_n([[1]], 2) == 0.0


def test_normaliser_learns_from_the_whole_batch_across_processes():
    # This process holds [1, 3]; the other one [5, 7]. By hand: mean 4, variance (9 + 1 + 1 + 9) / 4 = 5.
    norm = ScoreNormalizer("initial", eps=0.0)
    scores, _ = shape_scores(torch.tensor([1.0, 3.0]), torch.tensor([True, True]), normalizer=norm,
                             batch_raw=torch.tensor([1.0, 3.0, 5.0, 7.0]))
    assert norm.state_dict() == {"mode": "initial", "count": 4.0, "mean": 4.0, "var": 5.0}
    torch.testing.assert_close(scores, torch.tensor([-3.0, -1.0]) / 5.0**0.5)
    assert not norm.learns  # frozen after its first batch: the trainer stops gathering
    with pytest.raises(ValueError, match="non-finite"):  # another process's NaN stops this one too
        shape_scores(torch.tensor([1.0]), torch.tensor([True]), normalizer=ScoreNormalizer("running"),
                     batch_raw=torch.tensor([1.0, float("nan")]))
