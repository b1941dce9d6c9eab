"""The actor contract: what the module, the losses, collection, evaluation and analysis use of a policy.

An actor is an ``nn.Module`` built as ``actor(obs_dim, action_dim, **init_args)`` (``model.actor`` in a config)
that has

- ``forward(obs, return_trajectory=False, noise=None) -> ActorOutput``: one reparameterised sample per state,
  with gradients, and its bound on log π (``log_prob = running_cost + terminal_cost``; the temperature reads
  ``running_cost``);
- ``act(obs) -> action``: a no-grad sample in (−1, 1) for collection and evaluation, for ``(obs_dim,)`` or
  ``(B, obs_dim)`` observations (``SamplesFromForward`` derives it from ``forward``);
- ``diagnostics() -> dict[str, Tensor]``: detached scalars, logged as ``train/<name>``.

``check_actor`` refuses an actor without them, naming what is missing, when the module (or ``load_policy``)
builds it.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from dime_lightning.errors import BadInputError

LOG_2PI = math.log(2.0 * math.pi)


class ActorOutput(NamedTuple):
    """One sample per state. ``log_prob`` = running_cost + terminal_cost (the bound on log π)."""

    action: torch.Tensor  # (B, D) in (−1, 1)
    log_prob: torch.Tensor  # (B,)
    running_cost: torch.Tensor  # (B,)
    terminal_cost: torch.Tensor  # (B,)
    pre_tanh: torch.Tensor  # (B, D), x_N
    trajectory: torch.Tensor | None = None  # (N+1, B, D), x_0..x_N when requested


@runtime_checkable
class Actor(Protocol):
    """The methods every actor has (see the module docstring)."""

    def forward(self, obs: torch.Tensor, return_trajectory: bool = False,
                noise: torch.Tensor | None = None) -> ActorOutput: ...

    def act(self, obs: torch.Tensor) -> torch.Tensor: ...

    def diagnostics(self) -> dict[str, torch.Tensor]: ...


class SamplesFromForward:
    """``act`` from ``forward``: the sampled action, without gradients, for one state or a batch."""

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """No-grad action sample in (−1, 1) for collection; accepts (obs_dim,) or (B, obs_dim)."""
        if obs.dim() == 1:
            return self.forward(obs.unsqueeze(0)).action.squeeze(0)
        return self.forward(obs).action


def check_actor(actor: object, setting: str = "model.actor") -> Actor:
    """``actor`` when it is an ``nn.Module`` with the contract's methods; ``BadInputError`` naming what is missing.

    actor: the built actor.
    setting: where it was configured, for the message."""
    name = type(actor).__name__
    if not isinstance(actor, nn.Module):
        raise BadInputError(f"{setting}: {name} is not a torch.nn.Module (an actor is one; see dime_lightning.policy)")
    missing = [method for method in ("forward", "act", "diagnostics") if not callable(getattr(actor, method, None))
               or (method == "forward" and type(actor).forward is nn.Module.forward)]
    if missing:
        raise BadInputError(f"{setting}: {name} lacks {', '.join(missing)} of the actor contract (forward -> "
                            "ActorOutput, act, diagnostics; see dime_lightning.policy)")
    return actor


def tanh_log_det_jacobian(pre_tanh: torch.Tensor) -> torch.Tensor:
    """Σ_d log(1 − tanh²(x_d)) in the stable form 2(log 2 − x − softplus(−2x)); (..., D) -> (...)."""
    return (2.0 * (math.log(2.0) - pre_tanh - F.softplus(-2.0 * pre_tanh))).sum(-1)
