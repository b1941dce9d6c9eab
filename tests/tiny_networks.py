"""Tiny networks and batches for the loss, update and scaling tests. Shared by the test modules."""

from __future__ import annotations

import torch
from tensordict import TensorDict

from dime_lightning.actor import DiffusionActor
from dime_lightning.critic import DistributionalCritic

OBS_DIM, ACTION_DIM, B = 3, 2, 8


def make_critic(**kwargs) -> DistributionalCritic:
    defaults = dict(hidden_dims=(32, 32), num_atoms=11, v_min=-5.0, v_max=5.0, brn_warmup_steps=2)
    defaults.update(kwargs)
    return DistributionalCritic(OBS_DIM, ACTION_DIM, **defaults)


def make_actor() -> DiffusionActor:
    return DiffusionActor(
        obs_dim=OBS_DIM,
        action_dim=ACTION_DIM,
        num_steps=4,
        hidden_dim=16,
        num_layers=2,
        time_features=8,
        time_hidden_dim=16,
    )


def make_batch(batch_size: int = B, terminated_rows: tuple[int, ...] = (1, 5)) -> TensorDict:
    terminated = torch.zeros(batch_size, 1, dtype=torch.bool)
    terminated[list(terminated_rows)] = True
    return TensorDict(
        {
            "observation": torch.randn(batch_size, OBS_DIM),
            "action": torch.rand(batch_size, ACTION_DIM) * 2 - 1,
            "next": {
                "observation": torch.randn(batch_size, OBS_DIM),
                "reward": torch.randn(batch_size, 1) * 2.0,
                "terminated": terminated,
            },
        },
        batch_size=[batch_size],
    )
