"""The `Rollout`: a batch of sampled responses with the tensors every RL, labeling and eval stage reads.

Layout of one batch of B samples (P prompt columns, R response columns):

    prompt_ids    B×P  left-padded:   [pad pad BOS p1 p2 p3]
    response_ids  B×R  right-padded:  [r1 r2 EOS pad pad]      (pad after the first EOS)
    response_mask B×R  bool:          [T  T  T   F   F  ]      (generated tokens up to and incl. EOS)

`full_ids()` concatenates the two (B×(P+R)) for a training forward pass; the response token at
column j of `response_ids` is column P + j of `full_ids()`, and its log-prob is read from the
logits at column P + j - 1. Rows are independent: a row without EOS (cut at `max_new_tokens`) has
`ends_with_eos` False and its last response token is the last True of `response_mask`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from alignkit.ops.masking import mask_positions


@dataclass
class Rollout:
    """Prompts, sampled responses and the sampler's log-probs for a batch of B samples.

    Attributes:
        prompt_ids: B×P long, left-padded prompt token ids (exactly one BOS where the tokenizer uses one).
        prompt_mask: B×P bool, True on real prompt tokens.
        response_ids: B×R long, sampled tokens; every position after the first EOS holds the pad id.
        response_mask: B×R bool, True on generated tokens up to and including the first EOS.
        logprobs: B×R float, log pi(y_t | x, y_<t) of each sampled token under softmax(logits /
            temperature) *before* top-k / top-p / min-new-tokens filtering (as TRL and OpenRLHF
            compute it for training); 0 where `response_mask` is False. With top-k or top-p the
            sampler draws from a truncated distribution, so these are not the exact sampling
            probabilities: they are the probabilities of the policy being trained.
        ends_with_eos: B bool, True when the row produced EOS within `max_new_tokens`.
        lengths: B long, number of response tokens (`response_mask.sum(1)`, EOS included).
        entropy: B×R float or None, the entropy of the same (unfiltered, temperature-scaled)
            next-token distribution at each response position, recorded by the sampler; 0 where
            `response_mask` is False. None for rollouts built without it.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    ends_with_eos: torch.Tensor
    lengths: torch.Tensor
    entropy: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        """B, the number of samples."""
        return self.prompt_ids.shape[0]

    @property
    def prompt_length(self) -> int:
        """P, the number of (left-padded) prompt columns."""
        return self.prompt_ids.shape[1]

    def full_ids(self) -> torch.Tensor:
        """Prompt and response ids side by side, B×(P+R), for a training forward pass."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    def full_mask(self) -> torch.Tensor:
        """Attention mask of `full_ids()`, B×(P+R) bool: real prompt tokens and response tokens up to EOS."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    def position_ids(self) -> torch.Tensor:
        """Position ids of `full_ids()`, B×(P+R) long: cumsum(mask) - 1, clamped at 0 (`mask_positions`).

        They match the positions the sampler used, so the first real token of each row is at position
        0 whatever its left padding. Pad positions get the position of the previous real token (0 for
        left padding); they are masked out and never read.
        """
        return mask_positions(self.full_mask())

    def response_last_index(self) -> torch.Tensor:
        """Column in `response_ids` of each row's last response token, B long.

        That is the EOS when the row produced one, else the last sampled token; never a pad (a row has
        at least one response token). Use it to read a reward or value at the end of a response.
        """
        return (self.lengths - 1).clamp(min=0)

    def full_last_index(self) -> torch.Tensor:
        """Column in `full_ids()` of each row's last response token, B long (P + `response_last_index()`)."""
        return self.prompt_length + self.response_last_index()

    def texts(self, tokenizer, *, skip_special_tokens: bool = True) -> list[str]:
        """Decode each row's response (the tokens under `response_mask`; EOS dropped when skipping specials)."""
        return tokenizer.batch_decode(self.response_token_lists(), skip_special_tokens=skip_special_tokens)

    def response_token_lists(self) -> list[list[int]]:
        """Each row's response token ids (those under `response_mask`, the EOS included)."""
        return [ids[mask].tolist() for ids, mask in zip(self.response_ids, self.response_mask, strict=True)]

    def prompt_texts(self, tokenizer, *, skip_special_tokens: bool = True) -> list[str]:
        """Decode each row's prompt (the tokens under `prompt_mask`)."""
        rows = [ids[mask].tolist() for ids, mask in zip(self.prompt_ids, self.prompt_mask, strict=True)]
        return tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens)

    def select(self, index: torch.Tensor | slice | list[int]) -> Rollout:
        """The rollout restricted to some rows (e.g. a PPO minibatch); columns are kept as they are."""
        return Rollout(**{f.name: _apply(getattr(self, f.name), lambda t: t[index]) for f in fields(self)})

    @classmethod
    def concat(cls, rollouts: list[Rollout], *, pad_token_id: int) -> Rollout:
        """Stack rollouts row-wise, left-padding prompts and right-padding responses to common widths.

        Args:
            rollouts: Rollouts from separate `sample` calls (e.g. several generation batches).
            pad_token_id: Id written into the added pad columns.

        Returns:
            One rollout with the rows of all inputs, in order.
        """
        width_p = max(r.prompt_length for r in rollouts)
        width_r = max(r.response_ids.shape[1] for r in rollouts)

        def pad(t: torch.Tensor, width: int, value: float | bool, left: bool) -> torch.Tensor:
            extra = width - t.shape[1]
            return torch.nn.functional.pad(t, (extra, 0) if left else (0, extra), value=value)

        return cls(
            prompt_ids=torch.cat([pad(r.prompt_ids, width_p, pad_token_id, True) for r in rollouts]),
            prompt_mask=torch.cat([pad(r.prompt_mask, width_p, False, True) for r in rollouts]),
            response_ids=torch.cat([pad(r.response_ids, width_r, pad_token_id, False) for r in rollouts]),
            response_mask=torch.cat([pad(r.response_mask, width_r, False, False) for r in rollouts]),
            logprobs=torch.cat([pad(r.logprobs, width_r, 0.0, False) for r in rollouts]),
            ends_with_eos=torch.cat([r.ends_with_eos for r in rollouts]),
            lengths=torch.cat([r.lengths for r in rollouts]),
            entropy=(torch.cat([pad(r.entropy, width_r, 0.0, False) for r in rollouts])
                     if all(r.entropy is not None for r in rollouts) else None),
        )


def _apply(value: torch.Tensor | None, fn) -> torch.Tensor | None:
    """`fn(value)` for a tensor field, None for an absent optional one."""
    return None if value is None else fn(value)
