"""Env collection for one rank: the collection policy, and what steps the env with it (``build_collection``).

- ``num_workers == 1``, ``frames_per_batch == 1``, a Gymnasium id: ``InProcessCollector`` steps the Gymnasium
  env itself in the training process with the live actor, one transition per call. TorchRL's ``Collector``
  around the same env cost 1.5 ms per env step on this project's CPU at Pendulum, of which the env's own step
  is 0.02 ms (BENCHMARKS.md, "the thin loop"): at small sizes it was most of an env step.
- ``num_workers == 1`` otherwise (DMC ids, ``frames_per_batch > 1``): ``torchrl.collectors.Collector`` steps the
  TorchRL env (``envs.make_env``) in the training process with the live actor.
- ``num_workers > 1``: ``torchrl.collectors.MultiSyncCollector`` steps one env per worker process; each
  ``next()`` returns ``frames_per_batch`` transitions, ``frames_per_batch / num_workers`` from each worker.
  Workers act with a CPU copy of the policy whose weights (and the warm-up flag) the learner pushes with
  ``update_policy_weights_()`` before every batch, so acting lags the learner by at most one batch. Worker
  ``i`` seeds its env and its torch RNG from ``numpy.random.SeedSequence([rank seed, i])``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.collectors import Collector, MultiSyncCollector
from torchrl.envs import EnvBase

from dime_lightning.envs import in_process_gymnasium, make_env, make_gymnasium_env
from dime_lightning.replay import TRANSITION_KEYS

NEXT_OBS, NEXT_REWARD = "next/observation", "next/reward"  # how a non-finite value is named


@dataclass
class Step:
    """One env step: the transition to store (a value per ``TRANSITION_KEYS``: tensors, numpy arrays or Python
    numbers), the first of its next observation and reward that is not finite (named as ``next/reward``;
    None: both finite), and, when the step ended an episode (terminated or truncated), that episode's return
    and length."""

    transition: dict
    nonfinite: str | None
    episode: tuple[float, int] | None = None


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


class InProcessCollector:
    """Steps one Gymnasium env (``envs.make_gymnasium_env``) in this process with ``policy``, one transition per
    ``steps()`` call, resetting at the end of each episode; the thin path of ``build_collection``."""

    def __init__(self, env_id: str, policy: CollectionPolicy, seed: int) -> None:
        self.env = make_gymnasium_env(env_id)
        self.policy = policy
        self.set_seed(seed)

    def set_seed(self, seed: int) -> None:
        """Start a fresh episode from ``seed``."""
        observation, _ = self.env.reset(seed=seed)
        self._observation = np.array(observation, dtype=np.float32)  # a copy: envs may reuse their arrays

    def steps(self) -> list[Step]:
        observation = self._observation
        with torch.no_grad():
            action = self.policy(torch.from_numpy(observation)).numpy()
        next_observation, reward, terminated, truncated, info = self.env.step(action)
        next_observation = np.array(next_observation, dtype=np.float32)
        nonfinite = None if math.isfinite(reward) else NEXT_REWARD
        if not np.isfinite(next_observation).all():
            nonfinite = NEXT_OBS
        transition = {"observation": observation, "action": action, ("next", "observation"): next_observation,
                      ("next", "reward"): reward, ("next", "terminated"): bool(terminated)}
        episode = None
        if terminated or truncated:
            episode = (float(info["episode"]["r"]), int(info["episode"]["l"]))
            observation, _ = self.env.reset()
            next_observation = np.array(observation, dtype=np.float32)
        self._observation = next_observation
        return [Step(transition, nonfinite, episode)]

    def shutdown(self) -> None:
        self.env.close()


class BatchCollector:
    """A TorchRL collector (``build_collector``) behind ``InProcessCollector``'s interface: each ``steps()`` is
    one collector batch, its transitions in order (the env workers first get the learner's weights)."""

    def __init__(self, collector: Collector | MultiSyncCollector, num_workers: int) -> None:
        self.collector, self.num_workers = collector, num_workers

    def set_seed(self, seed: int) -> None:
        self.collector.set_seed(seed)

    def steps(self) -> list[Step]:
        if self.num_workers > 1:
            self.collector.update_policy_weights_()  # actor weights and the warm-up flag to the workers
        return rollout_steps(self.collector.next())

    def shutdown(self) -> None:
        self.collector.shutdown()


def rollout_steps(rollout: TensorDictBase) -> list[Step]:
    """A collector batch, (T,) or (workers, T / workers), as its transitions in order. The per-transition flags
    (episode ended, first non-finite value) are computed for the whole batch at once: one host read each."""
    flat = rollout.reshape(-1)

    def per_row(value: torch.Tensor) -> torch.Tensor:
        return value.reshape(len(flat), -1)

    ended = per_row(flat["next", "done"]).any(-1).tolist()
    returns = per_row(flat["next", "episode_reward"]).sum(-1).tolist()
    lengths = per_row(flat["next", "step_count"]).amax(-1).tolist()
    bad_obs = per_row(~torch.isfinite(flat["next", "observation"])).any(-1).tolist()
    bad_reward = per_row(~torch.isfinite(flat["next", "reward"])).any(-1).tolist()
    steps = []
    for i, transition in enumerate(flat.select(*TRANSITION_KEYS).unbind(0)):
        nonfinite = NEXT_OBS if bad_obs[i] else NEXT_REWARD if bad_reward[i] else None
        episode = (float(returns[i]), int(lengths[i])) if ended[i] else None
        steps.append(Step(dict(transition.items(include_nested=True, leaves_only=True)), nonfinite, episode))
    return steps


def build_collection(env_id: str, policy: CollectionPolicy, frames_per_batch: int, num_workers: int,
                     seed: int) -> InProcessCollector | BatchCollector:
    """What steps the env for one rank (the module docstring says which, and why)."""
    if num_workers == 1 and frames_per_batch == 1 and in_process_gymnasium(env_id):
        return InProcessCollector(env_id, policy, seed)
    return BatchCollector(build_collector(env_id, policy, frames_per_batch, num_workers, seed), num_workers)


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

