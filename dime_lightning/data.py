"""Replay data: env → collector → replay ring → one ``StepBatch`` per env step.

``ReplayDataModule`` owns every env and collector object (the LightningModule never does). Its iterable
collects ``frames_per_batch`` env steps at a time (in this process, or from ``num_workers`` env processes:
``collection.py``) with the actor as policy (uniform random actions for the first ``learning_starts``
steps) and hands the module, per env step, that step written to the replay buffer (``replay.py``) and
``utd`` minibatches of ``batch_size`` transitions stacked as a (utd, B) TensorDict. During the warm-up the
batches carry no sample, so that counters and the progress bar keep moving.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from tensordict import TensorDict

from dime_lightning import auto
from dime_lightning.buffer_dump import dump_bytes, verify_dump, write_manifest
from dime_lightning.collection import BatchCollector, CollectionPolicy, InProcessCollector, Step, build_collection
from dime_lightning.distributed import gather_objects
from dime_lightning.envs import env_spec
from dime_lightning.errors import BadInputError, NonFiniteError
from dime_lightning.replay import ReplayRing, transition_layout
from dime_lightning.resources import free_bytes, human_bytes, require_memory

EVAL_SEED_OFFSET = 1_000_000
RANK_SEED_OFFSET = 1_000
STORAGES = ("auto", "memory", "memmap", "device")
# float32 observations, actions and rewards; a bool `terminated`
FLOAT_BYTES, BOOL_BYTES = 4, 1


class StepToken:
    """A placeholder batch: the env step is taken when Lightning hands the batch to the module."""


@dataclass
class StepBatch:
    """What ``training_step`` receives for one env step."""

    sample: TensorDict | None  # (utd, B) minibatches; None during the random warm-up
    env_steps: int  # env steps collected so far, summed over all ranks
    env_error: Exception | None = None  # DDP: this rank's collection failed (the module stops every rank)


@dataclass(frozen=True)
class FinishedEpisode:
    env_steps: int
    episode_return: float
    length: int


class ReplayDataModule(pl.LightningDataModule):
    """Env, collector and replay buffer for one rank; yields one ``StepBatch`` per env step.

    Args:
        env_id: a Gymnasium id with a bounded continuous action space, ``dm_control/<domain>-<task>``, or a
            built-in toy task. Default Pendulum-v1.
        total_env_steps: length of training in env steps, over all ranks, >= learning_starts. Default 1000000.
        learning_starts: env steps of uniform random actions before the first update, >= 0. Default 5000.
        buffer_size: replay capacity in transitions (per rank), >= 1. Default 1000000.
        batch_size: transitions per minibatch (each of the utd minibatches of an env step), >= 1. Default 256.
        utd: minibatches per env step; linked from model.update.utd (never set here).
        frames_per_batch: env steps collected per collector batch (a multiple of num_workers), >= 1. Default 1.
        num_workers: env worker processes of the collector (1: the env runs in this process). Default 1.
        storage: where the replay buffer lives: 'auto' (chosen at the start of a fit by device and free memory:
            ``dime_lightning.auto``), 'memory' (RAM), 'memmap' (files under scratch_dir) or 'device' (on the
            training device, sampled there). Default 'auto'.
        scratch_dir: folder of the 'memmap' storage; null: a temporary folder. Default null.
        seed: seed of the envs and the buffer sampler; linked from seed_everything (never set here).
    """

    def __init__(
        self,
        env_id: str = "Pendulum-v1",
        total_env_steps: int = 1_000_000,
        learning_starts: int = 5_000,
        buffer_size: int = 1_000_000,
        batch_size: int = 256,
        utd: int = 2,
        frames_per_batch: int = 1,
        num_workers: int = 1,
        storage: Literal["auto", "memory", "memmap", "device"] = "auto",
        scratch_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value, low in [
            ("total_env_steps", total_env_steps, 1), ("learning_starts", learning_starts, 0),
            ("buffer_size", buffer_size, 1), ("batch_size", batch_size, 1), ("utd", utd, 1),
            ("frames_per_batch", frames_per_batch, 1), ("num_workers", num_workers, 1),
        ]:
            if value < low:
                raise BadInputError(f"data.{name} must be >= {low}, got {value}")
        if total_env_steps < learning_starts:
            raise BadInputError(
                f"data.total_env_steps ({total_env_steps}) must be >= data.learning_starts ({learning_starts})"
            )
        if frames_per_batch % num_workers:
            raise BadInputError(f"data.frames_per_batch ({frames_per_batch}) must be a multiple of data.num_workers "
                             f"({num_workers}): each env worker collects frames_per_batch / num_workers per batch")
        if storage not in STORAGES:
            raise BadInputError(f"data.storage must be one of {', '.join(map(repr, STORAGES))}, got {storage!r}")
        self.save_hyperparameters(logger=False)
        self.spec = env_spec(env_id)  # validates the id and reads the dimensions
        self.obs_dim, self.action_dim = self.spec.obs_dim, self.spec.action_dim
        self.env_steps = 0  # all ranks
        self._local_steps = 0  # this rank
        self._updates_begin_after = 0  # env steps on this rank before updates begin; set in setup
        self.buffer_dump: str | None = None  # name of the dump the next checkpoint points to (set by it)
        self.verified_dump: Path | None = None  # a dump already verified before the fit (fit.py's pre-flight)
        self._dump_digest: str | None = None  # SHA-256 of this rank's last dump manifest (buffer_dump.py)
        self.finished_episodes: list[FinishedEpisode] = []
        self._collector: InProcessCollector | BatchCollector | None = None
        self._buffer: ReplayRing | None = None
        self._random_steps, self._ranks = 0, 1  # set in setup
        self._policy: CollectionPolicy | None = None
        self._pending: list[Step] = []  # collected env steps not yet consumed (frames_per_batch > 1)
        self._scratch: Path | None = None  # memmap scratch folder of this process
        self.storage: str | None = None if storage == "auto" else storage  # "auto": resolved by storage_for()

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
        if self.rank > 0:  # the model was built from the shared seed; from here on each rank draws its own noise
            torch.manual_seed(rank_seed)
            np.random.seed(rank_seed)  # noqa: NPY002 (the global state seed_everything sets)
            random.seed(rank_seed)
        self._updates_begin_after = self._local(hp.learning_starts)
        self._random_steps = self._local(hp.learning_starts)  # this rank's env steps of uniform random actions
        self._ranks = self.world_size  # fixed for the fit: read once, not on every env step
        self._buffer = self.build_buffer()
        module = self.trainer.lightning_module
        self._policy = CollectionPolicy(module.actor, self.action_dim, seed=rank_seed, act=getattr(module, "act", None))
        self._collector = build_collection(hp.env_id, self._policy, hp.frames_per_batch, hp.num_workers, rank_seed)

    @property
    def learning_env_steps(self) -> int:
        """Env steps of this run that update the networks (all ranks): what ``auto`` weighs compile time against."""
        return self.hparams.total_env_steps - self.hparams.learning_starts

    def storage_for(self, device: torch.device) -> str:
        """The replay storage on ``device``: the configured one, or what ``auto`` picks there (decided once)."""
        if self.storage is None:
            need = self._local(self.hparams.buffer_size) * self.transition_bytes()
            free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
            self.storage = auto.storage(device.type, need, free)
        return self.storage

    def build_buffer(self) -> ReplayRing:
        hp = self.hparams
        strategy = getattr(self.trainer, "strategy", None)  # none outside a Trainer: the CPU
        device = strategy.root_device if strategy is not None else torch.device("cpu")
        kind = self.storage_for(device)
        scratch = None
        if kind == "memmap":  # a folder of this process's own, removed at teardown
            self._scratch = Path(hp.scratch_dir or tempfile.gettempdir()) / f"dime-{os.getpid()}-{time.time_ns()}"
            scratch = self._scratch / f"rank{self.rank}"
            scratch.mkdir(parents=True, exist_ok=True)
        layout = transition_layout(self.obs_dim, self.action_dim)
        return ReplayRing(self._local(hp.buffer_size), layout, kind, device, scratch)

    def transition_bytes(self) -> int:
        """Bytes one stored transition takes (observation and next observation, action, reward, terminated)."""
        return (2 * self.obs_dim + self.action_dim + 1) * FLOAT_BYTES + BOOL_BYTES

    def check_capacity(self, device: torch.device, ranks_here: int) -> None:
        """Refuse (``ValueError``: exit 2) a replay buffer that this machine could never hold, before anything is
        built: ``ranks_here`` processes of this machine each allocate ``ceil(buffer_size / world size)``
        transitions in RAM (``memory``), on ``device`` (``device``) or in files under scratch_dir (``memmap``)."""
        hp = self.hparams
        capacity = self._local(hp.buffer_size)  # the ring is allocated whole at setup
        need = capacity * self.transition_bytes() * ranks_here
        kind = self.storage_for(device)
        what = (f"data.buffer_size {hp.buffer_size} with data.storage {kind!r} ({capacity} transitions of "
                f"{self.transition_bytes()} bytes for each of {ranks_here} process(es) here)")
        if kind == "memmap":
            folder = Path(hp.scratch_dir) if hp.scratch_dir else Path(tempfile.gettempdir())
            if need > free_bytes(folder):
                raise BadInputError(f"{what} needs about {human_bytes(need)} of disk in {folder}, "
                                 f"{human_bytes(free_bytes(folder))} is free: lower data.buffer_size or set "
                                 "data.scratch_dir to a disk with room")
        elif kind == "device" and device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if need > free:
                raise BadInputError(f"{what} needs about {human_bytes(need)} on {device}, {human_bytes(free)} is free: "
                                 "lower data.buffer_size or use data.storage memory")
        else:
            require_memory(need, what, "lower data.buffer_size, or use data.storage memmap with a data.scratch_dir "
                                       "on a disk with room")

    def dump_need_bytes(self) -> int:
        """Disk space this rank's next buffer dump takes (the filled rows; the capacity before setup)."""
        filled = len(self._buffer) if self._buffer is not None else self._local(self.hparams.buffer_size)
        return dump_bytes(self.transition_bytes(), filled)

    def _local(self, steps: int) -> int:
        """Per-rank share of a global env-step count."""
        return math.ceil(steps / self.world_size)

    def teardown(self, stage: str) -> None:
        if self._collector is not None:
            self._collector.shutdown()
            self._collector = None
        if self._scratch is not None:  # the memmap ring's files
            self._buffer = None
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    # ---- iteration ---------------------------------------------------------------------------------------
    def train_dataloader(self) -> Iterator[StepToken]:
        """One token per remaining env step (per rank). Lightning fetches batches one ahead, so the env step
        itself is taken in ``on_before_batch_transfer``, when its batch is consumed: at every batch end the
        buffer, the counters and the checkpoint agree exactly."""
        assert self._collector is not None and self._buffer is not None, "setup('fit') must run first"
        remaining = math.ceil((self.hparams.total_env_steps - self.env_steps) / self.world_size)
        return (StepToken() for _ in range(max(remaining, 0)))

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> StepBatch:
        return self.next_step() if isinstance(batch, StepToken) else batch

    def next_step(self) -> StepBatch:
        """Take one env step on this rank, store it, and sample ``utd`` minibatches (after the warm-up)."""
        hp = self.hparams
        if not self._pending:
            try:
                self._pending = self._collect()
            except Exception as error:
                if self.world_size == 1:
                    raise
                return StepBatch(None, self.env_steps, env_error=error)  # a lone raise would hang the other ranks
        step = self._pending.pop(0)
        self._buffer.add(step.transition)
        self.env_steps += self._ranks
        self._local_steps += 1
        if step.episode is not None:
            self.finished_episodes.append(FinishedEpisode(self.env_steps, *step.episode))
        sample = None
        if self._local_steps > self._updates_begin_after:
            sample = self._buffer.sample(hp.utd, hp.batch_size)
        return StepBatch(sample, self.env_steps)

    def _collect(self) -> list[Step]:
        """The next env steps: one, or a collector batch of frames_per_batch."""
        uniform = self._local_steps < self._random_steps  # the random warm-up
        if bool(self._policy.uniform) != uniform:
            self._policy.uniform.fill_(uniform)
        steps = self._collector.steps()
        for offset, step in enumerate(steps, start=1):
            if step.nonfinite is not None:
                where = f" on rank {self.rank}" if self.world_size > 1 else ""
                raise NonFiniteError(f"non-finite {step.nonfinite} from env {self.hparams.env_id} at env step "
                                     f"{self.env_steps + offset * self.world_size}{where}")
        return steps

    def pop_finished_episodes(self) -> list[FinishedEpisode]:
        episodes, self.finished_episodes = self.finished_episodes, []
        return episodes

    def transfer_batch_to_device(self, batch: StepBatch, device: torch.device, dataloader_idx: int) -> StepBatch:
        if batch.sample is not None:
            batch.sample = batch.sample.to(device, non_blocking=True)
        return batch

    # ---- checkpointed state ------------------------------------------------------------------------------
    def dump_buffer(self, directory: Path) -> None:
        """This rank's buffer → ``directory/rank<r>`` (``ReplayRing.dump``) and a manifest of what it wrote
        (``buffer_dump``), in a temporary folder renamed when complete. Free space is checked by the caller."""
        target = Path(directory) / f"rank{self.rank}"
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            self._buffer.dump(tmp)
            digest = write_manifest(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # e.g. ENOSPC: leave no half-written dump behind
            raise
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        self._dump_digest = digest

    def state_dict(self) -> dict:
        """This rank's env steps, the buffer dump's name and, per rank (gathered: collective under DDP), RNG states.
        The run's env steps are the module's (``checkpoint_schema``): here they are local steps × ranks."""
        return {
            "local_steps": self._local_steps,
            "buffer_dump": self.buffer_dump,
            "ranks": gather_objects(self._rank_state()),
        }

    def _rank_state(self) -> dict:
        return {
            "buffer_manifest": self._dump_digest if self.buffer_dump else None,  # binds the dump to this checkpoint
            "policy_rng": self._policy.generator.get_state() if self._policy is not None else None,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            "numpy_rng": np.random.get_state(),  # noqa: NPY002 (the global state seed_everything sets)
            "python_rng": random.getstate(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore counters, this rank's RNG states and its replay buffer (setup('fit') has run)."""
        ranks = state_dict.get("ranks") or [state_dict]  # checkpoints before multi-process training: one rank
        if len(ranks) != self.world_size:
            raise BadInputError(
                f"the checkpoint was written by {len(ranks)} process(es) (trainer.devices × trainer.num_nodes) "
                f"but this run has {self.world_size}: resume with the same number"
            )
        self._local_steps = int(state_dict["local_steps"])
        self.env_steps = self._local_steps * self.world_size  # every rank takes one env step per batch
        state = ranks[self.rank]
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        np.random.set_state(state["numpy_rng"])  # noqa: NPY002
        random.setstate(state["python_rng"])
        if self._policy is not None:
            self._policy.generator.set_state(state["policy_rng"])
        if self._collector is not None:  # a fresh episode with a fresh env seed
            self._collector.set_seed(self.hparams.seed + RANK_SEED_OFFSET * self.rank + self._local_steps)
        self._restore_buffer(state_dict.get("buffer_dump"), state.get("buffer_manifest"))

    def _restore_buffer(self, dump: str | None, manifest_sha256: str | None) -> None:
        ckpt_path = getattr(self.trainer, "ckpt_path", None)
        source = Path(ckpt_path).parent / dump / f"rank{self.rank}" if dump and ckpt_path else None
        if source is not None and source.is_dir():
            if source.parent != self.verified_dump and not verify_dump(source, manifest_sha256):
                rank_zero_warn(f"replay-buffer dump {source} has no manifest (written before dumps had one): "
                               "loaded unverified")
            self._buffer.load(source)
            return
        # no buffer dump (not saved, or not beside this checkpoint): refill with `learning_starts` fresh env
        # steps from the restored policy before updating again
        if dump:
            rank_zero_warn(f"replay-buffer dump {source} named by the checkpoint is missing; refilling the buffer")
        self._updates_begin_after = self._local_steps + self._local(self.hparams.learning_starts)
