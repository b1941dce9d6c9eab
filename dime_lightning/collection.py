"""Env collection for one rank: the collection policy and the TorchRL collector (one process or several).

- ``num_workers == 1``: ``torchrl.collectors.Collector`` steps the env in the training process with the live
  actor (no copy, no weight sync).
- ``num_workers > 1``: ``torchrl.collectors.MultiSyncCollector`` steps one env per worker process; each
  ``next()`` returns ``frames_per_batch`` transitions, ``frames_per_batch / num_workers`` from each worker.
  Workers act with a CPU copy of the policy whose weights (and the warm-up flag) the learner pushes with
  ``update_policy_weights_()`` before every batch, so acting lags the learner by at most one batch. Worker
  ``i`` seeds its env and its torch RNG from ``numpy.random.SeedSequence([rank seed, i])``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.collectors import Collector, MultiSyncCollector
from torchrl.envs import EnvBase

from dime_lightning.envs import make_env


class CollectionPolicy(nn.Module):
    """Uniform random actions in [−1, 1] while the ``uniform`` flag is set (the random warm-up), then no-grad
    samples from the actor on whatever device the actor lives. The flag is a buffer, so multi-process
    collectors receive it with the weights. ``seed`` seeds the random actions of the in-process policy;
    worker copies draw from their process's torch RNG (seeded per worker). ``act`` replaces ``actor.act`` in
    this process (e.g. a compiled one); worker copies use ``actor.act``."""

    def __init__(
        self, actor: nn.Module, action_dim: int, seed: int | None = None,
        act: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.actor = actor
        self.act = act
        self.action_dim = action_dim
        self.register_buffer("uniform", torch.tensor(True))
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        if bool(self.uniform):
            shape = (*observation.shape[:-1], self.action_dim)
            return torch.rand(shape, generator=self.generator) * 2.0 - 1.0
        device = next(self.actor.parameters()).device
        return (self.act or self.actor.act)(observation.to(device)).to(observation.device)

    def __getstate__(self) -> dict:  # worker copies: neither a torch.Generator nor a compiled function pickles
        return {**self.__dict__, "generator": None, "act": None}


def _worker_env(env_id: str, seed: int) -> EnvBase:
    """Runs in the worker process: seeds that process's torch RNG (the policy's noise) and builds its env."""
    torch.manual_seed(seed)
    return make_env(env_id, seed=seed)


def worker_seed(seed: int, worker: int) -> int:
    """A seed for env worker ``worker`` of the rank seeded with ``seed`` (distinct from every other pair)."""
    return int(np.random.SeedSequence([seed, worker]).generate_state(1)[0])


def build_collector(
    env_id: str, policy: CollectionPolicy, frames_per_batch: int, num_workers: int, seed: int
) -> Collector | MultiSyncCollector:
    module = TensorDictModule(policy, in_keys=["observation"], out_keys=["action"])
    if num_workers == 1:
        return Collector(make_env(env_id, seed=seed), module, frames_per_batch=frames_per_batch, total_frames=-1,
                         auto_register_policy_transforms=False)
    return MultiSyncCollector(
        [_worker_env] * num_workers, module, frames_per_batch=frames_per_batch, total_frames=-1,
        create_env_kwargs=[{"env_id": env_id, "seed": worker_seed(seed, i)} for i in range(num_workers)],
        policy_device="cpu", env_device="cpu", storing_device="cpu",
    )

