"""``DIMEModule``: DIME's update schedule as a Lightning module with manual optimization (ALGORITHM.md §4).

One ``training_step`` = one env step: ``utd`` critic updates, and after every ``policy_delay``-th critic update
(counted globally) an actor update, a temperature update and the target-actor refresh. The networks are
built from factories (``actor(obs_dim, action_dim)``, ``critic(obs_dim, action_dim)``) whose remaining
arguments come from the config; the dimensions come from the env through the data module.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import nn

from dime_lightning.actor import DiffusionActor
from dime_lightning.critic import DistributionalCritic
from dime_lightning.data import StepBatch
from dime_lightning.distributed import all_ranks_true, average_running_statistics_, is_distributed, max_over_ranks
from dime_lightning.errors import NonFiniteError
from dime_lightning.losses import actor_loss, critic_loss, temperature_loss
from dime_lightning.optim import ACTOR_CRITIC_BETAS, adam, gradient_norm, zero_nan_and_clip_gradients_
from dime_lightning.schedule import UpdateSchedule
from dime_lightning.temperature import Temperature

ActorFactory = Callable[[int, int], nn.Module]
CompileMode = Literal["none", "default", "reduce-overhead"]
CriticFactory = Callable[[int, int], DistributionalCritic]
TemperatureFactory = Callable[[int], Temperature]


class DIMEModule(pl.LightningModule):
    def __init__(
        self,
        obs_dim: int = 0,
        action_dim: int = 0,
        actor: ActorFactory = DiffusionActor,
        critic: CriticFactory = DistributionalCritic,
        temperature: TemperatureFactory = Temperature,
        gamma: float = 0.99,
        utd: int = 2,
        policy_delay: int = 3,
        policy_tau: float = 1.0,
        actor_lr: float = 3e-4,
        critic_lr: float = 3e-4,
        betas: tuple[float, float] = ACTOR_CRITIC_BETAS,
        actor_grad_clip: float = 1.0,
        critic_entropy_coef: float = 0.005,
        check_finite: bool = True,
        nonfinite: Literal["stop", "skip"] = "stop",
        compile_update: CompileMode = "none",
        compile_act: CompileMode = "none",
    ) -> None:
        super().__init__()
        if obs_dim < 1 or action_dim < 1:
            raise ValueError(
                f"model.obs_dim and model.action_dim come from the env and must be >= 1, got {obs_dim}, {action_dim}"
            )
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"model.gamma must be in [0, 1], got {gamma}")
        if nonfinite not in ("stop", "skip"):
            raise ValueError(f"model.nonfinite must be 'stop' or 'skip', got {nonfinite!r}")
        for name, mode in [("compile_update", compile_update), ("compile_act", compile_act)]:
            if mode not in ("none", "default", "reduce-overhead"):
                raise ValueError(f"model.{name} must be 'none', 'default' or 'reduce-overhead', got {mode!r}")
        if not 0.0 < policy_tau <= 1.0:
            raise ValueError(f"model.policy_tau must be in (0, 1], got {policy_tau}")
        for name, value in [("actor_lr", actor_lr), ("critic_lr", critic_lr), ("actor_grad_clip", actor_grad_clip)]:
            if not value > 0:
                raise ValueError(f"model.{name} must be > 0, got {value}")
        self.save_hyperparameters(ignore=["actor", "critic", "temperature"], logger=False)
        self.automatic_optimization = False
        self.schedule = UpdateSchedule(utd, policy_delay)
        self.actor = actor(obs_dim, action_dim)
        self.critic = critic(obs_dim, action_dim)
        self.temperature = temperature(action_dim)
        # policy_tau = 1 (the reference): the target actor is refreshed to the actor after every actor update,
        # so between refreshes it *is* the actor and no copy is kept.
        self.target_actor = copy.deepcopy(self.actor).requires_grad_(False) if policy_tau < 1.0 else None
        # the update's two loss functions and acting, optionally through torch.compile (compiled on first call;
        # "reduce-overhead" replays CUDA graphs on a GPU). Eager ("none") is the default.
        self.critic_loss = maybe_compile(critic_loss, compile_update)
        self.actor_loss = maybe_compile(actor_loss, compile_update)
        self.act = maybe_compile(self.actor.act, compile_act)
        self.env_steps = 0
        self.critic_updates = 0
        self.actor_updates = 0
        self.skipped_updates = 0

    # ---- optimizers: fetched in this order in training_step -------------------------------------------------
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        hp = self.hparams
        fused = self.device.type == "cuda"  # one kernel per optimizer step: the update is launch-bound on a GPU
        optimizers = [adam(self.critic.parameters(), hp.critic_lr, tuple(hp.betas), fused),
                      adam(self.actor.parameters(), hp.actor_lr, tuple(hp.betas), fused)]
        if self.temperature.log_alpha.requires_grad:  # fixed α has nothing to optimise
            log_alpha = [self.temperature.log_alpha]
            optimizers.append(torch.optim.Adam(log_alpha, lr=self.temperature.lr, fused=fused or None))
        return optimizers

    # ---- the update ---------------------------------------------------------------------------------------
    def training_step(self, batch: StepBatch, batch_idx: int) -> None:
        self.env_steps = batch.env_steps
        if is_distributed():
            self._stop_if_collection_failed(batch.env_error)
        if batch.sample is None:  # random warm-up: collect only
            return
        critic_opt, actor_opt, *alpha_opt = self.optimizers()
        hp = self.hparams
        logging = self._logging_step()
        actor_metrics = None
        for minibatch in batch.sample.unbind(0):  # (utd, B) -> utd × (B,)
            # 1. critic (ALGORITHM.md §2.2)
            mark_compiled_step()
            critic_metrics = self.critic_loss(self.critic, self.target_actor or self.actor, minibatch,
                                              self.temperature.alpha(), hp.gamma, hp.critic_entropy_coef)
            if self._skip_nonfinite("loss_critic", critic_metrics["loss_critic"]):
                continue
            critic_opt.zero_grad()
            self.manual_backward(critic_metrics["loss_critic"])
            if logging:
                critic_metrics = critic_metrics.clone()  # a replayed CUDA graph reuses its output memory
                critic_metrics["grad_norm_critic"] = gradient_norm(self.critic.parameters())
            critic_opt.step()
            average_running_statistics_(self.critic)  # DDP: one set of batch-renorm statistics (distributed.py)
            self.critic_updates += 1
            if not self.schedule.actor_due(self.critic_updates):
                continue
            # 2. actor, every policy_delay-th critic update, on the same minibatch (§1.7)
            mark_compiled_step()
            actor_metrics = self.actor_loss(self.actor, self.critic, minibatch["observation"],
                                            self.temperature.alpha())
            if self._skip_nonfinite("loss_actor", actor_metrics["loss_actor"]):
                actor_metrics = None
                continue
            actor_opt.zero_grad()
            self.manual_backward(actor_metrics["loss_actor"])
            zero_nan_and_clip_gradients_(self.actor.parameters(), hp.actor_grad_clip)
            if logging:
                actor_metrics = actor_metrics.clone()
                actor_metrics["grad_norm_actor"] = gradient_norm(self.actor.parameters())
            actor_opt.step()
            # 3. temperature, from the actor batch's mean running cost (§3)
            actor_metrics.update(temperature_loss(self.temperature, actor_metrics["running_cost"]))
            if alpha_opt:
                alpha_opt[0].zero_grad()
                self.manual_backward(actor_metrics["loss_alpha"])
                alpha_opt[0].step()
            self.refresh_target_actor()
            self.actor_updates += 1
        if logging:
            self._log_update(critic_metrics, actor_metrics)

    def _logging_step(self) -> bool:
        """Whether Lightning writes logs after this batch (every trainer.log_every_n_steps): the metrics dict is
        only built then, since `self.log` costs ~0.3 ms per metric per call on a CPU."""
        connector = getattr(self.trainer, "_logger_connector", None)  # private: Lightning's own logging cadence
        return connector is None or connector.should_update_logs

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

    def _skip_nonfinite(self, name: str, loss: torch.Tensor) -> bool:
        """With ``check_finite``: stop with a message naming the loss and env step, or (``nonfinite="skip"``)
        skip this optimizer step and count it. Decided jointly by all ranks (one all-reduce), so that every rank
        takes the same steps. One host sync per update; disable it for captured GPU updates."""
        if not self.hparams.check_finite:
            return False
        finite_here = torch.isfinite(loss)
        if all_ranks_true(finite_here, loss.device):
            return False
        if self.hparams.nonfinite == "stop":
            value = f"= {loss.item()}" if not bool(finite_here) else f"on another rank than {self.global_rank}"
            raise NonFiniteError(f"non-finite {name} {value} at env step {self.env_steps}")
        self.skipped_updates += 1
        return True

    @torch.no_grad()
    def refresh_target_actor(self) -> None:
        if self.target_actor is None:
            return
        tau = self.hparams.policy_tau
        for target, online in zip(self.target_actor.parameters(), self.actor.parameters(), strict=True):
            target.lerp_(online, tau)

    def _log_update(self, critic_metrics, actor_metrics) -> None:
        metrics = {f"train/{k}": v for k, v in critic_metrics.items() if k != "q_mean"}
        metrics["train/q_mean"] = critic_metrics["q_mean"]
        if actor_metrics is not None:
            metrics.update({f"train/{k}": v for k, v in actor_metrics.items() if k != "q_mean"})
            metrics["train/entropy_bound"] = -actor_metrics["log_prob"]
            metrics.update({f"train/{k}": v for k, v in self.actor.diagnostics().items()})
        metrics["train/alpha"] = self.temperature.alpha()
        # counters as CPU tensors: a Python float would be copied to the module's device (a host sync on GPU)
        metrics["train/critic_updates"] = torch.tensor(float(self.critic_updates))
        metrics["train/actor_updates"] = torch.tensor(float(self.actor_updates))
        metrics["train/skipped_updates"] = torch.tensor(float(self.skipped_updates))
        metrics["step"] = torch.tensor(float(self.env_steps))  # Lightning uses a logged "step" as the x-axis
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    # ---- checkpointed counters ------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dime_counters"] = {
            "env_steps": self.env_steps, "critic_updates": self.critic_updates, "actor_updates": self.actor_updates,
            "skipped_updates": self.skipped_updates,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Training length is data.total_env_steps, not Lightning epochs: forget that the one "epoch" of a
        # finished run was complete, so that resuming its final checkpoint with a larger total trains on.
        fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
        for progress in fit_loop.get("epoch_progress", {}).values():
            if isinstance(progress, dict):
                progress.update({key: 0 for key in progress})
        if "epoch_loop.batch_progress" in fit_loop:
            fit_loop["epoch_loop.batch_progress"]["is_last_batch"] = False
        counters = checkpoint["dime_counters"]
        self.env_steps = counters["env_steps"]
        self.critic_updates = counters["critic_updates"]
        self.actor_updates = counters["actor_updates"]
        self.skipped_updates = counters.get("skipped_updates", 0)


def maybe_compile(fn: Callable, mode: CompileMode) -> Callable:
    """``fn`` itself for ``"none"``, else ``torch.compile(fn, mode=mode)`` (compiled lazily, on first call)."""
    return fn if mode == "none" else torch.compile(fn, mode=mode)


def mark_compiled_step() -> None:
    """Tell CUDA-graph trees that a new update begins (outputs of earlier replays may be overwritten)."""
    if torch.cuda.is_available():
        torch.compiler.cudagraph_mark_step_begin()
