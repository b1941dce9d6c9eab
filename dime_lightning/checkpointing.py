"""Kill-safe checkpoints in env steps, and finding the checkpoint to resume from.

Layout of ``checkpoint.dirpath`` (default ``checkpoints/<MLflow run id>``)::

    step-0000050000.ckpt        Lightning checkpoint: networks, optimizers, temperature, counters, RNG states,
                                MLflow run id, and the name of its replay-buffer dump
    step-0000050000.buffer/     each rank's ``ReplayRing.dump`` (rank0/, rank1/, …: .npy files, ring.json)
    last.ckpt                   hard link to the newest step checkpoint (the publish point)
    final.ckpt                  hard link to the checkpoint written when training ends

    .writer.lock                the writer lock (``run_lock``): one process writes this folder at a time

Order of writes: free space checked for the whole pair (``resources``: a full disk is a clear stop, never a
SIGBUS); buffer dump with its manifest (``buffer_dump``) into a temporary folder → rename; checkpoint into a
temporary file → rename; ``last.ckpt`` re-linked atomically; only then are checkpoints beyond the ``keep``
newest deleted. A kill at any moment leaves the previous ``last.ckpt`` and everything it points to intact.

What a checkpoint holds, and the one reader of each entry: ``checkpoint_schema`` (reading is weights-only,
``safe_checkpoint``; so is a buffer dump's plain-data check). A resume verifies
the checkpoint's dump against its manifest first; when the newest pair of a folder is damaged (unreadable
checkpoint, dump that differs from what was written) it falls back to the newest intact pair, saying so.
"""

from __future__ import annotations

import errno
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
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from dime_lightning import checkpoint_schema as schema
from dime_lightning.buffer_dump import verify_dump
from dime_lightning.errors import BadInputError, CheckpointError, DamagedDumpError, DiskSpaceError, UnsafeCheckpoint
from dime_lightning.resources import require_free_space
from dime_lightning.run_lock import RunLock
from dime_lightning.safe_checkpoint import UnsafeCheckpointError, check_buffer_dump
from dime_lightning.schedule import due
from dime_lightning.tracking import store_creation_lock

STEP_PATTERN = re.compile(r"step-(\d+)\.ckpt")
RUN_ID_PATTERN = re.compile(r"[0-9a-f]{32}")


