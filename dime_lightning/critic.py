"""Distributional CrossQ critic: a categorical Q-network ensemble with batch renormalisation (docs/algorithm.md §2).

Each critic: concat(s, a) → BRN → [Linear → ReLU → BRN] × L → Linear(K) → softmax over K atoms on
linspace(v_min, v_max). There is no target network: (s, a) and (s', a') go through the critic in one joint
train-mode pass, so the batch statistics cover both halves (CrossQ).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from tensordict import TensorDict
from torch import nn
from torchrl.modules import BatchRenorm1d

from dime_lightning.errors import BadInputError
from dime_lightning.layers import dense


class BatchRenorm(BatchRenorm1d):
    """Batch renormalisation (TorchRL's ``BatchRenorm1d`` parameters, buffers and conventions) with a forward of
    its own, for two reasons found by measurement:

    - TorchRL 0.14 computes the warm-up factor as ``num_batches_tracked // warmup_steps`` but its clamp of the
      counter is not in place, so the factor would reach 2, 3, … after 2×, 3× the warm-up and scale r − 1 and
      d beyond their limits. Here the counter saturates at ``warmup_steps``.
    - Under ``torch.compile`` the backward pass reads the running statistics *after* the forward updated them
      in place (the compiled backward recomputes r and d from the mutated buffers), which gives wrong
      gradients once the warm-up is over. With ``defer_statistics`` set, a train-mode forward writes the new
      statistics to side buffers and ``commit_statistics_()`` (called after the backward) applies them. Without
      it (the default) they are applied at once, as in TorchRL.

    Conventions (checked against docs/algorithm.md §2.1 in the tests): running stat ← (1 − momentum)·stat +
    momentum·batch, so Flax momentum 0.99 is ``momentum=0.01`` here; the running variance tracks the unbiased
    batch variance (a factor 2B/(2B − 1) ≈ 1.002 at 2B = 512 rows); the warm-up is a tensor condition, so
    forward has no host sync.
    """

    def __init__(self, num_features: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.defer_statistics = False
        for name in ("running_mean", "running_var", "num_batches_tracked"):  # not checkpointed
            self.register_buffer(f"pending_{name}", getattr(self, name).clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            raise BadInputError(f"{type(self).__name__} expects a 2D (or more) tensor, got {x.dim()}D")
        view = [1, x.shape[1]] + [1] * (x.dim() - 2)  # (C,) -> broadcastable over (N, C, ...)
        running_std = (self.running_var + self.eps).sqrt()
        if not self.training:
            x = (x - self.running_mean.view(view)) / running_std.view(view)
            return self.weight.view(view) * x + self.bias.view(view)
        reduce = [i for i in range(x.dim()) if i != 1]
        b_mean, b_var = x.mean(reduce), x.var(reduce, unbiased=False)
        b_std = (b_var + self.eps).sqrt()
        r = torch.clamp(b_std.detach() / running_std, 1 / self.max_r, self.max_r)
        d = torch.clamp((b_mean.detach() - self.running_mean) / running_std, -self.max_d, self.max_d)
        count = self.num_batches_tracked
        if self.warmup_steps > 0:  # 0 during the warm-up, 1 after it
            count = count.clamp(max=self.warmup_steps)
            factor = count / self.warmup_steps if self.smooth else count // self.warmup_steps
            r = 1.0 + (r - 1.0) * factor
            d = d * factor
        x = (x - b_mean.view(view)) / b_std.view(view) * r.view(view) + d.view(view)
        with torch.no_grad():
            rows = x.numel() // x.shape[1]
            unbiased_var = b_var * rows / (rows - 1)
            mean, var = self.running_mean, self.running_var
            self.pending_running_var.copy_(var + self.momentum * (unbiased_var.to(var.dtype) - var))
            self.pending_running_mean.copy_(mean + self.momentum * (b_mean.to(mean.dtype) - mean))
            new_count = count + 1
            self.pending_num_batches_tracked.copy_(
                new_count.clamp(max=self.warmup_steps) if self.warmup_steps > 0 else new_count)
        if not self.defer_statistics:
            self.commit_statistics_()
        return self.weight.view(view) * x + self.bias.view(view)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        with torch.no_grad():  # nothing pending after a load
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                getattr(self, f"pending_{name}").copy_(getattr(self, name))

    @torch.no_grad()
    def commit_statistics_(self, where: torch.Tensor | None = None) -> None:
        """Apply the statistics of the last train-mode forward (a no-op for a forward already applied); call it
        only after a train-mode forward. ``where`` (a 0-d bool tensor) applies them only where it is true,
        without a host sync (a skipped non-finite update keeps the old statistics)."""
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            current, pending = getattr(self, name), getattr(self, f"pending_{name}")
            current.copy_(pending if where is None else torch.where(where, pending, current))


def _critic_mlp(
    in_dim: int, hidden_dims: Sequence[int], num_atoms: int, momentum: float, eps: float,
    warmup_steps: int, max_r: float, max_d: float,
) -> nn.Sequential:
    def brn(width: int) -> BatchRenorm:
        return BatchRenorm(width, momentum=momentum, eps=eps, max_r=max_r, max_d=max_d, warmup_steps=warmup_steps)

    layers: list[nn.Module] = [brn(in_dim)]
    width = in_dim
    for hidden in hidden_dims:
        layers += [dense(width, hidden), nn.ReLU(), brn(hidden)]
        width = hidden
    layers.append(dense(width, num_atoms))
    return nn.Sequential(*layers)


class DistributionalCritic(nn.Module):
    """``num_critics`` independent categorical critics; ``forward`` returns logits of shape (C, B, K).

    Each: concat(s, a) → BRN → [Linear → ReLU → BRN] per hidden width → Linear(num_atoms), a softmax over the
    atoms linspace(v_min, v_max, num_atoms) (docs/algorithm.md §2.1).

    Args:
        obs_dim: observation size; linked from the env (never set in a config).
        action_dim: action size; linked from the env (never set in a config).
        num_critics: ensemble size, >= 1; the TD target averages their projections. Default 2.
        hidden_dims: widths of the hidden layers. Default [2048, 2048] (the paper; CPU configs use 256).
        num_atoms: atoms of the categorical value distribution, >= 2. Default 101.
        v_min: lowest atom, in return units (must be < v_max). Default −1600 (Gym MuJoCo; DMC: −200).
        v_max: highest atom, in return units. Default 1600 (Gym MuJoCo; DMC: 200).
        brn_momentum: batch-renorm running-statistics rate (PyTorch convention: stat ← (1 − m)·stat +
            m·batch), in (0, 1]. Default 0.01.
        brn_eps: batch-renorm variance epsilon. Default 1e-3.
        brn_warmup_steps: critic updates during which batch renorm is plain batch norm, >= 0. Default 100000.
        brn_max_r: batch-renorm r is clipped to [1/r_max, r_max]. Default 3.
        brn_max_d: batch-renorm d is clipped to [−d_max, d_max]. Default 5.
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        num_critics: int = 2,
        hidden_dims: Sequence[int] = (2048, 2048),
        num_atoms: int = 101,
        v_min: float = -1600.0,
        v_max: float = 1600.0,
        brn_momentum: float = 0.01,
        brn_eps: float = 1e-3,
        brn_warmup_steps: int = 100_000,
        brn_max_r: float = 3.0,
        brn_max_d: float = 5.0,
    ) -> None:
        super().__init__()
        if not v_min < v_max:
            raise BadInputError(f"DistributionalCritic: v_min must be < v_max, got v_min={v_min}, v_max={v_max}")
        if num_atoms < 2:
            raise BadInputError(f"DistributionalCritic: num_atoms must be >= 2, got {num_atoms}")
        if num_critics < 1:
            raise BadInputError(f"DistributionalCritic: num_critics must be >= 1, got {num_critics}")
        if not 0.0 < brn_momentum <= 1.0:
            raise BadInputError(f"DistributionalCritic: brn_momentum must be in (0, 1], got {brn_momentum}")
        if brn_warmup_steps < 0:
            raise BadInputError(f"DistributionalCritic: brn_warmup_steps must be >= 0, got {brn_warmup_steps}")
        self.v_min, self.v_max, self.num_atoms = float(v_min), float(v_max), num_atoms
        self.register_buffer("support", torch.linspace(v_min, v_max, num_atoms))
        self.critics = nn.ModuleList(
            _critic_mlp(obs_dim + action_dim, hidden_dims, num_atoms, brn_momentum, brn_eps,
                        brn_warmup_steps, brn_max_r, brn_max_d)
            for _ in range(num_critics)
        )

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Logits (C, B, K). Train mode normalises with batch statistics and updates the running ones."""
        inputs = torch.cat([obs, action], dim=-1)  # (B, obs_dim + D)
        return torch.stack([critic(inputs) for critic in self.critics])

    def joint(
        self, obs: torch.Tensor, action: torch.Tensor, next_obs: torch.Tensor, next_action: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CrossQ joint pass: one forward over the 2B rows [(s, a); (s', a')], split back into two (C, B, K)."""
        logits = self(torch.cat([obs, next_obs]), torch.cat([action, next_action]))  # (C, 2B, K)
        return logits.split(obs.shape[0], dim=1)

    def q_values(self, logits: torch.Tensor) -> torch.Tensor:
        """Expected value Σ_j p_j z_j per critic: (C, B, K) -> (C, B)."""
        return (logits.softmax(-1) * self.support).sum(-1)

    def defer_statistics_(self, defer: bool = True) -> None:
        """Train-mode forwards keep their batch-renorm statistics pending until ``commit_statistics_()`` (the
        update calls it after the critic's backward pass: required for correct compiled gradients)."""
        for module in self.modules():
            if isinstance(module, BatchRenorm):
                module.defer_statistics = defer

    def commit_statistics_(self, where: torch.Tensor | None = None) -> None:
        """Apply the pending batch-renorm statistics of the last train-mode forward (only where ``where``)."""
        for module in self.modules():
            if isinstance(module, BatchRenorm):
                module.commit_statistics_(where)

    @contextmanager
    def frozen(self) -> Iterator[DistributionalCritic]:
        """Inference mode for the actor loss: running statistics, no stat updates, detached parameters.

        Gradients still flow to the *inputs* (the action), but never into the critic's parameters.
        """
        was_training = self.training
        params = TensorDict.from_module(self)
        self.eval()
        try:
            with params.detach().to_module(self):
                yield self
        finally:
            self.train(was_training)


