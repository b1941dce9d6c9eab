"""Replay data: env → TorchRL collector → TensorDict replay buffer → one ``StepBatch`` per env step.

``ReplayDataModule`` owns every env and collector object (the LightningModule never does). Its iterable
collects ``frames_per_batch`` env steps at a time with the live actor as policy (uniform random actions for
the first ``learning_starts`` steps), writes them to the buffer and yields, per env step, ``utd`` minibatches
of ``batch_size`` transitions stacked as a (utd, B) TensorDict. During the warm-up it yields batches with no
sample so that counters and the progress bar keep moving.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModule
from torchrl.collectors import Collector
from torchrl.data import LazyMemmapStorage, LazyTensorStorage, TensorDictReplayBuffer

from dime_lightning.envs import env_spec, make_env

TRANSITION_KEYS = ("observation", "action", ("next", "observation"), ("next", "reward"), ("next", "terminated"))
EVAL_SEED_OFFSET = 1_000_000
RANK_SEED_OFFSET = 1_000


@dataclass
class StepBatch:
    """What ``training_step`` receives for one env step."""

    sample: TensorDict | None  # (utd, B) minibatches; None during the random warm-up
    env_steps: int  # env steps collected so far, summed over all ranks


@dataclass(frozen=True)
class FinishedEpisode:
    env_steps: int
    episode_return: float
    length: int


class CollectionPolicy:
    """The collector's policy: uniform random actions in [−1, 1] for the first ``random_steps`` calls on this
    rank, then no-grad samples from the live actor (on whatever device the actor lives)."""

    def __init__(self, actor: torch.nn.Module, action_dim: int, random_steps: int, seed: int) -> None:
        self.actor = actor
        self.action_dim = action_dim
        self.random_steps = random_steps
        self.steps_taken = 0
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, observation: torch.Tensor) -> torch.Tensor:
        self.steps_taken += 1
        if self.steps_taken <= self.random_steps:
            shape = (*observation.shape[:-1], self.action_dim)
            return torch.rand(shape, generator=self.generator) * 2.0 - 1.0
        device = next(self.actor.parameters()).device
        return self.actor.act(observation.to(device)).to(observation.device)


class ReplayDataModule(pl.LightningDataModule):
    """Env, collector and replay buffer for one rank; yields one ``StepBatch`` per env step."""

    def __init__(
        self,
        env_id: str = "Pendulum-v1",
        total_env_steps: int = 1_000_000,
        learning_starts: int = 5_000,
        buffer_size: int = 1_000_000,
        batch_size: int = 256,
        utd: int = 2,
        frames_per_batch: int = 1,
        storage: Literal["memory", "memmap"] = "memory",
        scratch_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value, low in [
            ("total_env_steps", total_env_steps, 1), ("learning_starts", learning_starts, 0),
            ("buffer_size", buffer_size, 1), ("batch_size", batch_size, 1), ("utd", utd, 1),
            ("frames_per_batch", frames_per_batch, 1),
        ]:
            if value < low:
                raise ValueError(f"data.{name} must be >= {low}, got {value}")
        if total_env_steps < learning_starts:
            raise ValueError(
                f"data.total_env_steps ({total_env_steps}) must be >= data.learning_starts ({learning_starts})"
            )
        if storage not in ("memory", "memmap"):
            raise ValueError(f"data.storage must be 'memory' or 'memmap', got {storage!r}")
        self.save_hyperparameters(logger=False)
        self.spec = env_spec(env_id)  # validates the id and reads the dimensions
        self.obs_dim, self.action_dim = self.spec.obs_dim, self.spec.action_dim
        self.env_steps = 0  # all ranks
        self._local_steps = 0  # this rank
        self.finished_episodes: list[FinishedEpisode] = []
        self._collector: Collector | None = None
        self._buffer: TensorDictReplayBuffer | None = None
        self._policy: CollectionPolicy | None = None

    # ---- setup / teardown ------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def setup(self, stage: str) -> None:
        if stage != "fit" or self._collector is not None:
            return
        hp = self.hparams
        rank_seed = hp.seed + RANK_SEED_OFFSET * self.rank
        self._buffer = self.build_buffer()
        actor = self.trainer.lightning_module.actor
        self._policy = CollectionPolicy(actor, self.action_dim, self._local(hp.learning_starts), rank_seed)
        policy = TensorDictModule(self._policy, in_keys=["observation"], out_keys=["action"])
        self._collector = Collector(
            make_env(hp.env_id, seed=rank_seed), policy, frames_per_batch=hp.frames_per_batch, total_frames=-1,
            auto_register_policy_transforms=False,
        )

    def build_buffer(self) -> TensorDictReplayBuffer:
        hp = self.hparams
        size = self._local(hp.buffer_size)
        if hp.storage == "memmap":
            scratch = None
            if hp.scratch_dir is not None:
                scratch = Path(hp.scratch_dir) / f"rank{self.rank}"
                scratch.mkdir(parents=True, exist_ok=True)
            storage = LazyMemmapStorage(size, scratch_dir=scratch)
        else:
            storage = LazyTensorStorage(size)
        return TensorDictReplayBuffer(storage=storage, batch_size=hp.utd * hp.batch_size)

    def _local(self, steps: int) -> int:
        """Per-rank share of a global env-step count."""
        return math.ceil(steps / self.world_size)

    def teardown(self, stage: str) -> None:
        if self._collector is not None:
            self._collector.shutdown()
            self._collector = None

    # ---- iteration ---------------------------------------------------------------------------------------
    def train_dataloader(self) -> Iterator[StepBatch]:
        return self._iterate()

    def _iterate(self) -> Iterator[StepBatch]:
        hp = self.hparams
        assert self._collector is not None and self._buffer is not None, "setup('fit') must run first"
        while self.env_steps < hp.total_env_steps:
            rollout = self._collector.next()  # (frames_per_batch,) transitions
            self._buffer.extend(rollout.select(*TRANSITION_KEYS))
            for frame in range(rollout.shape[0]):
                self.env_steps += self.world_size
                self._local_steps += 1
                self._record_episode(rollout[frame])
                if self._local_steps > self._local(hp.learning_starts):
                    sample = self._buffer.sample().reshape(hp.utd, hp.batch_size)  # (utd·B,) -> (utd, B)
                else:
                    sample = None
                yield StepBatch(sample, self.env_steps)
                if self.env_steps >= hp.total_env_steps:
                    return

    def _record_episode(self, transition: TensorDictBase) -> None:
        if bool(transition["next", "done"].any()):
            self.finished_episodes.append(
                FinishedEpisode(
                    self.env_steps,
                    float(transition["next", "episode_reward"].sum()),
                    int(transition["next", "step_count"].max()),
                )
            )

    def pop_finished_episodes(self) -> list[FinishedEpisode]:
        episodes, self.finished_episodes = self.finished_episodes, []
        return episodes

    def transfer_batch_to_device(self, batch: StepBatch, device: torch.device, dataloader_idx: int) -> StepBatch:
        if batch.sample is not None:
            batch.sample = batch.sample.to(device, non_blocking=True)
        return batch

    # ---- checkpointed state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"env_steps": self.env_steps}

    def load_state_dict(self, state_dict: dict) -> None:
        self.env_steps = int(state_dict["env_steps"])
