"""MLflow tracking: the embedded default, the run record, resuming the same run, and its final status.

- ``check_tracking_uri``: fail fast (before training) on an invalid or unreachable tracking URI; an sqlite
  store is created and migrated under a file lock (``store_creation_lock``), once, by whichever process
  comes first.
- ``DIMEMLFlowLogger``: Lightning's ``MLFlowLogger`` that can continue an existing run without duplicate or
  backwards steps, whose final status can be set to KILLED, and whose writes go through a bounded queue
  that survives store outages (``tracking_queue``).
- ``MLflowRunInfo``: the resolved config (params + ``config.yaml``), package versions, and the run's status on
  an exception: KILLED for Ctrl-C / SIGTERM, FAILED with the error as a tag otherwise.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from mlflow.exceptions import MlflowException

from dime_lightning import checkpoint_schema as schema
from dime_lightning.errors import TrackingError
from dime_lightning.runs import mode_tags, run_tags
from dime_lightning.tracking_queue import QueuedClient


def log_at_env_steps(trainer: Any, metrics: dict[str, float], env_steps: int) -> None:
    """Write metrics at x = env steps to every logger (rank 0's: Lightning's loggers write on rank 0 only), and
    keep them for the progress bar; the one path of every metric DIME logs."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=env_steps)
    trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})


def validate_tracking_uri(uri: str) -> None:
    """Checks that touch nothing: the store kind, and that an sqlite file's directory exists."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.parent.exists():
            raise TrackingError(f"MLflow tracking URI {uri!r}: directory {path.parent} does not exist")
    elif uri.startswith("file:") or "://" not in uri:
        raise TrackingError(
            f"MLflow tracking URI {uri!r}: the file store is not supported by MLflow 3.13+; "
            "use sqlite:///mlflow.db (the default) or an http(s):// server"
        )


@contextlib.contextmanager
def store_creation_lock(uri: str, timeout: float = 600.0) -> Iterator[None]:
    """For an sqlite store: hold ``<db>.lock`` (a file lock) while the store is opened, so that of several
    processes started together exactly one creates and migrates the schema and the others then find it ready
    (MLflow's own creation is not safe against concurrent processes). Other stores: nothing to do."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    from filelock import FileLock

    with FileLock(f"{uri[len('sqlite:///'):]}.lock", timeout=timeout):
        yield


def check_tracking_uri(uri: str) -> None:
    """Open the tracking store once (no retries) so that a bad URI fails before any training starts (an sqlite
    store is created by this)."""
    validate_tracking_uri(uri)
    import mlflow

    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"})
    try:
        with store_creation_lock(uri):
            mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as err:  # mlflow raises many types for unreachable or malformed stores
        raise TrackingError(f"MLflow tracking URI {uri!r} is not usable: {type(err).__name__}: {err}") from err
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_in_store(uri: str, run_id: str) -> bool:
    """Whether MLflow run ``run_id`` exists in the store at ``uri`` (False for a run moved from another store;
    ``TrackingError`` when the store cannot answer)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.MlflowClient(tracking_uri=uri).get_run(run_id)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise TrackingError(f"MLflow tracking URI {uri!r}: cannot look up run {run_id}: {err}") from err
    return True


class DIMEMLFlowLogger(MLFlowLogger):
    """``MLFlowLogger`` that continues ``run_id`` when given: the run goes back to RUNNING, and each metric
    drops values at steps it already has, so a resumed run's history stays strictly increasing (the values
    logged between the last checkpoint and a crash are kept, the replayed ones dropped).

    Every write goes through a ``QueuedClient`` (``tracking_queue``): training never waits for the store nor
    fails with it. ``spill_dir``: where records beyond ``max_pending`` and those still undelivered
    ``flush_timeout`` seconds after the end are kept (``mlflow-pending-*.jsonl``, beside the checkpoints)."""

    def __init__(self, *args: Any, spill_dir: Callable[[], Path | None] | None = None, max_pending: int = 10_000,
                 flush_timeout: float = 60.0, **kwargs: Any) -> None:
        # MLflow's client opens the store on every rank: ranks started together (srun, torchrun) must not create
        # an sqlite store side by side
        with store_creation_lock(kwargs.get("tracking_uri") or ""):
            super().__init__(*args, **kwargs)
        self.final_status: str | None = None
        self.pending_file: Path | None = None
        self._finalized = False
        self._flush_timeout = flush_timeout
        self._resume_run_id: str | None = kwargs.get("run_id")
        self._logged_until: dict[str, int] = {}
        self._queue_args = (kwargs.get("tracking_uri") or "", spill_dir or (lambda: None), max_pending)
        self._queue: QueuedClient | None = None  # made when the run is opened

    @property
    def experiment(self):
        """Lightning's ``MlflowClient`` (the run opened by the first access) behind a ``QueuedClient``: every write,
        Lightning's own (``log_batch`` for metrics and params) and ours, goes through the queue."""
        try:
            client = super().experiment
        except MlflowException as err:  # another process created the experiment between Lightning's lookup and
            if err.error_code != "RESOURCE_ALREADY_EXISTS":  # its create (jobs started together): look it up again
                raise
            client = super().experiment
        if rank_zero_only.rank != 0:  # Lightning's stand-in on the other ranks
            return client
        if self._queue is None:
            uri, spill_dir, max_pending = self._queue_args
            self._queue = QueuedClient(client, uri, spill_dir, max_pending=max_pending,
                                       flush_timeout=self._flush_timeout)
            if self._resume_run_id is not None:
                self._logged_until = self._last_steps(client, self._resume_run_id)
                self._queue.update_run(self._resume_run_id, status="RUNNING")
        return self._queue

    @staticmethod
    def _last_steps(client, run_id: str) -> dict[str, int]:
        keys = client.get_run(run_id).data.metrics.keys()
        return {key: max((m.step for m in client.get_metric_history(run_id, key)), default=-1) for key in keys}

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        _ = self.experiment  # a resumed run reads its last logged steps when it is opened
        if self._logged_until and step is not None:
            metrics = {k: v for k, v in metrics.items() if step > self._logged_until.get(k, -1)}
            if not metrics:
                return
        super().log_metrics(metrics, step)

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        """Queue the run's final status, then deliver everything (or keep the rest on disk, see ``close``)."""
        if self._finalized or self._queue is None:  # no run was opened: nothing to finish
            return
        self._finalized = True
        status = self.final_status or {"success": "FINISHED", "failed": "FAILED", "finished": "FINISHED"}.get(
            status, status)
        self._queue.set_terminated(self.run_id, status)
        # a stopped run (SIGTERM: a scheduler's grace period) waits at most 10 s before keeping records on disk
        timeout = min(self._flush_timeout, 10.0) if status == "KILLED" else self._flush_timeout
        self.pending_file = self._queue.close(timeout)


