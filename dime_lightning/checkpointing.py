"""Kill-safe checkpoints in env steps, and finding the checkpoint to resume from.

Layout of ``checkpoint.dirpath`` (default ``checkpoints/<MLflow run id>``)::

    step-0000050000.ckpt        Lightning checkpoint: networks, optimizers, temperature, counters, RNG states,
                                MLflow run id, and the name of its replay-buffer dump
    step-0000050000.buffer/     TorchRL ``ReplayBuffer.dumps`` of each rank's buffer (rank0/, rank1/, …)
    last.ckpt                   hard link to the newest step checkpoint (the publish point)
    final.ckpt                  hard link to the checkpoint written when training ends

Order of writes: buffer dump into a temporary folder → rename; checkpoint into a temporary file → rename;
``last.ckpt`` re-linked atomically; only then are checkpoints beyond the ``keep`` newest deleted. A kill at
any moment leaves the previous ``last.ckpt`` and everything it points to intact.

Reading is weights-only (``safe_checkpoint``): a checkpoint or buffer dump that would need any type beyond
tensors, plain containers and numpy's RNG-state array is refused before it is unpickled.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from dime_lightning.safe_checkpoint import (
    UnreadableCheckpointError,
    UnsafeCheckpointError,
    check_buffer_dump,
    safe_load,
)
from dime_lightning.tracking import store_creation_lock

STEP_PATTERN = re.compile(r"step-(\d+)\.ckpt")
RUN_ID_PATTERN = re.compile(r"[0-9a-f]{32}")
REQUIRED_KEYS = ("state_dict", "dime_counters", "hyper_parameters")


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, read or used with this config."""


