"""Online DPO data: K samples per prompt from the current policy, answered by a labeler as records.

Each round (`sample_round`) samples the policy on prompts drawn from the training prompts and has a
labeler (`alignkit.feedback.labelers`) answer them as pairs or rankings; the DPO trainer trains on
them as on offline preference records.
"""

from __future__ import annotations

from typing import Any

import torch

from alignkit.accel import Backend
from alignkit.data.formats import validate_records
from alignkit.data.load import load_records
from alignkit.errors import AlignkitError
from alignkit.feedback.labelers import ScorerLabeler
from alignkit.rollout.generate import sample, stop_token_ids, tokenize_prompts
from alignkit.rollout.score import load_scorer


def train_prompts(cfg: Any, world: Any) -> list[Any]:
    """Prompts of online rounds: `cfg.prompts_path` (records with `prompt`), else the world's train prompts."""
    if cfg.prompts_path:
        records = validate_records(load_records(cfg.prompts_path), "prompt", cfg.prompts_path).records
        return [r["prompt"] for r in records]
    if not cfg.world:
        raise AlignkitError("online DPO (`rounds` > 0) needs `prompts_path` or `world` for its training prompts")
    return world.prompts("train")


def sample_round(policy: Any, cfg: Any, tokenizer: Any, labeler: Any, prompts: list[Any], round_index: int,
                 device: torch.device, backend: Backend) -> list[dict]:
    """Online DPO data: K samples per prompt from the current policy, answered by the labeler as records.

    `cfg` is the DPO config (`prompts_per_round`, `samples_per_prompt`, `sampling`, `loss`, `run.seed`). Prompts whose samples are not distinct are left out (records
    need distinct responses). Returns preference records (rankings for plackett_luce).
    """
    gen = torch.Generator().manual_seed(cfg.run.seed * 7919 + round_index)
    order = torch.randperm(len(prompts), generator=gen)[: cfg.prompts_per_round].tolist()
    chosen = [prompts[i] for i in order]
    k, queries = cfg.samples_per_prompt, []
    for start in range(0, len(chosen), 64):
        part = chosen[start : start + 64]
        ids, mask = tokenize_prompts(tokenizer, [p for p in part for _ in range(k)])
        rollout = sample(policy, ids.to(device), mask.to(device),
                         **cfg.sampling.kwargs(), generator=gen,
                         eos_token_id=stop_token_ids(tokenizer, policy), pad_token_id=tokenizer.pad_token_id, backend=backend)
        texts = rollout.texts(tokenizer)
        for i, prompt in enumerate(part):
            responses = texts[i * k : (i + 1) * k]
            if len(set(responses)) == k and all(r.strip() for r in responses):  # records need distinct responses
                queries.append({"id": f"{round_index}/{start + i}", "prompt": prompt, "responses": responses})
    fmt = "ranking" if cfg.loss == "plackett_luce" else "pairs"
    return [r for r in labeler(queries, fmt) if r is not None]


def online_inputs(cfg: Any, world: Any) -> tuple[Any, list[Any]]:
    """The labeler (a scorer with Bradley-Terry noise) and the training prompts of online rounds."""
    spec = cfg.labeler or (f"gold:{cfg.world}" if cfg.world else "")
    if not spec:
        raise AlignkitError("online DPO (`rounds` > 0) needs `labeler` (a reward model directory or gold:<world>) "
                            "or `world`")
    labeler = ScorerLabeler(load_scorer(spec, world=world), tau=cfg.label_tau, seed=cfg.run.seed)
    return labeler, train_prompts(cfg, world)
