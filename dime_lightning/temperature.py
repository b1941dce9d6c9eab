"""Automatic temperature tuning (docs/algorithm.md §3).

α = exp(log α), init 1. The loss pulls a per-batch *statistic* of the actor sample towards a target:

    L_α = −α · (statistic − target),    dL/dlog α = −α · (statistic − target)

so α grows while the statistic exceeds the target. For DIME the statistic is the mean running cost of the
actor batch and the target 4·D (the reference's hard-coded value; ≈ a target entropy of −1.665·D nats on the
bound). A SAC-style actor uses statistic = mean log π and target = −(target entropy). ``mode="fixed"`` keeps α
at ``init_alpha``: ``log_alpha`` takes no gradient and no optimizer is built for it.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from dime_lightning.errors import BadInputError

TemperatureMode = Literal["auto", "fixed"]


class Temperature(nn.Module):
    """The temperature α of the max-entropy objective (docs/algorithm.md §3).

    Args:
        action_dim: action size D; linked from the env (never set in a config).
        init_alpha: initial α, > 0. Default 1.
        mode: 'auto' (tuned by its loss) or 'fixed' (α stays at ``init_alpha``). Default 'auto'.
        target: target of the statistic; null (default) means ``target_per_dim`` · D.
        target_per_dim: target per action dimension when ``target`` is null. Default 4 (DIME's running cost;
            the Gaussian config sets it so that the target entropy is −D).
        lr: Adam learning rate of log α, > 0. Default 1e-3.
    """

    def __init__(
        self,
        action_dim: int,
        init_alpha: float = 1.0,
        mode: TemperatureMode = "auto",
        target: float | None = None,
        target_per_dim: float = 4.0,
        lr: float = 1e-3,
    ) -> None:
        super().__init__()
        if not init_alpha > 0:
            raise BadInputError(f"Temperature: init_alpha must be > 0, got {init_alpha}")
        if mode not in ("auto", "fixed"):
            raise BadInputError(f"Temperature: mode must be 'auto' or 'fixed', got {mode!r}")
        if not lr > 0:
            raise BadInputError(f"Temperature: lr must be > 0, got {lr}")
        self.mode = mode
        self.lr = lr
        self.target = float(target) if target is not None else target_per_dim * action_dim
        self.log_alpha = nn.Parameter(torch.tensor(math.log(init_alpha)), requires_grad=mode == "auto")

    def alpha(self) -> torch.Tensor:
        """Current α as a detached 0-d tensor (never a Python float: no host sync)."""
        return self.log_alpha.detach().exp()

    def loss(self, statistic: torch.Tensor) -> torch.Tensor:
        """L_α = −α·(statistic − target); ``statistic`` is detached here."""
        return -self.log_alpha.exp() * (statistic.detach() - self.target)
