"""``TanhGaussianActor``: the SAC-style Gaussian policy with DIME's actor contract (``policy``), for A/B comparisons.

Swapping ``model.actor`` to this class (``--config conf/gaussian.yaml``) keeps everything else identical:
the distributional critic, the update schedule and the temperature machinery. Its ``log_prob`` is the exact
log-density of the squashed Gaussian, reported as ``running_cost`` (``terminal_cost`` = 0), so the
temperature's statistic is the mean log π and ``Temperature(target_per_dim=1.0)`` is SAC's target entropy
−|A|.
"""

from __future__ import annotations

import torch
from torch import nn

from dime_lightning.errors import BadInputError
from dime_lightning.policy import LOG_2PI, ActorOutput, SamplesFromForward, tanh_log_det_jacobian


class TanhGaussianActor(SamplesFromForward, nn.Module):
    """a = tanh(μ(s) + σ(s)·ε), ε ~ N(0, I); an MLP with ``num_layers`` ReLU layers outputs μ and log σ.

    Args:
        obs_dim: observation size; linked from the env (never set in a config).
        action_dim: action size; linked from the env (never set in a config).
        hidden_dim: width of the MLP, >= 1. Default 256.
        num_layers: ReLU layers of the MLP, >= 1. Default 2.
        log_std_min: lower clamp of log σ. Default −20.
        log_std_max: upper clamp of log σ (must be > log_std_min). Default 2.
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        hidden_dim: int = 256,
        num_layers: int = 2,
        log_std_min: float = -20.0,
        log_std_max: float = 2.0,
    ) -> None:
        super().__init__()
        for name, value in [("obs_dim", obs_dim), ("action_dim", action_dim), ("hidden_dim", hidden_dim),
                            ("num_layers", num_layers)]:
            if value < 1:
                raise BadInputError(f"TanhGaussianActor: {name} must be >= 1, got {value}")
        if not log_std_min < log_std_max:
            raise BadInputError(f"TanhGaussianActor: log_std_min must be < log_std_max, got {log_std_min}, "
                                f"{log_std_max}")
        self.obs_dim = obs_dim
        self.action_dim = action_dim
        self.log_std_min, self.log_std_max = log_std_min, log_std_max
        layers: list[nn.Module] = []
        width = obs_dim
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_dim), nn.ReLU()]
            width = hidden_dim
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Linear(width, 2 * action_dim)

    def distribution_parameters(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # under autocast (bf16-mixed) the head computes in bf16; the sample and its log-density in the weights' dtype
        out = self.head(self.trunk(obs)).to(self.head.weight.dtype)
        mean, log_std = out.chunk(2, dim=-1)  # (B, 2D) -> 2 × (B, D)
        return mean, log_std.clamp(self.log_std_min, self.log_std_max)

    def forward(
        self, obs: torch.Tensor, return_trajectory: bool = False, noise: torch.Tensor | None = None
    ) -> ActorOutput:
        """One reparameterised sample per state. ``noise`` (1, B, D) fixes ε; the "trajectory" is (μ, x)."""
        mean, log_std = self.distribution_parameters(obs)
        eps = torch.randn_like(mean) if noise is None else noise[0]
        x = mean + log_std.exp() * eps
        log_prob = (-0.5 * eps.pow(2) - log_std - 0.5 * LOG_2PI).sum(-1) - tanh_log_det_jacobian(x)
        return ActorOutput(
            action=torch.tanh(x),
            log_prob=log_prob,
            running_cost=log_prob,
            terminal_cost=torch.zeros_like(log_prob),
            pre_tanh=x,
            trajectory=torch.stack([mean, x]) if return_trajectory else None,
        )

    @torch.no_grad()
    def diagnostics(self) -> dict[str, torch.Tensor]:
        return {}
