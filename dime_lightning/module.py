"""``DIMEModule``: DIME as a Lightning module with manual optimization (docs/algorithm.md §4).

One ``training_step`` = one env step: the framework-free ``update.DIMEUpdater`` runs ``utd`` critic updates
and, after every ``policy_delay``-th critic update (counted globally), an actor update, a temperature update and
the target-actor refresh. The module builds the networks from factories (``actor(obs_dim, action_dim)``,
``critic(obs_dim, action_dim)``) whose remaining arguments come from the config (the dimensions come from the
env through the data module), hands the updater Lightning's ``manual_backward`` and optimizer wrappers (DDP,
precision plugins), logs its diagnostics against env steps and checkpoints its counters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from tensordict import TensorDict
from torch import nn

from dime_lightning import auto
from dime_lightning import checkpoint_schema as schema
from dime_lightning.actor import DiffusionActor
from dime_lightning.compat import lightning_logs_this_step, reopen_finished_fit
from dime_lightning.critic import DistributionalCritic
from dime_lightning.data import StepBatch
from dime_lightning.distributed import all_ranks_true, average_running_statistics_, is_distributed, max_over_ranks
from dime_lightning.errors import BadInputError, NonFiniteError
from dime_lightning.policy import check_actor
from dime_lightning.program import compile_acting
from dime_lightning.temperature import Temperature
from dime_lightning.tracking import log_at_env_steps
from dime_lightning.update import DIMEUpdater, make_target_actor, maybe_compile
from dime_lightning.update_settings import AUTO, UpdateSettings

ActorFactory = Callable[[int, int], nn.Module]
ActMode = Literal["auto", "none", "default", "reduce-overhead"]
ACT_MODES = ("auto", "none", "default", "reduce-overhead")
CriticFactory = Callable[[int, int], DistributionalCritic]
TemperatureFactory = Callable[[int], Temperature]


class DIMEModule(pl.LightningModule):
    """DIME's actor, critics and temperature, updated once per env step (docs/algorithm.md §4, §5).

    Args:
        obs_dim: observation size; linked from the env by the data module (never set in a config).
        action_dim: action size D; linked from the env by the data module (never set in a config).
        actor: the policy: a class (or callable) built as ``actor(obs_dim, action_dim)`` with its other init
            args from the config; ``DiffusionActor`` (DIME) or ``TanhGaussianActor`` (the Gaussian switch).
        critic: the critic ensemble, built as ``critic(obs_dim, action_dim)``; ``DistributionalCritic``.
        temperature: the temperature α, built as ``temperature(action_dim)``; ``Temperature``.
        update: the update's settings (``UpdateSettings``: discount, update-to-data ratio, policy delay, learning
            rates, clipping, non-finite handling, compile mode); the config group ``model.update``.
        compile_act: acting through torch.compile: 'auto' (chosen at the start of a fit by device:
            ``dime_lightning.auto``), 'none', 'default', 'reduce-overhead' (a CUDA graph on a GPU); on a CPU
            either compiled mode compiles ahead of time (``program.compile_acting``). Default 'auto'.
    """

    def __init__(
        self,
        obs_dim: int = 0,
        action_dim: int = 0,
        actor: ActorFactory = DiffusionActor,
        critic: CriticFactory = DistributionalCritic,
        temperature: TemperatureFactory = Temperature,
        update: UpdateSettings = UpdateSettings(),  # noqa: B008 (frozen: one shared default is safe)
        compile_act: ActMode = "auto",
    ) -> None:
        super().__init__()
        if obs_dim < 1 or action_dim < 1:
            raise BadInputError(
                f"model.obs_dim and model.action_dim come from the env and must be >= 1, got {obs_dim}, {action_dim}"
            )
        settings = UpdateSettings.of(update)  # a mapping too: a checkpoint's plain data
        if compile_act not in ACT_MODES:
            raise BadInputError(f"model.compile_act must be one of {', '.join(map(repr, ACT_MODES))}, "
                                f"got {compile_act!r}")
        self.save_hyperparameters(ignore=["actor", "critic", "temperature", "update"], logger=False)
        self.hparams["update"] = settings.as_dict()  # plain data: weights-only loading reads it
        self.automatic_optimization = False
        self.actor = check_actor(actor(obs_dim, action_dim))  # the contract of dime_lightning.policy
        self.critic = critic(obs_dim, action_dim)
        self.temperature = temperature(action_dim)
        # policy_tau = 1 (the reference): the target actor is refreshed to the actor after every actor update,
        # so between refreshes it *is* the actor and no copy is kept.
        self.target_actor = make_target_actor(self.actor, settings.policy_tau)
        # the whole env-step update, framework-free (update.py); Lightning's manual_backward keeps DDP's
        # gradient averaging and the precision plugin in the loop for the eager and compiled-loss modes
        self.updater = DIMEUpdater(
            self.actor, self.critic, self.temperature, self.target_actor, settings, backward=self.manual_backward,
            optimizer_step=self._lightning_step, all_finite=self._all_ranks_finite,
            after_critic_step=lambda: average_running_statistics_(self.critic),
        )
        # acting, optionally through torch.compile ("reduce-overhead" replays a CUDA graph on a GPU); "auto" is
        # eager until setup() resolves it, and setup() compiles for the device (program.compile_acting)
        self._act_mode = "none" if compile_act == AUTO else compile_act
        self._act = maybe_compile(self.actor.act, self._act_mode)
        self._act_built_for: tuple[str, str] | None = None  # (mode, device type) once setup() compiled it
        self.env_steps = 0
        self._checked_at = 0  # env steps at the last deferred non-finite check ("whole")

    # ---- optimizers: built by the updater, checkpointed by Lightning --------------------------------------
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        # fused on CUDA: one kernel per optimizer step (the update is launch-bound on a GPU)
        return self.updater.build_optimizers(fused=self.device.type == "cuda")

    def on_train_start(self) -> None:
        self.updater.align_loaded_optimizers()  # a resumed checkpoint's optimizer flags are this mode's again

    def setup(self, stage: str) -> None:
        """Resolve the ``auto`` modes (dime_lightning.auto) for this device, process count and run length."""
        processes = self.trainer.world_size if self.trainer is not None else 1
        if self.settings.compile == "whole" and processes > 1:
            raise BadInputError("model.update.compile 'whole' runs in one process (its backward passes bypass DDP's "
                             "gradient averaging): use 'none', 'default' or 'reduce-overhead' with several processes")
        device = self.trainer.strategy.root_device if self.trainer is not None else self.device
        if self.settings.compile == AUTO:
            data = getattr(self.trainer, "datamodule", None)
            learning = getattr(data, "learning_env_steps", None)
            mixed = "mixed" in str(getattr(self.trainer, "precision", "32-true"))
            self.updater.set_mode(auto.update_mode(device.type, processes, learning, mixed))
        if self.hparams.compile_act == AUTO:
            self._act_mode = auto.act_mode(device.type, self.updater.mode)
        if self._act_built_for != (self._act_mode, device.type):  # a second fit in this process keeps it
            self._act = compile_acting(self.actor.act, self._act_mode, device.type)  # now that the device is known
            self._act_built_for = (self._act_mode, device.type)

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Actions for ``obs`` (collection's policy): the actor's ``act``, compiled as ``compile_act`` says."""
        return self._act(obs)

    @property
    def modes(self) -> dict[str, str]:
        """The modes this run uses: the update's (after any self-check fall-back) and acting's."""
        return {"compile": self.updater.mode, "compile_act": self._act_mode}

    # ---- the update: one env step (update.py holds the schedule, the losses and the optimizer steps) ------
    def training_step(self, batch: StepBatch, batch_idx: int) -> None:
        self.env_steps = batch.env_steps
        if is_distributed():
            self._stop_if_collection_failed(batch.env_error)
        if batch.sample is None:  # random warm-up: collect only
            return
        logging = self._logging_step()
        try:
            metrics = self.updater(batch.sample, diagnostics=logging)
        except NonFiniteError as error:  # the per-update check of the eager and compiled-loss modes
            raise NonFiniteError(f"{error} at env step {self.env_steps}") from None
        if logging:
            self.check_nonfinite()  # "whole": the deferred check, one host sync per logging step
            self._log_update(metrics)

    def check_nonfinite(self) -> None:
        """"whole" mode: stop (or count skipped steps) for non-finite losses since the last check, naming the
        env-step range; called at logging cadence and before every checkpoint."""
        self.updater.check_nonfinite(f"between env steps {self._checked_at + 1} and {self.env_steps}")
        self._checked_at = self.env_steps

    @property
    def settings(self) -> UpdateSettings:
        return self.updater.settings

    # the counters live in the updater; these names are the module's public (and checkpointed) view
    @property
    def critic_updates(self) -> int:
        return self.updater.critic_updates

    @property
    def actor_updates(self) -> int:
        return self.updater.actor_updates

    @property
    def skipped_updates(self) -> int:
        return self.updater.skipped_updates

    def _lightning_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Step ``optimizer`` through its Lightning wrapper (precision plugin, strategy, step counting)."""
        wrappers = self.optimizers()
        for wrapper in wrappers if isinstance(wrappers, list) else [wrappers]:
            if wrapper.optimizer is optimizer:
                wrapper.step()
                return
        raise RuntimeError("the updater's optimizer is not one of the trainer's")

    def _all_ranks_finite(self, finite: torch.Tensor) -> bool:
        return all_ranks_true(finite, self.device)

    def _logging_step(self) -> bool:
        """Whether Lightning writes logs after this batch (every trainer.log_every_n_steps): the metrics dict is
        only built then, since `self.log` costs ~0.3 ms per metric per call on a CPU."""
        return lightning_logs_this_step(self.trainer)

    def _stop_if_collection_failed(self, error: Exception | None) -> None:
        """DDP: if any rank's collection failed, raise on every rank (one all-reduce per env step); a rank that
        did not fail raises the same kind (non-finite data or other), naming the env step."""
        code = max_over_ranks(0 if error is None else 1 if isinstance(error, NonFiniteError) else 2, self.device)
        if code == 0:
            return
        if error is not None:
            raise error
        kind = NonFiniteError if code == 1 else RuntimeError
        raise kind(f"collection failed on another rank at env step {self.env_steps} (see that rank's error)")

    def _log_update(self, update_metrics: TensorDict) -> None:
        """The update's diagnostics at this env step, fetched to the host in one transfer and written to the
        loggers directly (``tracking.log_at_env_steps``: Lightning's ``self.log`` cost ~10 ms per logging step
        for these ~15 scalars on a CPU, BENCHMARKS.md "the thin loop")."""
        tensors = {f"train/{k}": v for k, v in update_metrics.items()}
        if "log_prob" in update_metrics.keys():  # an actor update ran in this env step
            tensors["train/entropy_bound"] = -update_metrics["log_prob"]
            tensors.update({f"train/{k}": v for k, v in self.actor.diagnostics().items()})
        tensors["train/alpha"] = self.temperature.alpha()
        values = torch.stack([v.detach().reshape(()).float() for v in tensors.values()]).tolist()  # one host sync
        metrics = dict(zip(tensors, values, strict=True))
        metrics.update({"train/critic_updates": float(self.critic_updates),
                        "train/actor_updates": float(self.actor_updates),
                        "train/skipped_updates": float(self.skipped_updates)})
        log_at_env_steps(self.trainer, metrics, self.env_steps)

    # ---- checkpointed counters ------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_nonfinite()  # "whole": never write a checkpoint after an unchecked non-finite update
        schema.write_counters(checkpoint, schema.Counters(self.env_steps, **self.updater.counters()))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Training length is data.total_env_steps, not Lightning epochs: forget that the one "epoch" of a
        # finished run was complete, so that resuming its final checkpoint with a larger total trains on.
        reopen_finished_fit(checkpoint)
        counters = schema.counters(checkpoint)
        self.env_steps = self._checked_at = counters.env_steps
        self.updater.load_counters(counters)