def _link_atomically(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    os.link(source, tmp)
    os.replace(tmp, target)


class EnvStepCheckpoint(Callback):
    """Checkpoint every ``every_env_steps`` env steps, at the end of training, and on Ctrl-C / SIGTERM.

    ``keep`` bounds the number of step checkpoints (and buffer dumps) kept on disk; ``save_buffer`` dumps
    the replay buffer beside each checkpoint (large for million-transition buffers: without it a resumed run
    refills its buffer with ``learning_starts`` fresh env steps before updating again).

    Args:
        every_env_steps: env steps between step checkpoints, >= 1. Default 50000.
        dirpath: checkpoint folder; null: ``checkpoints/<MLflow run id>`` in the working directory.
        keep: step checkpoints (and buffer dumps) kept on disk, >= 1; last.ckpt and final.ckpt are links.
            Default 2.
        save_buffer: dump the replay buffer beside each checkpoint (TorchRL dumps). Default true.
        log_artifacts: also log each checkpoint as an MLflow artifact of the run. Default true.
    """

    def __init__(
        self,
        every_env_steps: int = 50_000,
        dirpath: str | None = None,
        keep: int = 2,
        save_buffer: bool = True,
        log_artifacts: bool = True,
    ) -> None:
        if every_env_steps < 1:
            raise ValueError(f"checkpoint.every_env_steps must be >= 1, got {every_env_steps}")
        if keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
        self.every_env_steps = every_env_steps
        self.dirpath = Path(dirpath) if dirpath else None
        self.keep = keep
        self.save_buffer = save_buffer
        self.log_artifacts = log_artifacts
        self._last_saved = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.dirpath is None:
            run_id = trainer.logger.run_id if isinstance(trainer.logger, MLFlowLogger) else None
            default = Path("checkpoints") / (run_id or time.strftime("run-%Y%m%d-%H%M%S"))
            self.dirpath = Path(trainer.strategy.broadcast(str(default)))  # rank 0 knows the run id
        if trainer.global_rank == 0:
            self.dirpath.mkdir(parents=True, exist_ok=True)

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_saved = pl_module.env_steps  # a resumed run does not re-save at once

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.env_steps // self.every_env_steps > self._last_saved // self.every_env_steps:
            self.save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        path = self.dirpath / f"step-{pl_module.env_steps:010d}.ckpt"
        need_save = self._last_saved != pl_module.env_steps or not path.is_file()
        if trainer.strategy.broadcast(need_save):  # rank 0 decides: save() is collective
            path = self.save(trainer, pl_module)
        if trainer.global_rank != 0:
            return
        final = self.dirpath / "final.ckpt"
        _link_atomically(path, final)
        if self.log_artifacts and isinstance(trainer.logger, MLFlowLogger):
            for artifact in (self.dirpath / "last.ckpt", final):
                trainer.logger.experiment.log_artifact(trainer.logger.run_id, str(artifact), "checkpoints")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Saving is collective under DDP: Lightning stops all ranks at the same batch on SIGTERM (rank 0's
        # signal is broadcast), but Ctrl-C reaches each process at its own point, so it saves nothing there.
        interrupted = isinstance(exception, SIGTERMException) or (
            isinstance(exception, KeyboardInterrupt) and trainer.world_size == 1)
        if interrupted and self.dirpath is not None:
            path = self.save(trainer, pl_module)
            rank_zero_info(f"\nStopped at env step {pl_module.env_steps}; checkpoint {path}. "
                           "Resume with the same config and --ckpt_path last")
        elif isinstance(exception, KeyboardInterrupt) and self.dirpath is not None:
            rank_zero_info(f"\nStopped at env step {pl_module.env_steps} by Ctrl-C under DDP: no checkpoint written "
                           "(the last periodic one is kept; SIGTERM stops all ranks together and writes one)")

    def save(self, trainer, pl_module) -> Path:
        check = getattr(pl_module, "check_nonfinite", None)
        if check is not None:  # "whole" mode's deferred check, before anything of this checkpoint is written
            check()
        stem = f"step-{pl_module.env_steps:010d}"
        data = trainer.datamodule
        data.buffer_dump = None
        if self.save_buffer:
            buffer_dir = self.dirpath / f"{stem}.buffer"
            data.dump_buffer(buffer_dir)  # each rank writes its own shard, atomically
            data.buffer_dump = buffer_dir.name
        path = self.dirpath / f"{stem}.ckpt"
        tmp = self.dirpath / f".{stem}.ckpt.tmp"
        trainer.save_checkpoint(tmp, weights_only=False)  # collective under DDP; rank 0 writes
        if trainer.global_rank == 0:
            os.replace(tmp, path)
            _link_atomically(path, self.dirpath / "last.ckpt")
            self._prune()
        trainer.strategy.barrier("env_step_checkpoint")
        self._last_saved = pl_module.env_steps
        return path

    def _prune(self) -> None:
        steps = sorted((int(m.group(1)), p) for p in self.dirpath.glob("step-*.ckpt")
                       if (m := STEP_PATTERN.fullmatch(p.name)))
        for _, old in steps[: -self.keep]:
            old.unlink(missing_ok=True)  # last.ckpt / final.ckpt are hard links: their data stays
            shutil.rmtree(old.with_suffix(".buffer"), ignore_errors=True)


class ConfigInCheckpoint(Callback):
    """Stores the resolved config in every checkpoint (``checkpoint["dime_config"]``), so that a policy can be
    rebuilt from the checkpoint file alone (``analysis.load_policy``)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint["dime_config"] = self.config


@dataclass(frozen=True)
class ResolvedCheckpoint:
    path: Path  # the checkpoint file to load
    dirpath: Path  # where the resumed run keeps writing checkpoints


def resolve_checkpoint(
    ckpt_path: str, dirpath: str | None, tracking_uri: str | None = None,
    matches: Callable[[dict[str, Any]], bool] | None = None,
) -> ResolvedCheckpoint:
    """``last``, a file path, or an MLflow run id → the checkpoint to load and the folder to continue in.

    ``last``: the newest ``last.ckpt`` under ``dirpath``, else under ``checkpoints/*`` among the runs whose stored
    config ``matches`` (so that one seed never resumes another's run). A run id: its local
    ``checkpoints/<id>/last.ckpt``, else its ``checkpoints/last.ckpt`` artifact (then new checkpoints go to
    ``checkpoints/<id>``, not to the download location).
    """
    if ckpt_path == "last":
        roots = [Path(dirpath)] if dirpath else list(Path("checkpoints").glob("*"))
        candidates = sorted((root / "last.ckpt" for root in roots if (root / "last.ckpt").is_file()),
                            key=lambda p: p.stat().st_mtime, reverse=True)
        where = dirpath or "checkpoints/*"
        if not candidates:
            raise CheckpointError(f"--ckpt_path last: no last.ckpt found in {where}")
        for candidate in candidates:
            if matches is None or dirpath or matches(read_checkpoint(candidate).get("dime_config") or {}):
                return ResolvedCheckpoint(candidate, candidate.parent)
        raise CheckpointError(
            f"--ckpt_path last: none of {[str(c) for c in candidates]} was written by a run with this config's "
            "env id, seed and actor; pass the checkpoint file or the MLflow run id instead"
        )
    path = Path(ckpt_path)
    if path.is_file():
        return ResolvedCheckpoint(path, path.parent)
    if RUN_ID_PATTERN.fullmatch(ckpt_path):
        local_dir = Path(dirpath) if dirpath else Path("checkpoints") / ckpt_path
        if (local_dir / "last.ckpt").is_file():
            return ResolvedCheckpoint(local_dir / "last.ckpt", local_dir)
        try:
            import mlflow

            with store_creation_lock(tracking_uri or ""):
                downloaded = Path(mlflow.artifacts.download_artifacts(
                    run_id=ckpt_path, artifact_path="checkpoints/last.ckpt", tracking_uri=tracking_uri))
        except Exception as err:
            raise CheckpointError(f"--ckpt_path {ckpt_path}: no local {local_dir / 'last.ckpt'} and no checkpoint "
                                  f"artifact in MLflow run {ckpt_path} ({type(err).__name__}: {err})") from err
        return ResolvedCheckpoint(downloaded, local_dir)
    raise CheckpointError(f"--ckpt_path {ckpt_path}: not 'last', an existing file, or an MLflow run id")


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load (memory-mapped, weights only: see ``safe_checkpoint``) and sanity-check a checkpoint; a clear error
    for corrupt, foreign or unsafe files."""
    try:
        checkpoint = safe_load(path)
    except (UnsafeCheckpointError, UnreadableCheckpointError) as err:
        raise CheckpointError(str(err)) from err
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} cannot be read (corrupt or truncated?): "
                              f"{type(err).__name__}: {err}") from err
    if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in REQUIRED_KEYS):
        raise CheckpointError(f"checkpoint {path} is not a dime_lightning checkpoint (missing {REQUIRED_KEYS})")
    return checkpoint


def check_buffer_beside(checkpoint: dict[str, Any], path: Path) -> None:
    """The replay-buffer dump a checkpoint names (beside it) holds plain data only (``check_buffer_dump``)."""
    dump = (checkpoint.get("ReplayDataModule") or {}).get("buffer_dump")
    if dump:
        try:
            check_buffer_dump(Path(path).parent / str(dump))
        except ValueError as err:
            raise CheckpointError(str(err)) from err


def check_compatible(checkpoint: dict[str, Any], path: Path, obs_dim: int, action_dim: int) -> None:
    hparams = checkpoint["hyper_parameters"]
    saved = (hparams.get("obs_dim"), hparams.get("action_dim"))
    if saved != (obs_dim, action_dim):
        raise CheckpointError(
            f"checkpoint {path} was trained with observation/action sizes {saved}, but this config's env gives "
            f"{(obs_dim, action_dim)}: resume with the config of the run that wrote it"
        )
