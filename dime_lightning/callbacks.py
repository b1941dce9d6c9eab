"""Callbacks of the fit loop, all keyed on env steps (never Lightning's ``global_step``).

- ``Evaluation``: stochastic-policy episodes on a separate env every ``every_env_steps`` (rank 0), and with
  ``video`` an MP4 of one of them every ``video_every`` evaluations (``video.py``), logged to MLflow.
- ``TrainingMonitor``: training-episode returns and throughput (``time/*``). It checks nothing: non-finite
  losses are caught by the update itself (``update.py``, ``model.update.check_finite`` / ``model.update.nonfinite``) and
  non-finite observations or rewards by the data module (``data.py``), both as ``NonFiniteError`` (exit 3).
- ``EnvStepProgressBar``: env steps out of the total, episode and eval returns, env steps per second.

Checkpoints are in ``checkpointing.py``, MLflow run bookkeeping in ``tracking.py``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_warn
from tensordict.nn import TensorDictModule

from dime_lightning.checkpointing import EnvStepCheckpoint
from dime_lightning.data import EVAL_SEED_OFFSET
from dime_lightning.envs import SUCCESS_KEY, make_env
from dime_lightning.errors import BadInputError
from dime_lightning.reference import SUCCESS_METRIC
from dime_lightning.schedule import due
from dime_lightning.tracking import log_at_env_steps
from dime_lightning.video import EpisodeRecorder, check_video, records_video, video_name


class Evaluation(Callback):
    """Every ``every_env_steps`` env steps and at the end: ``episodes`` episodes with stochastic actions (the
    reference evaluates stochastic samples) on an env that is not the training env. Rank 0 only. Logs
    ``eval/return_mean``, ``eval/return_std``, ``eval/episode_length`` and, for envs that report success
    (MyoSuite's ``solved``), ``eval/success_rate``: the share of episodes whose last step reports success, as
    the reference implementation's evaluation computes it (every published MyoSuite value is such a share of 5
    episodes: a multiple of 0.2).

    With ``video``, the first episode of some evaluations is rendered off-screen into an H.264 MP4
    ``<checkpoint.dirpath>/videos/env_step_<env steps, 9 digits>.mp4``, logged as the MLflow artifact
    ``videos/env_step_….mp4`` the way checkpoints are (queued: training never waits for the store). Rendering
    does not change the episode, so the returns are those of a run without video. Only MuJoCo envs render
    (Gymnasium MuJoCo and ``dm_control/…``); other envs, a missing GL renderer or a missing codec are refused
    at start-up (``video.py``).

    Args:
        every_env_steps: evaluate every this many env steps, env steps, >= 1. Default 5000.
        episodes: episodes per evaluation, >= 1. Default 5.
        max_episode_steps: cap on the length of an evaluation episode, env steps, >= 1 (the env's own time
            limit applies first). Default 100000.
        video: record evaluation videos (MP4, headless; needs imageio-ffmpeg and EGL or OSMesa, picked through
            ``MUJOCO_GL``). Default false.
        video_every: record a video at every ``video_every``-th evaluation (counted in env steps, n =
            env steps // every_env_steps), and always at the evaluation that ends training, evaluations, >= 1.
            Default 10.
    """

    def __init__(self, every_env_steps: int = 5_000, episodes: int = 5, max_episode_steps: int = 100_000,
                 video: bool = False, video_every: int = 10) -> None:
        if every_env_steps < 1 or episodes < 1:
            raise BadInputError(f"eval.every_env_steps and eval.episodes must be >= 1, got {every_env_steps}, "
                                f"{episodes}")
        if max_episode_steps < 1:
            raise BadInputError(f"eval.max_episode_steps must be >= 1, got {max_episode_steps}")
        if video_every < 1:
            raise BadInputError(f"eval.video_every must be >= 1 (evaluations), got {video_every}")
        self.every_env_steps = every_env_steps
        self.episodes = episodes
        self.max_episode_steps = max_episode_steps
        self.video = video
        self.video_every = video_every
        self._env = None
        self._last_eval_step = 0
        self._video_checked_for: str | None = None
        self.paused_seconds = 0.0  # wall time training waited for evaluations (TrainingMonitor excludes it)

    def check_video(self, env_id: str) -> None:
        """With ``video`` on: fail now (``VideoError``, a ValueError) if ``env_id`` cannot be recorded here."""
        if self.video and self._video_checked_for != env_id:
            check_video(env_id)
            self._video_checked_for = env_id

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.global_rank == 0:  # the CLI has checked already; this covers a Trainer built by hand
            self.check_video(trainer.datamodule.hparams.env_id)

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_eval_step = pl_module.env_steps  # a resumed run does not re-evaluate at once

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if due(self._last_eval_step, pl_module.env_steps, self.every_env_steps):
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if pl_module.env_steps > self._last_eval_step:
            self.evaluate(trainer, pl_module, final=True)
        if self._env is not None:
            self._env.close()
            self._env = None

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, final: bool = False) -> None:
        self._last_eval_step = pl_module.env_steps
        if trainer.global_rank != 0:
            return
        started = time.perf_counter()
        try:
            self._evaluate(trainer, pl_module, final)
        finally:
            self.paused_seconds += time.perf_counter() - started

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, final: bool) -> None:
        steps = pl_module.env_steps
        data = trainer.datamodule
        if self._env is None:
            self._env = make_env(data.hparams.env_id, seed=data.hparams.seed + EVAL_SEED_OFFSET, success=True)
        recorder = None
        final = final or steps >= data.hparams.total_env_steps  # the periodic evaluation may be the last one
        if self.video and records_video(steps, self.every_env_steps, self.video_every, final):
            recorder = EpisodeRecorder(self._env, data.hparams.env_id, _video_dir(trainer) / video_name(steps))
        actor = pl_module.actor
        device = pl_module.device

        def act(obs: torch.Tensor) -> torch.Tensor:
            if recorder is not None:
                recorder.capture()  # the state the action is taken in
            return actor.act(obs.to(device)).cpu()

        policy = TensorDictModule(act, ["observation"], ["action"])
        returns, lengths, successes = [], [], []
        started = time.perf_counter()
        for _ in range(self.episodes):
            rollout = self._env.rollout(self.max_episode_steps, policy, break_when_any_done=True)
            returns.append(float(rollout["next", "reward"].sum()))
            lengths.append(rollout.shape[0])
            if SUCCESS_KEY in rollout["next"].keys():  # success as reported at the episode's last step
                successes.append(float(rollout["next", SUCCESS_KEY][-1]))
            if recorder is not None:
                recorder.capture()  # the last state
                _publish(trainer, recorder, steps)
                recorder = None  # one episode per video
        mean = sum(returns) / len(returns)
        std = math.sqrt(sum((r - mean) ** 2 for r in returns) / len(returns))
        metrics = {"eval/return_mean": mean, "eval/return_std": std, "eval/episode_length": sum(lengths) / len(lengths),
                   "time/eval_seconds": time.perf_counter() - started}
        if successes:
            metrics[SUCCESS_METRIC] = sum(successes) / len(successes)
        log_at_env_steps(trainer, metrics, steps)


def _video_dir(trainer: pl.Trainer) -> Path:
    """``videos/`` in the checkpoint folder of the run (so beside its MLflow spill file), else ./videos."""
    for callback in trainer.callbacks:
        if isinstance(callback, EnvStepCheckpoint) and callback.dirpath is not None:
            return Path(callback.dirpath) / "videos"
    return Path("videos")


def _publish(trainer: pl.Trainer, recorder: EpisodeRecorder, env_steps: int) -> None:
    """Finish the file and queue it as an MLflow artifact (as checkpoints are); a lost video only warns."""
    path = recorder.close()
    if path is None:
        rank_zero_warn(f"eval.video: no video at env step {env_steps} ({recorder.error}); training goes on")
        return
    logger = trainer.logger
    if isinstance(logger, MLFlowLogger):
        logger.experiment.log_artifact(logger.run_id, str(path), "videos")


class TrainingMonitor(Callback):
    """Training-episode returns (at the env step each episode ended) and env steps per second:
    ``time/env_steps_per_second`` of training alone (collection and updates; without the time of the callbacks that
    pause training, which count it in their ``paused_seconds``: evaluation and checkpoints) and
    ``time/env_steps_per_second_wall`` of the wall clock.

    Args:
        every_env_steps: env steps between two throughput records, >= 1. Default 1000.
    """

    def __init__(self, every_env_steps: int = 1_000) -> None:
        if every_env_steps < 1:
            raise BadInputError(f"monitor.every_env_steps must be >= 1, got {every_env_steps}")
        self.every_env_steps = every_env_steps
        self._t0 = self._t_last = self._paused_last = 0.0
        self._steps_last = 0

    @staticmethod
    def _paused(trainer) -> float:
        return sum(getattr(callback, "paused_seconds", 0.0) for callback in trainer.callbacks)

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = self._t_last = time.perf_counter()
        self._steps_last, self._paused_last = pl_module.env_steps, self._paused(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        data = trainer.datamodule
        for episode in data.pop_finished_episodes():
            log_at_env_steps(trainer, {"train/episode_return": episode.episode_return,
                           "train/episode_length": float(episode.length)}, episode.env_steps)
        steps = pl_module.env_steps
        if not due(self._steps_last, steps, self.every_env_steps):
            return
        now, paused = time.perf_counter(), self._paused(trainer)
        wall = max(now - self._t_last, 1e-9)
        training = max(wall - (paused - self._paused_last), 1e-9)
        log_at_env_steps(trainer, {"time/env_steps_per_second": (steps - self._steps_last) / training,
                       "time/env_steps_per_second_wall": (steps - self._steps_last) / wall,
                       "time/elapsed_seconds": now - self._t0}, steps)
        self._t_last, self._steps_last, self._paused_last = now, steps, paused


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
