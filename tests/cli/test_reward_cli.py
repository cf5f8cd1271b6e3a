"""`alignkit reward` end to end: learning a preference, normalised saved model, ensembles, losses by record kind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PY = sys.executable
GOOD = [" it was great and wonderful!", " a beautiful, moving story.", " the actors were great!"]
BAD = [" terrible. I hated it.", " I hated every minute.", " terrible film, rushed."]
PROMPTS = ["The movie", "I think", "What a", "The plot", "This film", "Honestly"]


def cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "alignkit.cli", *args], capture_output=True, text=True, timeout=300)


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reward_data")
    pref = [{"prompt": p, "chosen": GOOD[i % 3], "rejected": BAD[(i + j) % 3]}
            for i, p in enumerate(PROMPTS) for j in range(3)]
    choice = [{"prompt": p, "responses": [BAD[i % 3], GOOD[i % 3], BAD[(i + 1) % 3]], "best": 1}
              for i, p in enumerate(PROMPTS)]
    gold = [{"prompt": p, "response": r, "score": float(r in GOOD)} for p in PROMPTS[:3] for r in GOOD + BAD]
    steps = [{"prompt": p, "steps": [" I loved it.", " It was bad."], "labels": [1.0, -1.0]} for p in PROMPTS]
    return {"pref": _write(root / "pref.jsonl", pref), "choice": _write(root / "choice.jsonl", choice),
            "gold": _write(root / "gold.jsonl", gold), "steps": _write(root / "steps.jsonl", steps)}


def _args(model: Path, data_path: Path, out: Path, *extra: str) -> list[str]:
    return ["reward", "--model.name_or_path", str(model), "--data.path", str(data_path), "--output-dir", str(out),
            "--data.eval_fraction", "0.2", "--optim.per_device_batch_size", "4", "--optim.lr", "3e-3",
            "--optim.warmup_steps", "2", "--optim.max_steps", "25", "--run.log_every", "5",
            "--run.report_to", "[]", "--run.progress", "false", *extra]


def test_reward_learns_preferences_and_saves_a_normalised_model(tmp_path, tiny_llama_dir, data):
    out = tmp_path / "rm"
    res = cli(_args(tiny_llama_dir, data["pref"], out, "--gold_eval_path", str(data["gold"])))
    assert res.returncode == 0, res.stderr
    assert "examples per optimizer step" in res.stdout and "normalisation samples" in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval/pairwise_accuracy"] >= 0.75 and summary["eval/spearman_gold"] > 0.5
    assert 0 <= summary["eval/calibration_error"] <= 1
    assert summary["normalization"]["bias_folded_into_head"] is False
    from alignkit.rollout.score import load_scorer
    from alignkit.trainers.reward import RewardConfig, normalization_rows

    scorer = load_scorer(out / "final")
    cfg = RewardConfig()
    records = [json.loads(line) for line in data["pref"].read_text().splitlines()]
    rows = normalization_rows(cfg, records, scorer.tokenizer)
    pairs = {(r["prompt"], v): None for r in records for v in (r["chosen"], r["rejected"])}
    scores = scorer([p for p, _ in pairs], [v for _, v in pairs])
    assert len(rows) == len(pairs)
    # the normalisation samples are the training responses: mean 0 / std 1 there (the split is part of them)
    assert abs(scores.mean().item()) < 0.5 and 0.5 < scores.std(unbiased=False).item() < 1.5
    from transformers import AutoModelForSequenceClassification

    from alignkit.data.collate import right_pad
    from alignkit.data.reward_groups import encode_scored
    from alignkit.models.reward_model import reward_scores

    texts = list(pairs)[:4]
    ids, mask = right_pad([encode_scored(scorer.tokenizer, p, r, 0) for p, r in texts], scorer.tokenizer.pad_token_id)
    with torch.no_grad():
        ours = reward_scores(scorer.model, ids, mask, apply_bias=True)
        exact = AutoModelForSequenceClassification.from_pretrained(out / "final", trust_remote_code=True).eval()
        assert type(exact).__name__ == "NormalizedRewardModel"
        torch.testing.assert_close(exact(input_ids=ids, attention_mask=mask).logits[:, 0], ours, atol=1e-5, rtol=0)
        assert reward_scores(exact, ids, mask, apply_bias=True).allclose(ours, atol=1e-5)  # the bias is not added twice
        # the default (no remote code) is the plain Llama classifier: the normalised score minus reward_bias
        plain = AutoModelForSequenceClassification.from_pretrained(out / "final").eval()
        assert type(plain).__name__ == "LlamaForSequenceClassification" and plain.config.num_labels == 1
        bias = json.loads((out / "final/config.json").read_text())["reward_bias"]
        torch.testing.assert_close(plain(input_ids=ids, attention_mask=mask).logits[:, 0] + bias, ours,
                                   atol=1e-5, rtol=0)
        # the README's recipe for plain transformers: prompt and response tokenized apart, then EOS
        tok = scorer.tokenizer
        for (prompt, response), score in zip(texts, ours, strict=True):
            readme = tok(prompt)["input_ids"] + tok(response, add_special_tokens=False)["input_ids"]
            with_eos = exact(input_ids=torch.tensor([readme + [tok.eos_token_id]])).logits[0, 0]
            torch.testing.assert_close(with_eos, score, atol=1e-5, rtol=0)
            # without the EOS the head reads another position: not the normalised score
            assert abs(exact(input_ids=torch.tensor([readme])).logits[0, 0] - score) > 1e-3


def test_ensemble_choice_data_best_of_k(tmp_path, tiny_llama_dir, data):
    out = tmp_path / "ens"
    res = cli(_args(tiny_llama_dir, data["choice"], out, "--loss", "best_of_k", "--members", "2", "--bootstrap",
                    "--combine", "mean_minus_std", "--gold_eval_path", str(data["gold"]), "--optim.max_steps", "6"))
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["members"]) == 2 and "eval/member_disagreement" in summary
    assert "eval/best_of_k_accuracy" in summary["members"][0]
    spec = json.loads((out / "final/ensemble.json").read_text())
    assert spec["members"] == ["member-0", "member-1"] and spec["combine"] == "mean_minus_std"
    from alignkit.rollout.score import load_scorer

    rewards = load_scorer(out / "final")(PROMPTS[:2], GOOD[:2])
    assert rewards.shape == (2,) and torch.isfinite(rewards).all()


def test_segment_scores_pointwise_and_kind_errors(tmp_path, tiny_llama_dir, data):
    out = tmp_path / "seg"
    res = cli(_args(tiny_llama_dir, data["steps"], out, "--loss", "pointwise", "--optim.max_steps", "4",
                    "--normalize", "false", "--data.eval_fraction", "0.34", "--budget_curve", "2,100",
                    "--segments", "sentences", "--gold_eval_path", str(data["gold"])))
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert "eval/spearman_targets" in summary and "eval/spearman_gold" in summary
    # the segmentation travels with the model: scorers loading it sum the segment rewards (Eq. 10.68)
    assert json.loads((out / "final/config.json").read_text())["reward_segments"] == "sentences"
    from alignkit.rollout.score import RewardModelScorer

    scorer = RewardModelScorer.from_path(out / "final")
    assert scorer.segments == "sentences"
    from alignkit.data.collate import right_pad
    from alignkit.data.segments import segment_prefixes
    from alignkit.models.reward_model import reward_scores

    total = scorer(["A"], [" I loved it. It was bad."])
    prefixes = segment_prefixes(scorer.tokenizer, "A", [" I loved it.", " It was bad."])  # [x y_1], [x y_1 y_2 EOS]
    with torch.no_grad():
        each = reward_scores(scorer.model, *right_pad(prefixes, scorer.tokenizer.pad_token_id), apply_bias=True)
    torch.testing.assert_close(total, each.sum().reshape(1), atol=1e-4, rtol=1e-4)
    res = cli(_args(tiny_llama_dir, data["steps"], tmp_path / "x", "--loss", "pointwise", "--segments", "words"))
    assert res.returncode == 2 and "`segments`" in res.stderr
    res = cli(_args(tiny_llama_dir, data["steps"], tmp_path / "y", "--loss", "pointwise", "--segments", "sentences",
                    "--normalize", "true"))
    assert res.returncode == 2 and "--normalize false" in res.stderr
    assert [c["budget"] for c in summary["budget_curve"]] == [2, 4] and (out / "budget-2/final").is_dir()
    res = cli(_args(tiny_llama_dir, data["choice"], tmp_path / "bad", "--loss", "plackett_luce"))
    assert res.returncode == 2 and "choice.jsonl" in res.stderr and "`loss`" in res.stderr
    assert "Traceback" not in res.stderr