CHECKPOINT_ALLOWANCE = 256 << 10  # hyperparameters, config, counters and RNG states beside the tensors
RECORD_ALLOWANCE = 1 << 10  # per tensor in the zip archive: header, name, alignment (measured: ~370 bytes)


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
        save_buffer: dump the replay buffer beside each checkpoint (plain .npy files). Default true.
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
            raise BadInputError(f"checkpoint.every_env_steps must be >= 1, got {every_env_steps}")
        if keep < 1:
            raise BadInputError(f"checkpoint.keep must be >= 1, got {keep}")
        self.every_env_steps = every_env_steps
        self.dirpath = Path(dirpath) if dirpath else None
        self.keep = keep
        self.save_buffer = save_buffer
        self.log_artifacts = log_artifacts
        self._last_saved = 0
        self.writer_lock: RunLock | None = None
        self.paused_seconds = 0.0  # wall time training waited for checkpoints (TrainingMonitor excludes it)

    def hold_folder(self) -> None:
        """Take the folder's writer lock (``run_lock``) for this process; ``RunLockedError`` if another holds it.
        Called by the process of global rank 0, before anything of the run is written."""
        if self.writer_lock is None or self.writer_lock.folder != self.dirpath:
            self.release_folder()
            self.writer_lock = RunLock(self.dirpath)
        self.writer_lock.acquire()

    def release_folder(self) -> None:
        if self.writer_lock is not None:
            self.writer_lock.release()

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.dirpath is None:
            run_id = trainer.logger.run_id if isinstance(trainer.logger, MLFlowLogger) else None
            default = Path("checkpoints") / (run_id or time.strftime("run-%Y%m%d-%H%M%S"))
            self.dirpath = Path(trainer.strategy.broadcast(str(default)))  # rank 0 knows the run id
        if trainer.global_rank == 0:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            self.hold_folder()  # already held when fit.py knew the folder before the run started

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_saved = pl_module.env_steps  # a resumed run does not re-save at once

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if due(self._last_saved, pl_module.env_steps, self.every_env_steps):
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
        if self.log_artifacts and isinstance(trainer.logger, MLFlowLogger):  # last.ckpt is the same file: once
            trainer.logger.experiment.log_artifact(trainer.logger.run_id, str(final), "checkpoints")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Saving is collective under DDP: Lightning stops all ranks at the same batch on SIGTERM (rank 0's
        # signal is broadcast), but Ctrl-C reaches each process at its own point, so it saves nothing there.
        interrupted = isinstance(exception, SIGTERMException) or (
            isinstance(exception, KeyboardInterrupt) and trainer.world_size == 1)
        if interrupted and self.dirpath is not None:
            try:
                path = self.save(trainer, pl_module)
            except DiskSpaceError as err:  # the stop goes on (run KILLED, records flushed); the last checkpoint stays
                rank_zero_info(f"\nStopped at env step {pl_module.env_steps} without a checkpoint: {err}")
                return
            rank_zero_info(f"\nStopped at env step {pl_module.env_steps}; checkpoint {path}. "
                           "Resume with the same config and --ckpt_path last")
        elif isinstance(exception, KeyboardInterrupt) and self.dirpath is not None:
            rank_zero_info(f"\nStopped at env step {pl_module.env_steps} by Ctrl-C under DDP: no checkpoint written "
                           "(the last periodic one is kept; SIGTERM stops all ranks together and writes one)")

    def save(self, trainer, pl_module) -> Path:
        started = time.perf_counter()
        try:
            return self._save(trainer, pl_module)
        finally:
            self.paused_seconds += time.perf_counter() - started

    def _save(self, trainer, pl_module) -> Path:
        check = getattr(pl_module, "check_nonfinite", None)
        if check is not None:  # "whole" mode's deferred check, before anything of this checkpoint is written
            check()
        stem = f"step-{pl_module.env_steps:010d}"
        data = trainer.datamodule
        self._require_space(trainer, pl_module, stem)
        data.buffer_dump = None
        path = self.dirpath / f"{stem}.ckpt"
        tmp = self.dirpath / f".{stem}.ckpt.tmp"
        try:
            if self.save_buffer:
                buffer_dir = self.dirpath / f"{stem}.buffer"
                data.dump_buffer(buffer_dir)  # each rank writes its own shard and its manifest, atomically
                data.buffer_dump = buffer_dir.name
            trainer.save_checkpoint(tmp, weights_only=False)  # collective under DDP; rank 0 writes
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            tmp.unlink(missing_ok=True)
            raise DiskSpaceError(f"the disk holding {self.dirpath} filled up while writing {stem} "
                                 "(nothing of it was published; the previous checkpoint is intact); free some space, "
                                 "then resume with --ckpt_path last") from err
        if trainer.global_rank == 0:
            os.replace(tmp, path)
            _link_atomically(path, self.dirpath / "last.ckpt")
            self._prune()
        trainer.strategy.barrier("env_step_checkpoint")
        self._last_saved = pl_module.env_steps
        return path

    def _require_space(self, trainer, pl_module, stem: str) -> None:
        """Every rank stops with ``DiskSpaceError`` when the folder cannot take this checkpoint and all ranks'
        dumps (rank 0 decides, for a folder that all ranks share)."""
        tensors = [t for t in pl_module.state_dict().values() if hasattr(t, "nbytes")]
        tensors += [v for opt in trainer.optimizers for state in opt.state.values() for v in state.values()
                    if hasattr(v, "nbytes")]
        need = CHECKPOINT_ALLOWANCE + sum(t.nbytes + RECORD_ALLOWANCE for t in tensors)
        if self.save_buffer:
            need += trainer.datamodule.dump_need_bytes() * trainer.world_size
        problem = None
        if trainer.global_rank == 0:
            try:
                require_free_space(self.dirpath, need, f"checkpoint {stem} and its replay-buffer dump"
                                   if self.save_buffer else f"checkpoint {stem}")
            except DiskSpaceError as err:
                problem = str(err)
        problem = trainer.strategy.broadcast(problem)
        if problem is not None:
            raise DiskSpaceError(problem)

    def _prune(self) -> None:
        steps = sorted((int(m.group(1)), p) for p in self.dirpath.glob("step-*.ckpt")
                       if (m := STEP_PATTERN.fullmatch(p.name)))
        for _, old in steps[: -self.keep]:
            old.unlink(missing_ok=True)  # last.ckpt / final.ckpt are hard links: their data stays
            shutil.rmtree(old.with_suffix(".buffer"), ignore_errors=True)


class ConfigInCheckpoint(Callback):
    """Stores the resolved config in every checkpoint (``checkpoint_schema``), so that a policy can be rebuilt
    from the checkpoint file alone (``analysis.load_policy``)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        schema.write_config(checkpoint, self.config)


@dataclass(frozen=True)
class ResolvedCheckpoint:
    path: Path  # the checkpoint file to load
    dirpath: Path  # where the resumed run keeps writing checkpoints
    fallback: bool = False  # the folder's older checkpoints may stand in for a damaged newest one


def folder_checkpoints(folder: Path) -> list[Path]:
    """A checkpoint folder's checkpoints, newest first: ``last.ckpt``, then the step checkpoints by env step
    (leaving out the one ``last.ckpt`` links to)."""
    last = folder / "last.ckpt"
    steps = sorted(((int(m.group(1)), p) for p in folder.glob("step-*.ckpt")
                    if (m := STEP_PATTERN.fullmatch(p.name))), reverse=True)
    found = [last] if last.is_file() else []
    return found + [p for _, p in steps if not (found and os.path.samefile(p, last))]


def _stored_config(folder: Path) -> dict[str, Any]:
    """The config stored in the newest readable checkpoint of ``folder`` (empty when none is readable)."""
    for path in folder_checkpoints(folder):
        try:
            return schema.config(schema.read_checkpoint(path))
        except UnsafeCheckpoint:
            raise
        except CheckpointError:
            continue
    return {}


def resolve_checkpoint(
    ckpt_path: str, dirpath: str | None, tracking_uri: str | None = None,
    matches: Callable[[dict[str, Any]], bool] | None = None,
) -> ResolvedCheckpoint:
    """``last``, a file path, or an MLflow run id → the checkpoint to load and the folder to continue in.

    ``last``: the newest checkpoint folder, ``dirpath`` or else among ``checkpoints/*`` the runs whose stored
    config ``matches`` (so that one seed never resumes another's run). A run id: its local
    ``checkpoints/<id>/``, else its logged checkpoint artifact (then new checkpoints go to ``checkpoints/<id>``,
    not to the download location). For ``last`` and a local run folder, ``open_for_resume``
    may fall back to an older intact checkpoint of the folder; a file named explicitly is used as it is.
    """
    if ckpt_path == "last":
        roots = [Path(dirpath)] if dirpath else [p for p in Path("checkpoints").glob("*") if p.is_dir()]
        folders = sorted((root for root in roots if folder_checkpoints(root)),
                         key=lambda root: folder_checkpoints(root)[0].stat().st_mtime, reverse=True)
        where = dirpath or "checkpoints/*"
        if not folders:
            empty = [str(root) for root in roots if root.is_dir()]
            raise CheckpointError(
                f"--ckpt_path last: no checkpoint found in {where}"
                + (f" (the folder(s) {empty} hold none: such a run stopped before its first checkpoint, at "
                   "checkpoint.every_env_steps, and cannot be resumed; start it anew)" if empty else ""))
        for folder in folders:
            if matches is None or dirpath or matches(_stored_config(folder)):
                return ResolvedCheckpoint(folder_checkpoints(folder)[0], folder, fallback=True)
        raise CheckpointError(
            f"--ckpt_path last: none of {[str(f) for f in folders]} was written by a run with this config's "
            "env id, seed and actor; pass the checkpoint file or the MLflow run id instead"
        )
    path = Path(ckpt_path)
    if path.is_file():
        return ResolvedCheckpoint(path, path.parent)
    if RUN_ID_PATTERN.fullmatch(ckpt_path):
        local_dir = Path(dirpath) if dirpath else Path("checkpoints") / ckpt_path
        if local_dir.is_dir() and folder_checkpoints(local_dir):
            return ResolvedCheckpoint(folder_checkpoints(local_dir)[0], local_dir, fallback=True)
        if tracking_uri and tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[10:]).is_file():
            raise CheckpointError(f"--ckpt_path {ckpt_path}: no local {local_dir / 'last.ckpt'}, and the tracking "
                                  f"store {tracking_uri} does not exist (nothing was created)")
        try:
            downloaded = _download_checkpoint(ckpt_path, tracking_uri)
        except Exception as err:
            raise CheckpointError(f"--ckpt_path {ckpt_path}: no local {local_dir / 'last.ckpt'} and no checkpoint "
                                  f"artifact in MLflow run {ckpt_path} ({type(err).__name__}: {err})") from err
        return ResolvedCheckpoint(downloaded, local_dir)
    raise CheckpointError(f"--ckpt_path {ckpt_path}: not 'last', an existing file, or an MLflow run id")


def _download_checkpoint(run_id: str, tracking_uri: str | None) -> Path:
    """The run's logged checkpoint: ``checkpoints/final.ckpt``, or for runs logged by earlier versions (which also
    logged the byte-identical ``last.ckpt``) that one."""
    import mlflow

    with store_creation_lock(tracking_uri or ""):
        logged = {artifact.path for artifact in mlflow.MlflowClient(tracking_uri).list_artifacts(run_id, "checkpoints")}
        name = next((name for name in ("checkpoints/final.ckpt", "checkpoints/last.ckpt") if name in logged),
                    "checkpoints/final.ckpt")
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name, tracking_uri=tracking_uri))


def check_buffer_beside(checkpoint: dict[str, Any], path: Path, data_key: str) -> Path | None:
    """Verify the replay-buffer dump a checkpoint names (its data module's entry ``data_key``:
    ``compat.datamodule_checkpoint_key``): every rank's files against the manifest that this checkpoint recorded
    (``buffer_dump``; ``DamagedDumpError``), then plain data only (``check_buffer_dump``). Returns the verified
    dump folder (None: no dump named, or none beside the checkpoint)."""
    state = schema.data_state(checkpoint, data_key)
    dump = Path(path).parent / str(state["buffer_dump"]) if state.get("buffer_dump") else None
    if dump is None or not dump.is_dir():
        return None
    unverified = []
    for rank, rank_state in enumerate(state.get("ranks") or [{}]):
        if not verify_dump(dump / f"rank{rank}", (rank_state or {}).get("buffer_manifest")):
            unverified.append(rank)
    if unverified:
        rank_zero_warn(f"replay-buffer dump {dump} has no manifest (written before dumps had one): unverified")
    try:
        check_buffer_dump(dump)
    except UnsafeCheckpointError as err:
        raise UnsafeCheckpoint(str(err)) from err
    except ValueError as err:
        raise CheckpointError(str(err)) from err
    return dump


def open_for_resume(found: ResolvedCheckpoint, data_key: str) -> tuple[Path, dict[str, Any], Path | None]:
    """Read and verify the checkpoint to resume from and its buffer dump → (path, checkpoint, verified dump).

    When ``found.fallback`` (``last``, a run folder) and the newest checkpoint or its dump is damaged, the
    folder's older checkpoints are tried newest first and the first intact pair is used, with a warning naming
    what was damaged. A refused (unsafe) file is never passed over: it stops the resume."""
    candidates = folder_checkpoints(found.dirpath) if found.fallback else [found.path]
    damaged = []
    for path in candidates:
        try:
            checkpoint = schema.read_checkpoint(path)
            dump = check_buffer_beside(checkpoint, path, data_key)
        except UnsafeCheckpoint:
            raise
        except (CheckpointError, DamagedDumpError) as err:
            damaged.append(str(err))
            continue
        if damaged:
            rank_zero_warn(f"resuming from {path} (env step {schema.env_steps(checkpoint)}), the "
                           f"newest intact checkpoint of {found.dirpath}, because: {'; '.join(damaged)}")
        return path, checkpoint, dump
    raise CheckpointError(f"no intact checkpoint to resume from in {found.dirpath if found.fallback else found.path}: "
                          + "; ".join(damaged))


def check_compatible(checkpoint: dict[str, Any], path: Path, obs_dim: int, action_dim: int) -> None:
    saved = schema.dims(checkpoint)
    if saved != (obs_dim, action_dim):
        raise CheckpointError(
            f"checkpoint {path} was trained with observation/action sizes {saved}, but this config's env gives "
            f"{(obs_dim, action_dim)}: resume with the config of the run that wrote it"
        )