def project_distribution(
    probs: torch.Tensor, shifted_support: torch.Tensor, v_min: float, v_max: float, num_atoms: int
) -> torch.Tensor:
    """C51 projection of mass ``probs`` sitting at ``shifted_support`` onto linspace(v_min, v_max, K).

    ``shifted_support`` (..., K) is clipped to [v_min, v_max]; an atom at fractional grid position
    b = (Tz − v_min)/Δz sends (1 − frac(b)) of its mass to ⌊b⌋ and frac(b) to ⌊b⌋ + 1. An atom exactly on a
    grid point (frac = 0), including both ends of the support, keeps all of its mass there, so rows always
    sum to the input mass (the reference's index nudging gives the same result). ``shifted_support`` may
    omit leading dims of ``probs`` (it is broadcast). (..., K) -> (..., K).
    """
    if probs.dtype in (torch.float16, torch.bfloat16):  # mixed precision: the projection runs in float32
        probs, shifted_support = probs.float(), shifted_support.float()
    delta = (v_max - v_min) / (num_atoms - 1)
    b = ((shifted_support.clamp(v_min, v_max) - v_min) / delta).expand_as(probs)  # (..., K) in [0, K − 1]
    # a NaN position keeps a valid index (0) and a NaN weight: the NaN reaches the loss, where the non-finite
    # check sees it, instead of an out-of-range index (a device-side assert on CUDA)
    lower = b.floor().nan_to_num_(nan=0.0).clamp_(max=num_atoms - 1)
    upper_weight = b - lower  # frac(b)
    lower_index = lower.long()
    upper_index = (lower_index + 1).clamp_(max=num_atoms - 1)  # frac = 0 whenever this clamp is active
    out = torch.zeros_like(probs)
    out.scatter_add_(-1, lower_index, probs * (1.0 - upper_weight))
    return out.scatter_add_(-1, upper_index, probs * upper_weight)
