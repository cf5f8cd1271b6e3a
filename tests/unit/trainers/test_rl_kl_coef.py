"""beta moves with the KL of the whole batch, the same on every process (rl.update_kl_coef)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from alignkit.losses.kl import AdaptiveKLController
from alignkit.trainers.rl import update_kl_coef


class TwoRankReduce:
    """accelerate's `reduce(t, "mean")` as seen by one of two processes whose KLs are `kls`."""

    def __init__(self, kls: list[float]) -> None:
        self.kls = kls

    def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        assert reduction == "mean"
        return torch.tensor(sum(self.kls) / len(self.kls), dtype=tensor.dtype)


def test_every_process_moves_beta_by_the_batch_kl():
    kls = [4.0, 8.0]  # the two processes' mean KLs over their 4 rows each
    betas, logged = [], []
    for kl in kls:
        ctx = SimpleNamespace(loop=SimpleNamespace(accelerator=TwoRankReduce(kls), world=2),
                              kl_ctl=AdaptiveKLController(0.1, target=5.5, horizon=100))
        logged.append(float(update_kl_coef(ctx, torch.tensor(kl), rows=4)))
        betas.append(ctx.kl_ctl.value)
    # By hand: batch KL 6, e = (6 - 5.5) / 5.5 = 1/11 (within the +-0.2 clip), n = 4 rows x 2 processes.
    expected = 0.1 * (1 + (1 / 11) * 8 / 100)
    assert betas == [pytest.approx(expected, rel=1e-12)] * 2
    assert logged == [6.0, 6.0]
    # Each process's own KL would have moved beta apart (clipped to -0.2 and +0.2).
    own = [AdaptiveKLController(0.1, target=5.5, horizon=100).update(kl, n_steps=8) for kl in kls]
    assert own == [pytest.approx(0.1 * (1 - 0.2 * 8 / 100)), pytest.approx(0.1 * (1 + 0.2 * 8 / 100))]


def test_one_process_is_unchanged():
    ctx = SimpleNamespace(loop=SimpleNamespace(accelerator=TwoRankReduce([7.0]), world=1),
                          kl_ctl=AdaptiveKLController(0.1, target=5.5, horizon=100))
    assert float(update_kl_coef(ctx, torch.tensor(7.0), rows=8)) == 7.0
    assert ctx.kl_ctl.value == pytest.approx(0.1 * (1 + 0.2 * 8 / 100))  # e = 1.5 / 5.5 clipped to 0.2