class MLflowRunInfo(Callback):
    """Records the resolved config (flattened as params, and the YAML as ``config.yaml``) and package versions
    once per run, the ``run_tags`` at every start, and the run's status when training ends by an exception."""

    PACKAGES = ("torch", "torchrl", "tensordict", "lightning", "gymnasium", "mujoco", "mlflow", "dm_control")

    def __init__(self, config: dict[str, Any], config_yaml: str, resumed: bool = False,
                 source: dict[str, Any] | None = None) -> None:
        self.config = config
        self.config_yaml = config_yaml
        self.resumed = resumed
        self.source = source  # a new run continuing checkpoints of a run in another store: tagged with where from
        self._unchecked_modes: dict[str, str] | None = None  # the modes tagged at start, until the first update

    @rank_zero_only
    def on_fit_start(self, trainer, pl_module) -> None:
        logger = trainer.logger
        if not isinstance(logger, MLFlowLogger):
            return
        tags = run_tags(self.config)  # also on resume: runs of earlier versions get them
        self._unchecked_modes = getattr(pl_module, "modes", None)
        if self._unchecked_modes is not None:  # what "auto" resolved to in this start
            tags.update(mode_tags(self._unchecked_modes, getattr(trainer.datamodule, "storage", None)))
        for key, value in tags.items():
            logger.experiment.set_tag(logger.run_id, key, value)
        if self.resumed:  # params are immutable in MLflow: a resumed run keeps the ones it started with
            logger.experiment.log_text(logger.run_id, self.config_yaml, f"config-resume-{pl_module.env_steps}.yaml")
            return
        params = dict(_flatten(self.config))
        for package in self.PACKAGES:
            try:
                params[f"version.{package}"] = metadata.version(package.replace("_", "-"))
            except metadata.PackageNotFoundError:
                continue
        logger.log_hyperparams(params)
        logger.experiment.log_text(logger.run_id, self.config_yaml, "config.yaml")
        for key, value in (self.source or {}).items():
            logger.experiment.set_tag(logger.run_id, f"dime.source_{key}", str(value))

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Once, after the first env step with updates (the CUDA self-check runs before the first update): re-tag the
        run if its update mode changed (the self-check's fall-back to eager updates). Nothing on later steps."""
        if self._unchecked_modes is None or not getattr(pl_module, "critic_updates", 0):
            return
        tagged, self._unchecked_modes = self._unchecked_modes, None  # checked once
        modes = pl_module.modes
        if modes == tagged or not isinstance(trainer.logger, MLFlowLogger):
            return
        for key, value in mode_tags(modes, None).items():
            trainer.logger.experiment.set_tag(trainer.logger.run_id, key, value)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        logger = trainer.logger
        if isinstance(logger, MLFlowLogger) and trainer.is_global_zero:  # rank 0 writes the checkpoint
            schema.write_mlflow_run(checkpoint, logger.run_id, logger.experiment_id)

    @rank_zero_only
    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        logger = trainer.logger
        if not isinstance(logger, DIMEMLFlowLogger):
            return
        if isinstance(exception, KeyboardInterrupt | SIGTERMException):
            logger.final_status = "KILLED"
        else:
            logger.final_status = "FAILED"
            message = f"{type(exception).__name__}: {exception}"
            logger.experiment.set_tag(logger.run_id, "error", message[:5000])


def _flatten(tree: Any, prefix: str = ""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flatten(value, f"{prefix}.{key}" if prefix else str(key))
    else:  # Lightning's log_hyperparams cuts a value at 250 characters; config.yaml keeps it whole
        yield prefix, str(tree)
