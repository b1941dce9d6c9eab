"""An env step's updates as traceable programs: what update.py's "whole" mode compiles (docs/algorithm.md §4).

The same updates as the eager path (critic, then actor, temperature and target refresh when due), written so that
Dynamo traces each update (the critic's; the actor's with the temperature and the target refresh) into a single
graph (``torch.compile(..., fullgraph=True)``), with no backward pass and no optimizer call between graphs:

- gradients: ``torch.func.grad_and_value`` of each loss with respect to its own parameters only (every other
  tensor enters as a constant, so no gradient can reach another part);
- Adam: ``adam_``, torch.optim.Adam's update (no weight decay, no amsgrad) as the tensor ops it is, on the
  optimizers' own state tensors, so checkpoints are those of the eager modes;
- batch renorm: each critic loss writes its new statistics to fresh tensors returned by the gradient transform,
  applied after the step (only where the loss is finite with ``nonfinite="skip"``);
- non-finite losses: counted on the device; with ``"skip"`` a non-finite step leaves parameters, optimizer
  state and statistics unchanged (``torch.where``), so the schedule stays static and nothing is read back.

``compile_program`` compiles one: from a code object of its own, with only the guards that can change between its
calls (``kept_guards``), and on a CPU with inductor's C++ wrapper, ahead of time and called without Dynamo
(``AheadOfTime``).
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from tensordict import TensorDict
from torch import nn
from torch.func import functional_call, grad_and_value

from dime_lightning.compat import compile_ahead_of_time, graph_break_errors
from dime_lightning.errors import BadInputError
from dime_lightning.losses import actor_loss, critic_loss, temperature_loss
from dime_lightning.optim import global_norm, zero_nan_and_clip
from dime_lightning.temperature import Temperature
from dime_lightning.update_settings import UpdateSettings

# how "whole" compiles a program: noise from the eager generator (the self-check relies on it); no per-call re-check
# of the input sizes and strides that the guards already check (≈ 9 % of a call at the dispatch-bound size)
INDUCTOR_OPTIONS = {"fallback_random": True, "size_asserts": False}
# on a CPU also the program's wrapper as C++ (its kernel calls and buffer allocations otherwise run in Python; on CUDA
# the program is replayed as a CUDA graph, with no wrapper to speed up)
CPU_INDUCTOR_OPTIONS = {**INDUCTOR_OPTIONS, "cpp_wrapper": True}
# the guards a compiled program keeps (compile_program): what can differ between two calls of one program
KEPT_GUARDS = frozenset({
    "TENSOR_MATCH",  # every tensor it reads or writes: dtype, device, shape, strides, requires_grad
    "ID_MATCH",  # the program object itself
    "CONSTANT_MATCH", "EQUALS_MATCH",  # its own settings and the optimizers' hyperparameters (not globals, see below)
    "GRAD_MODE", "GLOBAL_STATE", "DEFAULT_DEVICE", "TORCH_FUNCTION_STATE", "DETERMINISTIC_ALGORITHMS",
    "FUNCTORCH_STACK_MATCH", "AUTOGRAD_SAVED_TENSORS_HOOKS", "SHAPE_ENV",  # torch's global state
})
MAX_LAYOUTS = 8  # AheadOfTime: layouts compiled per program before it refuses (Dynamo's default recompile limit)
PENDING = "pending_"  # critic.BatchRenorm's buffers for the statistics of the last train-mode forward
# a minibatch's tensors in the order the compiled programs take them (critic_step)
MINIBATCH_KEYS = ("observation", "action", ("next", "observation"), ("next", "reward"), ("next", "terminated"))


def kept_guards(entries: list) -> list[bool]:
    """Dynamo's guard filter (``guard_filter_fn``) for a program: keep ``KEPT_GUARDS``, except constants reached
    through modules or globals. Dropped: the structure of the modules (their dicts, hooks and modes), globals (the
    functions and classes the program calls) and input aliasing: fixed for a program's life, since the updater
    builds a new program whenever they may change (``DIMEUpdater.set_mode``, ``build_optimizers``,
    ``align_loaded_optimizers``), and a program's code object is its own (``compile_program``). They were ≈ 90 % of
    its ≈ 2,500 guards and ≈ 15 % of its time at the dispatch-bound size."""
    keep = []
    for entry in entries:
        constant = entry.guard_type in ("CONSTANT_MATCH", "EQUALS_MATCH")
        in_module = entry.orig_guard.source.is_unspecialized_nn_module()
        keep.append(entry.guard_type in KEPT_GUARDS and not (constant and (entry.is_global or in_module)))
    return keep


def _for_ahead_of_time(fn: Callable) -> Callable:
    """``torch.compile`` of ``fn`` for ``AheadOfTime``, which checks the layout itself: no guard is kept."""
    options = {**CPU_INDUCTOR_OPTIONS, "guard_filter_fn": torch.compiler.skip_all_guards_unsafe}
    return torch.compile(fn, fullgraph=True, options=options)


def compile_program(method: Callable, cuda: bool, modules: nn.Module, constants: Callable[[], tuple] = tuple
                    ) -> Callable:
    """``method`` (a bound method of a ``StepProgram``) compiled into one graph (``fullgraph``: any graph break fails
    loudly), through a copy of its function with a code object of its own: Dynamo keeps compiled graphs per code
    object, so this program's graph is the only one its calls can run (no other program instance's, which its
    dropped guards could not tell apart), and a rebuilt program leaves no stale graph behind. ``modules``: every
    module whose tensors it reads; ``constants``: the Python numbers it reads (both for ``AheadOfTime``, on a CPU)."""
    fn, owner = method.__func__, method.__self__
    own = types.MethodType(types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__,
                                              fn.__closure__), owner)
    if cuda:
        return torch.compile(own, fullgraph=True, options={**INDUCTOR_OPTIONS, "guard_filter_fn": kept_guards})
    return AheadOfTime(_for_ahead_of_time(own), owner, modules, constants, "model.update.compile")


def compile_acting(act: Callable, mode: str, device_type: str) -> Callable:
    """An actor's bound ``act`` as ``model.compile_act`` says: ``act`` itself for "none"; on a CPU compiled ahead of
    time and called without Dynamo (``AheadOfTime``, with the programs' options: noise from the eager generator);
    elsewhere ``torch.compile(act, mode=mode)``. At the dispatch-bound size, right after an update, an action took
    35 µs ahead of time against 132 µs through Dynamo, whose guard check then ran cold (BENCHMARKS.md).

    Ahead of time the actor's Python attributes are compiled in, as they were at the first call (its control
    function, step count, any flag its ``act`` reads): change them before the fit starts, or act with "none". An
    ``act`` that does not trace into one graph (``compat.graph_break_errors``), or one that is not a method of an
    ``nn.Module``, acts through ``torch.compile`` with the same options (one warning for the first)."""
    if mode == "none":
        return act
    if device_type != "cpu":
        return torch.compile(act, mode=mode)
    through_dynamo = torch.compile(act, options=INDUCTOR_OPTIONS)  # lazy; on a CPU the modes compile alike
    actor = getattr(act, "__self__", None)
    if not isinstance(actor, nn.Module):
        return through_dynamo
    # bound to _acting: AheadOfTime calls a function of (owner, *args), whatever the signature of act
    return AheadOfTime(_for_ahead_of_time(types.MethodType(_acting, actor)), actor, actor, tuple,
                       "model.compile_act", fallback=through_dynamo)


def _acting(actor: nn.Module, obs: torch.Tensor) -> torch.Tensor:
    return actor.act(obs)


class AheadOfTime:
    """A compiled program on a CPU, compiled ahead of time for the layout of its arguments and state
    (``compat.compile_ahead_of_time``) and called without Dynamo: no guard check, no frame evaluation (at the
    dispatch-bound size 337–345 against 537–546 µs per critic + actor call, BENCHMARKS.md). In their place it checks
    per call, in a few µs (``layout``), what can differ between two calls of a program, and compiles anew for a
    layout it has not seen (at most ``MAX_LAYOUTS``; beyond, an error that names ``setting``, the setting whose
    "none" avoids compiling):

    - each argument's shape, strides, dtype, device and ``requires_grad``; grad mode and CPU autocast;
    - the dtype, device and training flag of every module in ``modules`` that holds parameters of its own (its
      first parameter's): a module or a submodule moved or converted (``.to``, ``.double``), or switched to eval;
    - the Python numbers it reads that can change in place, compiled in as constants (``constants()``: a
      ``StepProgram``'s optimizer hyperparameters; its settings are frozen).

    Not checked, unlike Dynamo's guards: one parameter, buffer or optimizer state replaced by a tensor of another
    shape, dtype, strides or device; torch's other global state (deterministic algorithms, default dtype and device,
    torch-function modes, the functorch stack, saved-tensor hooks). The updater builds a new program wherever it
    replaces tensors itself (``DIMEUpdater.set_mode``, ``build_optimizers``, ``align_loaded_optimizers``).

    ``fallback`` (acting): where the first compilation finds no single graph (``compat.graph_break_errors``), one
    warning and every call through ``fallback`` instead."""

    def __init__(self, compiled: Callable, owner: object, modules: nn.Module, constants: Callable[[], tuple],
                 setting: str, fallback: Callable | None = None) -> None:
        self.compiled, self.owner, self.constants, self.setting = compiled, owner, constants, setting
        holders = [m for m in modules.modules() if next(m.parameters(recurse=False), None) is not None]
        self.sentinels = [(m, next(m.parameters(recurse=False))) for m in holders]
        self.artifacts: dict[tuple, Callable] = {}  # by layout
        self.fallback, self.fallen_back = fallback, False

    def layout(self, args: tuple[torch.Tensor, ...]) -> tuple:
        """What the compiled code was specialized on and can differ between calls (see the class)."""
        return (torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"),
                *((t.shape, t.stride(), t.dtype, t.device, t.requires_grad) for t in args),
                *((p.dtype, p.device, m.training) for m, p in self.sentinels), self.constants())

    def __call__(self, *args: torch.Tensor) -> Any:
        if self.fallen_back:
            return self.fallback(*args)
        key = self.layout(args)
        artifact = self.artifacts.get(key)
        if artifact is None:
            if len(self.artifacts) == MAX_LAYOUTS:
                raise BadInputError(
                    f"a program compiled ahead of time was compiled for {MAX_LAYOUTS} layouts already (argument "
                    "shapes or dtypes, module dtypes and modes, or the numbers it reads changed again); what "
                    "changes every few calls (a scheduled learning rate, observations of ever new shapes) needs "
                    f"{self.setting} none")
            try:
                artifact = self.artifacts[key] = compile_ahead_of_time(self.compiled, args)
            except graph_break_errors() as err:
                if self.fallback is None or self.artifacts:
                    raise
                warnings.warn(f"{self.setting}: no single graph to compile ahead of time ({type(err).__name__}: "
                              f"{err}); compiled through torch.compile instead", RuntimeWarning, stacklevel=2)
                self.fallen_back = True
                return self.fallback(*args)
        return artifact(self.owner, *args)


class _Parts(nn.Module):
    """Actor, critic, temperature (and target actor) under one module, so that one ``functional_call`` swaps
    any of their parameters for the duration of a loss; ``forward`` dispatches to the loss named by ``kind``."""

    def __init__(self, actor: nn.Module, critic: nn.Module, temperature: Temperature,
                 target_actor: nn.Module | None) -> None:
        super().__init__()
        self.actor, self.critic, self.temperature, self.target_actor = actor, critic, temperature, target_actor

    def forward(self, kind: str, *args) -> TensorDict:
        if kind == "critic":
            minibatch, gamma, entropy_coef = args
            return critic_loss(self.critic, self.target_actor or self.actor, minibatch, self.temperature.alpha(),
                               gamma, entropy_coef)
        if kind == "actor":
            self.critic.eval()  # running statistics; its parameters are constants here (see _Parts.loss)
            try:
                return actor_loss(self.actor, self.critic, args[0], self.temperature.alpha(), freeze_critic=False)
            finally:
                self.critic.train()
        return temperature_loss(self.temperature, args[0])


def assign_(target: torch.Tensor, value: torch.Tensor) -> None:
    """``target`` ← ``value`` in place. A 0-d tensor is written through a 1-element view: the compiler of torch
    2.13 drops in-place writes to 0-d float64 CPU inputs of a compiled graph (``dt_param``, ``log_alpha`` and
    their Adam moments in the float64 tests; float32 and int64 are written), while writes through a view land."""
    (target.view(1) if target.dim() == 0 else target).copy_(value)


def adam_(params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict], group: dict,
          keep: torch.Tensor | None = None) -> None:
    """In place: torch.optim.Adam's step (``group``'s lr, betas, eps; no weight decay, no amsgrad) on ``params``
    and their ``states`` ("step", "exp_avg", "exp_avg_sq"). The bias corrections are computed in float64 from
    the step count, as the eager optimizer does with Python floats. ``keep`` (0-d bool): where false, nothing
    changes (a skipped non-finite step)."""
    lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
    for param, grad, state in zip(params, grads, states, strict=True):
        step = state["step"] + 1
        exp_avg = state["exp_avg"].lerp(grad, 1 - beta1)
        exp_avg_sq = state["exp_avg_sq"] * beta2 + (1 - beta2) * grad * grad
        count = step.to(torch.float64)
        bias_correction1 = 1 - torch.pow(beta1, count)
        bias_correction2 = 1 - torch.pow(beta2, count)
        denom = exp_avg_sq.sqrt() / bias_correction2.sqrt() + eps
        new = (param - (lr / bias_correction1) * exp_avg / denom).to(param.dtype)
        for tensor, value in ((param, new), (state["step"], step), (state["exp_avg"], exp_avg),
                              (state["exp_avg_sq"], exp_avg_sq)):
            assign_(tensor, value if keep is None else torch.where(keep, value, tensor))


def ensure_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the state torch.optim.Adam makes on its first step (zeros), with the step count on the parameter's
    device, for every parameter that has none yet (a fresh run); loaded states are left as they are."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not optimizer.state.get(p):
                optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                                      "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                      "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}


class StepProgram:
    """The two updates of an env step, ``critic_update(minibatch)`` and ``actor_update(minibatch)``, each a function
    of the minibatch (and of the modules' and optimizers' tensors, which it updates in place); the updater calls
    them as the schedule says. ``nonfinite`` (3,) and ``skipped`` () are the updater's device-side counters."""

    def __init__(self, actor: nn.Module, critic: nn.Module, temperature: Temperature, target_actor: nn.Module | None,
                 optimizers: dict[str, torch.optim.Optimizer | None], settings: UpdateSettings,
                 nonfinite: torch.Tensor, skipped: torch.Tensor) -> None:
        self.parts = _Parts(actor, critic, temperature, target_actor)
        self.settings, self.nonfinite, self.skipped = settings, nonfinite, skipped
        names = {id(p): name for name, p in self.parts.named_parameters()}
        # part -> (parameter names, optimizer states, hyperparameters). The parameters themselves are reached only
        # through self.parts: a tensor reached by two paths costs Dynamo an aliasing guard evaluated in Python on
        # every call
        self.groups = {}
        for part, optimizer in optimizers.items():
            if optimizer is None:
                continue
            ensure_adam_state(optimizer)
            (group,) = optimizer.param_groups
            params = list(group["params"])
            self.groups[part] = ([names[id(p)] for p in params], [optimizer.state[p] for p in params], group)

    def constants(self) -> tuple:
        """The Python numbers the programs read that can change in place: each optimizer's Adam hyperparameters
        (the settings are a frozen ``UpdateSettings``, fixed for the program's life)."""
        return tuple((group["lr"], group["betas"], group["eps"]) for _, _, group in self.groups.values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the programs update in place, by name: parameters, buffers (batch-renorm statistics),
        optimizer state and the non-finite counters."""
        tensors = {name: p.data for name, p in self.parts.named_parameters()}
        tensors.update(self.parts.named_buffers())
        for part, (names, states, _) in self.groups.items():
            for name, state in zip(names, states, strict=True):
                tensors.update({f"{part} optimizer {key} of {name}": value for key, value in state.items()})
        return {**tensors, "non-finite counts": self.nonfinite, "skipped updates": self.skipped}

    def loss(self, kind: str, *args) -> tuple[dict[str, torch.Tensor], TensorDict, dict]:
        """Gradients of loss ``kind`` ("critic", "actor", "alpha") with respect to that part's trainable parameters
        only; returns (gradients by name, the loss's TensorDict with its named loss detached, the new batch-renorm
        statistics by name)."""
        names = self.groups[kind][0]
        constants = {name: p.detach() for name, p in self.parts.named_parameters()}
        buffers = dict(self.parts.named_buffers())

        def objective(trainable: dict[str, torch.Tensor]) -> tuple[torch.Tensor, tuple[TensorDict, dict]]:
            pending = {name: torch.empty_like(b) for name, b in buffers.items() if name.rpartition(".")[2].startswith(
                PENDING)}  # created inside the transform: the train-mode critic forward writes them
            out = functional_call(self.parts, {**constants, **buffers, **pending, **trainable}, (kind, *args))
            loss = out[f"loss_{kind}"]
            return loss, (out.exclude(f"loss_{kind}").set(f"loss_{kind}", loss.detach()), pending)

        grads, (_, (out, pending)) = grad_and_value(objective, has_aux=True)({name: constants[name] for name in names})
        return grads, out, pending

    def step(self, part: str, grads: dict[str, torch.Tensor], loss: torch.Tensor, slot: int) -> torch.Tensor | None:
        """Adam on ``part``; counts a non-finite ``loss`` and, with "skip", leaves everything unchanged for it.
        Returns the finite flag where steps are undone (None otherwise)."""
        names, states, group = self.groups[part]
        params = dict(self.parts.named_parameters())
        keep = None
        if self.settings.check_finite:
            finite = torch.isfinite(loss)
            assign_(self.nonfinite[slot], self.nonfinite[slot] + (~finite).to(self.nonfinite.dtype))
            if self.settings.nonfinite == "skip":
                keep = finite
                assign_(self.skipped, self.skipped + (~finite).to(self.skipped.dtype))
        with torch.no_grad():
            adam_([params[name].data for name in names], [grads[name] for name in names], states, group, keep)
        return keep

    def critic_step(self, *tensors: torch.Tensor) -> dict[str, torch.Tensor]:
        """``critic_update`` on a minibatch given as its tensors (``MINIBATCH_KEYS``), returning a plain dict: what
        "whole" compiles, so that each call's guards and outputs are plain tensors, not TensorDicts."""
        minibatch = TensorDict(dict(zip(MINIBATCH_KEYS, tensors, strict=True)), batch_size=tensors[0].shape[:1])
        return dict(self.critic_update(minibatch).items())

    def actor_step(self, observation: torch.Tensor) -> dict[str, torch.Tensor]:
        """``actor_update`` on a minibatch's observations, returning a plain dict: what "whole" compiles."""
        return dict(self.actor_update(TensorDict(observation=observation, batch_size=observation.shape[:1])).items())

    def critic_update(self, minibatch: TensorDict) -> TensorDict:
        s = self.settings
        grads, out, pending = self.loss("critic", minibatch, s.gamma, s.critic_entropy_coef)
        out["grad_norm_critic"] = global_norm(grads.values())
        keep = self.step("critic", grads, out["loss_critic"], 0)
        buffers = dict(self.parts.named_buffers())
        with torch.no_grad():  # the statistics of this update's train-mode pass (kept if the step was undone)
            for name, value in pending.items():
                running = buffers[name.replace(PENDING, "")]
                assign_(running, value if keep is None else torch.where(keep, value, running))
        return out

    def actor_update(self, minibatch: TensorDict) -> TensorDict:
        """Actor (NaN → 0, element-wise clipping), temperature and target refresh (docs/algorithm.md §1.7, §3, §5)."""
        grads, out, _ = self.loss("actor", minibatch["observation"])
        clip = self.settings.actor_grad_clip
        grads = {name: zero_nan_and_clip(g, clip) for name, g in grads.items()}
        out["grad_norm_actor"] = global_norm(grads.values())
        self.step("actor", grads, out["loss_actor"], 1)
        if "alpha" in self.groups:
            alpha_grads, alpha_out, _ = self.loss("alpha", out["running_cost"])
            self.step("alpha", alpha_grads, alpha_out["loss_alpha"], 2)
        else:  # fixed α: the loss for the record only
            alpha_out = temperature_loss(self.parts.temperature, out["running_cost"]).detach()
        out.update(alpha_out)
        target = self.parts.target_actor
        if target is not None:
            with torch.no_grad():
                for t, online in zip(target.parameters(), self.parts.actor.parameters(), strict=True):
                    assign_(t, t.lerp(online, self.settings.policy_tau))
        return out
