"""reasoning-gym's verifiers as an alignkit reward function (alignkit does not depend on reasoning-gym).

    pip install reasoning-gym
    python examples/reasoning_gym_reward.py prompts.jsonl --task basic_arithmetic --size 2000
    alignkit grpo --model.name_or_path MY_SFT_MODEL --data.path prompts.jsonl \
        --reward.functions examples/reasoning_gym_reward.py:score

`write_prompts` turns a reasoning-gym dataset into prompt records `{"prompt", "entry"}`; the `entry`
column (the dataset's own entry: question, answer, metadata) reaches `score` with each completion,
which asks the entry's source dataset to verify the answer (`score_answer`, 0..1).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def score(prompts, completions, entry, **kwargs):
    """reasoning-gym's `score_answer` of each completion (its last line, stripped) against its entry."""
    from reasoning_gym.factory import get_score_answer_fn  # imported when the function runs

    out = []
    for completion, item in zip(completions, entry, strict=True):
        verify = get_score_answer_fn(item["metadata"]["source_dataset"])
        lines = completion.strip().splitlines()
        out.append(float(verify(answer=lines[-1].strip() if lines else "", entry=item)))
    return out


def write_prompts(path: str | Path, task: str, size: int, seed: int = 0) -> int:
    """Write `size` prompt records of reasoning-gym task `task` to `path` (JSONL); return the count."""
    import reasoning_gym

    data = reasoning_gym.create_dataset(task, size=size, seed=seed)
    rows = [{"prompt": item["question"], "entry": json.loads(json.dumps(item, default=str))} for item in data]
    Path(path).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return len(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write reasoning-gym prompt records for alignkit's RL stages.")
    parser.add_argument("output", help="JSONL file to write ({prompt, entry} records)")
    parser.add_argument("--task", default="basic_arithmetic", help="reasoning-gym dataset name")
    parser.add_argument("--size", type=int, default=1000, help="number of problems")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    args = parser.parse_args()
    print(f"wrote {write_prompts(args.output, args.task, args.size, args.seed)} records to {args.output}")
