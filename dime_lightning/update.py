"""The update of one env step, outside any framework (docs/algorithm.md §4): DIME's whole learning step in one object.

    updater = DIMEUpdater(actor, critic, temperature)       # the paper's settings (UpdateSettings) by default
    updater.build_optimizers(fused=device.type == "cuda")   # once the modules sit on their device
    metrics = updater(sample)                               # sample: (utd, B) TensorDict of transitions

One call runs an env step's worth of updates as the reference schedules them: ``utd`` critic updates and, after
every ``policy_delay``-th critic update (counted globally), an actor update (NaN → 0 and element-wise clipping
of its gradients), a temperature update and the target-actor refresh, each on the same minibatch. It returns
detached diagnostics. No Lightning, no MLflow, no env: ``DIMEModule.training_step`` and ``benchmarks/`` call it.

The settings (discount, schedule, learning rates, clipping, non-finite handling, compile mode) are one
``update_settings.UpdateSettings``. Its ``compile`` selects how the step runs:

- ``"auto"`` (the default): chosen by the caller from device, processes and run length (``dime_lightning.auto``,
  through ``set_mode``); eager until then.
- ``"none"``: eager PyTorch.
- ``"default"`` / ``"reduce-overhead"``: the two loss functions through ``torch.compile`` (with CUDA graphs for
  ``reduce-overhead``); backward passes, clipping and optimizer steps run eagerly between them.
- ``"whole"``: the *whole* env step — every forward, gradient, clipping and optimizer step of critic, actor
  and temperature — runs as two programs (program.py: ``torch.func`` gradients, Adam as tensor ops): the
  critic update, and the actor update with the temperature update and target refresh. Each is compiled into a
  single graph (``fullgraph=True``: no graph break), on CUDA replayed as one CUDA graph (tensordict's
  ``CudaGraphModule``), on a CPU compiled ahead of time and called without Dynamo (``program.AheadOfTime``);
  an env step calls them ``utd`` times and when the actor is due. Nothing in them reads a tensor back to the
  host: the non-finite check is a device-side count that ``check_nonfinite()`` reads (one sync) at the caller's
  cadence. With ``nonfinite="skip"`` a step whose loss is non-finite changes nothing
  (parameters, optimizer state and batch-renorm statistics kept with ``torch.where``); skipped steps still
  count as updates. On CUDA the captured programs are first checked against the same programs run eagerly
  (``self_check``; self_check.py); on a mismatch the updater warns once and continues eagerly.

Trainer hooks for the eager and compiled-loss modes (all optional; the defaults are plain PyTorch):
``backward(loss)`` and ``optimizer_step(optimizer)`` (Lightning's ``manual_backward`` and its optimizer
wrappers: DDP's gradient averaging, precision plugins, step counting), ``all_finite(flag)`` (one decision
for all ranks) and ``after_critic_step()`` (averaging batch-renorm statistics over ranks). "whole" uses none
of them: it runs in one process.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from tensordict import TensorDict
from torch import nn

from dime_lightning.errors import BadInputError, NonFiniteError
from dime_lightning.losses import actor_loss, critic_loss, temperature_loss
from dime_lightning.optim import adam, gradient_norm, zero_nan_and_clip_gradients_
from dime_lightning.program import MINIBATCH_KEYS, StepProgram, compile_program
from dime_lightning.schedule import UpdateSchedule
from dime_lightning.self_check import compare_runs
from dime_lightning.temperature import Temperature
from dime_lightning.update_settings import AUTO, COMPILE_MODES, UpdateSettings

if TYPE_CHECKING:  # the updater knows no checkpoint: the module hands it the counters it read
    from dime_lightning.checkpoint_schema import Counters

NONFINITE_SLOTS = ("loss_critic", "loss_actor", "loss_alpha")
CUDA_GRAPH_WARMUP = 3  # compiled calls run eagerly before each program's CUDA graph is captured


def maybe_compile(fn: Callable, mode: str) -> Callable:
    """``fn`` itself for ``"none"``, else ``torch.compile(fn, mode=mode)`` (compiled lazily, on first call)."""
    return fn if mode == "none" else torch.compile(fn, mode=mode)


def mark_compiled_step() -> None:
    """Tell CUDA-graph trees that a new update begins (outputs of earlier replays may be overwritten)."""
    if torch.cuda.is_available():
        torch.compiler.cudagraph_mark_step_begin()


def _plain_step(optimizer: torch.optim.Optimizer) -> None:
    optimizer.step()


class DIMEUpdater:
    """Actor, critic and temperature updates of one env step, with their optimizers and the schedule counters.

    ``target_actor`` (``policy_tau < 1``) is a Polyak-averaged copy used for the critic target; with
    ``policy_tau = 1`` (the reference) the target actor is the actor and none is kept. ``settings``: an
    ``UpdateSettings`` (or its fields as a mapping); the defaults are the paper's.
    """

    def __init__(
        self,
        actor: nn.Module,
        critic: nn.Module,
        temperature: Temperature,
        target_actor: nn.Module | None = None,
        settings: UpdateSettings | dict | None = None,
        backward: Callable[[torch.Tensor], None] | None = None,
        optimizer_step: Callable[[torch.optim.Optimizer], None] | None = None,
        all_finite: Callable[[torch.Tensor], bool] | None = None,
        after_critic_step: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings = UpdateSettings.of(settings)
        self.actor, self.critic, self.temperature, self.target_actor = actor, critic, temperature, target_actor
        self.schedule = UpdateSchedule(settings.utd, settings.policy_delay)
        self.backward = backward or torch.Tensor.backward  # the hooks serve the eager and compiled-loss modes
        self.optimizer_step = optimizer_step or _plain_step
        self.all_finite = all_finite or bool
        self.after_critic_step = after_critic_step or (lambda: None)
        self._program: StepProgram | None = None  # "whole": built at the first env step, on the optimizers' state
        self._compiled: dict[str, Callable[..., dict[str, torch.Tensor]]] = {}  # "whole": its two programs, compiled
        self._captured = False  # "whole": whether they replay as CUDA graphs
        # "auto" is resolved by the caller, which knows device, processes and run length (DIMEModule.setup, through
        # dime_lightning.auto): until then, and for framework-free use, the update runs eagerly
        self.set_mode("none" if settings.compile == AUTO else settings.compile)
        self.critic_updates = self.actor_updates = self.skipped_updates = 0
        self.optimizers: list[torch.optim.Optimizer] = []
        self._nonfinite: torch.Tensor | None = None  # "whole": non-finite losses per slot since the last check
        self._skipped: torch.Tensor | None = None  # "whole" + "skip": steps undone since the last check

    def set_mode(self, mode: str) -> None:
        """Run the update as ``mode`` ("none", "default", "reduce-overhead", "whole") from the next env step: the
        resolution of "auto", or the self-check's fall-back to eager."""
        if mode not in COMPILE_MODES or mode == AUTO:
            raise BadInputError(f"the update's mode must be one of {COMPILE_MODES[1:]}, got {mode!r}")
        self.mode = mode
        whole = mode == "whole"
        self.critic_loss = critic_loss if whole else maybe_compile(critic_loss, mode)
        self.actor_loss = actor_loss if whole else maybe_compile(actor_loss, mode)
        # compiled: batch-renorm statistics are applied after the critic's backward (critic.BatchRenorm explains);
        # "whole"'s program applies them itself (program.py)
        deferred = mode != "none" and hasattr(self.critic, "defer_statistics_")
        if hasattr(self.critic, "defer_statistics_"):
            self.critic.defer_statistics_(deferred)
        self.commit_statistics = self.critic.commit_statistics_ if deferred and not whole else None
        self._program = None
        self._compiled.clear()

    # ---- optimizers ---------------------------------------------------------------------------------------
    def build_optimizers(self, fused: bool = False) -> list[torch.optim.Optimizer]:
        """Critic and actor Adam (paper lr and betas), and Adam on log α unless α is fixed; in that order.

        ``fused`` (CUDA) updates each part in one kernel in the eager modes. "whole" never calls ``step()``: its
        program applies Adam to these optimizers' state tensors (program.py), which are checkpointed as usual.
        """
        device = self.temperature.log_alpha.device
        fused = fused and self.mode != "whole"
        s = self.settings
        self.critic_opt = adam(self.critic.parameters(), s.critic_lr, s.betas, fused)
        self.actor_opt = adam(self.actor.parameters(), s.actor_lr, s.betas, fused)
        self.alpha_opt = None
        if self.temperature.log_alpha.requires_grad:  # fixed α has nothing to optimise
            self.alpha_opt = torch.optim.Adam([self.temperature.log_alpha], lr=self.temperature.lr,
                                              fused=fused or None)
        self.optimizers = [self.critic_opt, self.actor_opt] + ([self.alpha_opt] if self.alpha_opt else [])
        self._nonfinite = torch.zeros(len(NONFINITE_SLOTS), device=device)
        self._skipped = torch.zeros((), device=device)
        self._program = None
        self._compiled.clear()
        return self.optimizers

    def align_loaded_optimizers(self) -> None:
        """After optimizer states were loaded from a checkpoint: "whole" keeps the step counts on the parameters'
        device (its program reads no number back to the host) and rebuilds its program on the loaded state
        tensors, so that a checkpoint of any mode resumes in any other. Call it once the states are restored (the
        module does, at train start)."""
        if self.mode != "whole" or not self.optimizers:
            return
        self._place_step_counts(None)
        self._program = None
        self._compiled.clear()

    def _place_step_counts(self, device: torch.device | str | None) -> None:
        """Adam's step counts as float32 on ``device`` (None: each parameter's own device, as "whole" keeps them;
        "cpu": where torch's eager, unfused Adam keeps them)."""
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    state = optimizer.state.get(p, {})
                    if isinstance(state.get("step"), torch.Tensor):
                        state["step"] = state["step"].to(device=device or p.device, dtype=torch.float32)

    # ---- one env step -------------------------------------------------------------------------------------
    def __call__(self, sample: TensorDict, diagnostics: bool = False) -> TensorDict:
        """Run one env step's updates on ``sample`` (utd, B); returns detached diagnostics of the last critic
        and (if one ran) the last actor update. Without ``diagnostics``, eager modes skip the gradient norms."""
        if not self.optimizers:
            raise RuntimeError("DIMEUpdater.build_optimizers() must be called before the first update")
        if sample.batch_size[0] != self.schedule.utd:
            raise BadInputError(f"the sample must hold utd = {self.schedule.utd} minibatches, got {sample.batch_size}")
        if self.mode == "whole":
            return self._whole_step(sample)
        metrics = TensorDict()
        for minibatch in sample.unbind(0):  # (utd, B) -> utd × (B,)
            critic_metrics = self.critic_update(minibatch, diagnostics)
            if critic_metrics is None:
                continue
            metrics.update(critic_metrics)
            self.critic_updates += 1
            if self.schedule.actor_due(self.critic_updates):
                actor_metrics = self.actor_update(minibatch, diagnostics)
                if actor_metrics is not None:
                    metrics.update(actor_metrics)
                    self.actor_updates += 1
        return metrics

    def critic_update(self, minibatch: TensorDict, diagnostics: bool = True) -> TensorDict | None:
        """One critic update (docs/algorithm.md §2.2); None if skipped for a non-finite loss (eager check)."""
        mark_compiled_step()
        metrics = self.critic_loss(self.critic, self.target_actor or self.actor, minibatch, self.temperature.alpha(),
                                   self.settings.gamma, self.settings.critic_entropy_coef)
        loss = metrics.pop("loss_critic")
        if self._skip_now("loss_critic", loss):
            return None
        self.critic_opt.zero_grad()
        self.backward(loss)
        if self.commit_statistics is not None:
            self.commit_statistics()
        metrics["loss_critic"] = loss.detach()
        if self.mode == "reduce-overhead":
            metrics = metrics.clone()  # a replayed CUDA graph reuses its output memory
        if diagnostics:
            metrics["grad_norm_critic"] = gradient_norm(self.critic.parameters())
        self.optimizer_step(self.critic_opt)
        self.after_critic_step()
        return metrics

    def actor_update(self, minibatch: TensorDict, diagnostics: bool = True) -> TensorDict | None:
        """Actor (docs/algorithm.md §1.7), temperature (§3) and target refresh; None if skipped (eager check)."""
        mark_compiled_step()
        metrics = self.actor_loss(self.actor, self.critic, minibatch["observation"], self.temperature.alpha())
        loss = metrics.pop("loss_actor")
        if self._skip_now("loss_actor", loss):
            return None
        self.actor_opt.zero_grad()
        self.backward(loss)
        zero_nan_and_clip_gradients_(self.actor.parameters(), self.settings.actor_grad_clip)
        metrics["loss_actor"] = loss.detach()
        if self.mode == "reduce-overhead":
            metrics = metrics.clone()
        if diagnostics:
            metrics["grad_norm_actor"] = gradient_norm(self.actor.parameters())
        self.optimizer_step(self.actor_opt)
        alpha_metrics = temperature_loss(self.temperature, metrics["running_cost"])
        if self.alpha_opt is not None:
            self.alpha_opt.zero_grad()
            self.backward(alpha_metrics["loss_alpha"])
            self.optimizer_step(self.alpha_opt)
        metrics.update(alpha_metrics.detach())
        self.refresh_target_actor()
        return metrics

    @torch.no_grad()
    def refresh_target_actor(self) -> None:
        """θ' ← τ θ + (1 − τ) θ' (nothing is kept at τ = 1: the target actor is the actor)."""
        if self.target_actor is None:
            return
        for target, online in zip(self.target_actor.parameters(), self.actor.parameters(), strict=True):
            target.lerp_(online, self.settings.policy_tau)

    # ---- "whole": the env step as one compiled (and on CUDA, graph-replayed) function ----------------------
    def phase(self) -> tuple[bool, ...]:
        """Which of this env step's ``utd`` critic updates are followed by an actor update."""
        return tuple(self.schedule.actor_due(self.critic_updates + i + 1) for i in range(self.schedule.utd))

    def program(self) -> StepProgram:
        """"whole": the env step as one program over the modules and the optimizers' state (program.py)."""
        if self._program is None:
            optimizers = {"critic": self.critic_opt, "actor": self.actor_opt, "alpha": self.alpha_opt}
            self._program = StepProgram(self.actor, self.critic, self.temperature, self.target_actor, optimizers,
                                        self.settings, self._nonfinite, self._skipped)
        return self._program

    def _whole_step(self, sample: TensorDict) -> TensorDict:
        if not self._compiled:
            self._compile(sample)
            if self._captured:
                reason = self.self_check(sample)
                if reason is not None:
                    self._fall_back_to_eager(reason)
                    return self(sample)
        mark_compiled_step()  # for CUDA-graph trees of compiled acting: a new step begins
        columns = _columns(sample)
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():  # the programs take their gradients themselves (torch.func): inference graphs
            for i, actor_due in enumerate(self.phase()):
                out.update(self._compiled["critic"](*(column[i] for column in columns)))  # a replayed graph's
                self.critic_updates += 1  # outputs are kept until its next replay: only the last is returned
                if actor_due:
                    out.update(self._compiled["actor"](columns[0][i]))
                    self.actor_updates += 1
        return TensorDict(out)

    def _compile(self, sample: TensorDict) -> None:
        """The two programs, each one graph (program.py: ``compile_program``), taking a minibatch's tensors and
        returning a plain dict (``critic_step``, ``actor_step``); on CUDA each is replayed as one CUDA graph."""
        cuda = sample.device is not None and sample.device.type == "cuda"
        program = self.program()
        for name, fn in (("critic", program.critic_step), ("actor", program.actor_step)):
            fn = compile_program(fn, cuda, program.parts, program.constants)
            if cuda:
                from tensordict.nn import CudaGraphModule  # CUDA only

                # warm-up calls (compiled, run eagerly) before the capture: nothing compiles during it
                fn = CudaGraphModule(fn, warmup=CUDA_GRAPH_WARMUP, in_keys=[], out_keys=[])
            self._compiled[name] = fn
        self._captured = cuda

    def self_check(self, sample: TensorDict) -> str | None:
        """Compiled programs against the same programs run eagerly (self_check.py), from the current state, on the
        minibatches of ``sample``, over enough updates that each captured program is replayed twice; the state is
        restored afterwards. Returns what disagrees, or None."""
        if not self._compiled:
            self._compile(sample)
        program, columns = self.program(), _columns(sample)
        plan, n = [], self.critic_updates  # (minibatch index, actor due) in the schedule's order from here
        while sum(due for _, due in plan) < CUDA_GRAPH_WARMUP + 3:  # warm-up calls, the capture, two replays
            n += 1
            plan.append((len(plan) % self.schedule.utd, self.schedule.actor_due(n)))

        @torch.no_grad()  # as in _whole_step
        def run(critic: Callable, actor: Callable) -> dict[str, torch.Tensor]:
            outputs = {}
            for step, (i, due) in enumerate(plan):
                mark_compiled_step()
                results = [("critic", critic(*(column[i] for column in columns)))]
                if due:
                    results.append(("actor", actor(columns[0][i])))
                outputs.update({f"update {step} {kind}: {key}": value.clone() for kind, out in results
                                for key, value in out.items()})
            return outputs

        return compare_runs(program.tensors(), lambda: run(self._compiled["critic"], self._compiled["actor"]),
                            lambda: run(program.critic_step, program.actor_step))

    def _fall_back_to_eager(self, reason: str) -> None:
        warnings.warn(f"model.update.compile 'whole': the compiled update disagreed with the eager one in the start-up "
                      f"self-check ({reason}); this run updates eagerly (as model.update.compile 'none')",
                      RuntimeWarning, stacklevel=3)
        self.set_mode("none")
        self._place_step_counts("cpu")

    def _skip_now(self, name: str, loss: torch.Tensor) -> bool:
        """Eager check (one host sync): stop with a message, or skip this optimizer step and count it."""
        if not self.settings.check_finite:
            return False
        if self.all_finite(torch.isfinite(loss)):
            return False
        if self.settings.nonfinite == "stop":
            value = f"= {loss.item()}" if not bool(torch.isfinite(loss)) else "on another rank"
            raise NonFiniteError(f"non-finite {name} {value}")
        self.skipped_updates += 1
        return True

    def check_nonfinite(self, where: str) -> None:
        """"whole" mode: read the device-side counts (one host sync). Non-finite losses since the last check
        raise ``NonFiniteError`` naming the losses and ``where`` (``nonfinite="stop"``), or add to
        ``skipped_updates`` (``"skip"``). A no-op in the other modes, whose checks run at every update."""
        if self.mode != "whole" or not self.settings.check_finite or self._nonfinite is None:
            return
        counts = self._nonfinite.tolist()
        if self.settings.nonfinite == "skip":
            self.skipped_updates += int(self._skipped.item())
            self._skipped.zero_()
            self._nonfinite.zero_()
            return
        if any(counts):
            names = ", ".join(f"{name} ({int(n)}×)" for name, n in zip(NONFINITE_SLOTS, counts, strict=True) if n)
            raise NonFiniteError(f"non-finite {names} {where}")

    # ---- state ----------------------------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        return {"critic_updates": self.critic_updates, "actor_updates": self.actor_updates,
                "skipped_updates": self.skipped_updates}

    def load_counters(self, counters: Counters) -> None:
        self.critic_updates = counters.critic_updates
        self.actor_updates = counters.actor_updates
        self.skipped_updates = counters.skipped_updates


def _columns(sample: TensorDict) -> list[torch.Tensor]:
    """The (utd, B, ...) tensors of ``sample`` in the order the "whole" programs take a minibatch's."""
    return [sample.get(key) for key in MINIBATCH_KEYS]


def make_target_actor(actor: nn.Module, policy_tau: float) -> nn.Module | None:
    """A frozen copy of ``actor`` for ``policy_tau < 1``; None at τ = 1 (the reference keeps no copy)."""
    return copy.deepcopy(actor).requires_grad_(False) if policy_tau < 1.0 else None
