"""Callbacks of the fit loop, all keyed on env steps (never Lightning's ``global_step``).

- ``Evaluation``: stochastic-policy episodes on a separate env every ``every_env_steps`` (rank 0).
- ``TrainingMonitor``: training-episode returns, throughput (``time/*``), and a check that logged losses
  are finite.
- ``EnvStepCheckpoint``: ``last.ckpt`` every ``every_env_steps`` (written to a temporary file, then renamed)
  and ``final.ckpt`` at the end, both uploaded to the MLflow run when training ends.
- ``EnvStepProgressBar``: env steps out of the total, episode and eval returns, env steps per second.
- ``MLflowRunInfo``: the resolved config (params + YAML artifact) and package versions.
"""

from __future__ import annotations

import math
import os
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from tensordict.nn import TensorDictModule

from dime_lightning.data import EVAL_SEED_OFFSET
from dime_lightning.envs import make_env

LOSS_KEYS = ("train/loss_critic", "train/loss_actor", "train/loss_alpha")


def _log(trainer: pl.Trainer, metrics: dict[str, float], env_steps: int) -> None:
    """Write metrics at x = env steps to every logger, and keep them for the progress bar."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=env_steps)
    trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})


class Evaluation(Callback):
    """Every ``every_env_steps`` env steps and at the end: ``episodes`` episodes with stochastic actions (the
    reference evaluates stochastic samples) on an env that is not the training env. Rank 0 only."""

    def __init__(self, every_env_steps: int = 5_000, episodes: int = 5, max_episode_steps: int = 100_000) -> None:
        if every_env_steps < 1 or episodes < 1:
            raise ValueError(f"eval.every_env_steps and eval.episodes must be >= 1, got {every_env_steps}, {episodes}")
        self.every_env_steps = every_env_steps
        self.episodes = episodes
        self.max_episode_steps = max_episode_steps
        self._env = None
        self._last_eval_step = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.env_steps // self.every_env_steps > self._last_eval_step // self.every_env_steps:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if pl_module.env_steps > self._last_eval_step:
            self.evaluate(trainer, pl_module)
        if self._env is not None:
            self._env.close()
            self._env = None

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_eval_step = pl_module.env_steps
        if trainer.global_rank != 0:
            return
        data = trainer.datamodule
        if self._env is None:
            self._env = make_env(data.hparams.env_id, seed=data.hparams.seed + EVAL_SEED_OFFSET)
        actor = pl_module.actor
        device = pl_module.device
        policy = TensorDictModule(lambda obs: actor.act(obs.to(device)).cpu(), ["observation"], ["action"])
        returns, lengths = [], []
        started = time.perf_counter()
        for _ in range(self.episodes):
            rollout = self._env.rollout(self.max_episode_steps, policy, break_when_any_done=True)
            returns.append(float(rollout["next", "reward"].sum()))
            lengths.append(rollout.shape[0])
        mean = sum(returns) / len(returns)
        std = math.sqrt(sum((r - mean) ** 2 for r in returns) / len(returns))
        _log(trainer, {"eval/return_mean": mean, "eval/return_std": std,
                       "eval/episode_length": sum(lengths) / len(lengths),
                       "time/eval_seconds": time.perf_counter() - started}, pl_module.env_steps)


class TrainingMonitor(Callback):
    """Training-episode returns (at the env step each episode ended), env steps per second, and a stop with a
    clear message when a logged loss is not finite."""

    def __init__(self, every_env_steps: int = 1_000) -> None:
        self.every_env_steps = every_env_steps
        self._t0 = self._t_last = 0.0
        self._steps_last = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = self._t_last = time.perf_counter()
        self._steps_last = pl_module.env_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        data = trainer.datamodule
        for episode in data.pop_finished_episodes():
            _log(trainer, {"train/episode_return": episode.episode_return,
                           "train/episode_length": float(episode.length)}, episode.env_steps)
        steps = pl_module.env_steps
        if steps - self._steps_last < self.every_env_steps:
            return
        self._check_finite(trainer, steps)
        now = time.perf_counter()
        _log(trainer, {"time/env_steps_per_second": (steps - self._steps_last) / max(now - self._t_last, 1e-9),
                       "time/elapsed_seconds": now - self._t0}, steps)
        self._t_last, self._steps_last = now, steps

    @staticmethod
    def _check_finite(trainer: pl.Trainer, env_steps: int) -> None:
        for key in LOSS_KEYS:
            value = trainer.callback_metrics.get(key)
            if value is not None and not torch.isfinite(value).all():
                raise FloatingPointError(f"non-finite {key} = {value.item()} at env step {env_steps}")


class EnvStepCheckpoint(Callback):
    """``last.ckpt`` every ``every_env_steps`` env steps, ``final.ckpt`` at the end; atomic writes.

    ``dirpath`` defaults to ``checkpoints/<MLflow run id>`` (or ``checkpoints/run-<time>`` without MLflow).
    """

    def __init__(self, every_env_steps: int = 50_000, dirpath: str | None = None, log_artifacts: bool = True) -> None:
        if every_env_steps < 1:
            raise ValueError(f"checkpoint.every_env_steps must be >= 1, got {every_env_steps}")
        self.every_env_steps = every_env_steps
        self.dirpath = Path(dirpath) if dirpath else None
        self.log_artifacts = log_artifacts
        self._last_saved = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.dirpath is None:
            run_id = trainer.logger.run_id if isinstance(trainer.logger, MLFlowLogger) else None
            self.dirpath = Path("checkpoints") / (run_id or time.strftime("run-%Y%m%d-%H%M%S"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.env_steps // self.every_env_steps > self._last_saved // self.every_env_steps:
            self.save(trainer, "last.ckpt")
            self._last_saved = pl_module.env_steps

    def on_train_end(self, trainer, pl_module) -> None:
        self.save(trainer, "last.ckpt")
        final = self.save(trainer, "final.ckpt")
        if self.log_artifacts and trainer.global_rank == 0 and isinstance(trainer.logger, MLFlowLogger):
            for path in (final.with_name("last.ckpt"), final):
                trainer.logger.experiment.log_artifact(trainer.logger.run_id, str(path), "checkpoints")

    def save(self, trainer: pl.Trainer, name: str) -> Path:
        path = self.dirpath / name
        tmp = path.with_name(f".{name}.tmp")
        trainer.save_checkpoint(tmp)  # collective under DDP; rank 0 writes
        if trainer.global_rank == 0:
            os.replace(tmp, path)
        trainer.strategy.barrier("env_step_checkpoint")
        return path


class EnvStepProgressBar(TQDMProgressBar):
    """A tqdm bar over env steps (not batches), with the latest returns and the env-step rate."""

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    def on_train_epoch_start(self, trainer, *_: Any) -> None:
        super().on_train_epoch_start(trainer)
        self.train_progress_bar.total = trainer.datamodule.hparams.total_env_steps
        self.train_progress_bar.set_description("env steps")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        if bar is None or (batch_idx + 1) % max(self.refresh_rate, 1):
            return
        bar.n = pl_module.env_steps
        metrics = trainer.callback_metrics
        postfix = {}
        for key, label in [("train/episode_return", "ep_return"), ("eval/return_mean", "eval"),
                           ("train/alpha", "alpha"), ("time/env_steps_per_second", "steps/s")]:
            if key in metrics:
                postfix[label] = f"{float(metrics[key]):.4g}"
        bar.set_postfix(postfix, refresh=False)
        bar.refresh()


class MLflowRunInfo(Callback):
    """Records the resolved config (flattened as params, and the YAML as ``config.yaml``) and package versions."""

    PACKAGES = ("torch", "torchrl", "tensordict", "lightning", "gymnasium", "mujoco", "mlflow", "dm_control")

    def __init__(self, config: dict[str, Any], config_yaml: str) -> None:
        self.config = config
        self.config_yaml = config_yaml

    @rank_zero_only
    def on_fit_start(self, trainer, pl_module) -> None:
        logger = trainer.logger
        if not isinstance(logger, MLFlowLogger):
            return
        params = dict(_flatten(self.config))
        for package in self.PACKAGES:
            try:
                params[f"version.{package}"] = metadata.version(package.replace("_", "-"))
            except metadata.PackageNotFoundError:
                continue
        logger.log_hyperparams(params)
        logger.experiment.log_text(logger.run_id, self.config_yaml, "config.yaml")


def _flatten(tree: Any, prefix: str = ""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flatten(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        text = str(tree)
        yield prefix, text if len(text) <= 6000 else text[:5997] + "..."
