"""How "whole" compiles its programs (program.compile_program): the guards each keeps, and a code object of its own."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import dime_lightning.program as program_module
from dime_lightning.actor import DiffusionActor
from dime_lightning.critic import DistributionalCritic
from dime_lightning.errors import BadInputError
from dime_lightning.program import AheadOfTime, StepProgram, compile_acting, compile_program, kept_guards
from dime_lightning.temperature import Temperature
from dime_lightning.update import DIMEUpdater
from dime_lightning.update_settings import UpdateSettings


def entry(guard_type: str, is_global: bool = False, in_module: bool = False) -> SimpleNamespace:
    source = SimpleNamespace(is_unspecialized_nn_module=lambda: in_module)
    return SimpleNamespace(guard_type=guard_type, is_global=is_global, orig_guard=SimpleNamespace(source=source))


def test_kept_guards_are_the_tensors_the_program_and_its_own_constants() -> None:
    entries = {
        "a parameter's tensor guard": (entry("TENSOR_MATCH", in_module=True), True),
        "a minibatch tensor's guard": (entry("TENSOR_MATCH"), True),
        "the program object": (entry("ID_MATCH"), True),
        "an optimizer's learning rate": (entry("CONSTANT_MATCH"), True),
        "grad mode": (entry("GRAD_MODE"), True),
        "a module's training flag": (entry("EQUALS_MATCH", in_module=True), False),
        "a global constant": (entry("CONSTANT_MATCH", is_global=True), False),
        "a module's parameter names": (entry("DICT_KEYS_MATCH", in_module=True), False),
        "a module's hooks": (entry("EMPTY_NN_MODULE_HOOKS_DICT", in_module=True), False),
        "a global function": (entry("CLOSURE_MATCH", is_global=True), False),
        "input aliasing": (entry("DUPLICATE_INPUT", is_global=True), False),
    }
    kept = kept_guards([e for e, _ in entries.values()])
    assert dict(zip(entries, kept, strict=True)) == {name: keep for name, (_, keep) in entries.items()}


def tiny_program() -> StepProgram:
    actor = DiffusionActor(3, 1, num_steps=1, hidden_dim=8, time_features=8, time_hidden_dim=8)
    critic = DistributionalCritic(3, 1, hidden_dims=(8, 8))
    updater = DIMEUpdater(actor, critic, Temperature(1), settings=UpdateSettings(compile="whole"))
    updater.build_optimizers()
    return updater.program()


@pytest.mark.parametrize("cuda", [False, True])
def test_each_program_is_compiled_from_a_code_object_of_its_own(monkeypatch, cuda) -> None:
    """Dynamo keeps compiled graphs per code object: two programs (a rebuilt one, another run's) share none, and
    neither shares StepProgram's own. On CUDA the guard filter applies; on a CPU the program is compiled ahead of
    time with no guard (AheadOfTime checks the layout), with the C++ wrapper."""
    seen = []

    def compile_(fn, **kwargs):
        seen.append((fn, kwargs))
        return SimpleNamespace(aot_compile=None)

    monkeypatch.setattr(torch, "compile", compile_)
    first, second = tiny_program(), tiny_program()
    compiled = [compile_program(program.critic_step, cuda, program.parts, program.constants)
                for program in (first, second)]
    assert all(isinstance(c, AheadOfTime) is not cuda for c in compiled)
    (fn1, options1), (fn2, options2) = seen
    assert fn1.__self__ is first and fn2.__self__ is second
    codes = {id(fn1.__func__.__code__), id(fn2.__func__.__code__), id(StepProgram.critic_step.__code__)}
    assert len(codes) == 3
    assert fn1.__func__.__code__.co_code == StepProgram.critic_step.__code__.co_code  # the same program
    assert options1 == options2 and options1["fullgraph"]
    guard_filter = kept_guards if cuda else torch.compiler.skip_all_guards_unsafe
    assert options1["options"]["guard_filter_fn"] is guard_filter
    assert options1["options"].get("cpp_wrapper", False) is not cuda


def test_ahead_of_time_layout_changes_with_what_the_guards_checked() -> None:
    """AheadOfTime compiles anew when a call differs from the ones before in what Dynamo's guards checked: the
    arguments' layout, grad mode, a module or submodule converted or switched to eval, a setting or an optimizer
    hyperparameter; not for new values in tensors of the same layout."""
    program = tiny_program()
    program_call = AheadOfTime(lambda *args: None, program, program.parts, program.constants, "model.update.compile")
    holders = {m for m in program.parts.modules() if list(m.parameters(recurse=False))}
    assert {m for m, _ in program_call.sentinels} == holders and len(holders) > 3
    x = torch.randn(8, 3)
    layout = program_call.layout((x,))
    assert program_call.layout((torch.randn(8, 3),)) == layout
    changed = {"shape": program_call.layout((torch.randn(9, 3),)), "dtype": program_call.layout((x.double(),)),
               "strides": program_call.layout((torch.randn(3, 8).t(),))}
    with torch.no_grad():
        changed["grad mode"] = program_call.layout((x,))
    program.parts.critic.double()
    changed["a converted module"] = program_call.layout((x,))
    program.parts.critic.float()
    assert program_call.layout((x,)) == layout
    last_layer = [m for m in program.parts.critic.modules() if isinstance(m, nn.Linear)][-1]
    last_layer.double()
    changed["a converted submodule"] = program_call.layout((x,))
    last_layer.float()
    program.parts.critic.eval()
    changed["a module in eval mode"] = program_call.layout((x,))
    program.parts.critic.train()
    assert program_call.layout((x,)) == layout
    program.groups["actor"][2]["lr"] = 1e-4
    changed["a learning rate"] = program_call.layout((x,))
    assert {name for name, other in changed.items() if other != layout} == set(changed)


class Scale:
    """A program in miniature: updates a module's weight in place and returns a dict."""

    def __init__(self) -> None:
        self.layer = nn.Linear(3, 2, bias=False)

    def step(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            self.layer.weight.mul_(0.5)
        return {"y": self.layer(x)}


def test_a_compiled_program_still_recompiles_for_other_tensors() -> None:
    """Inputs of another shape, and parameters of another dtype, get their own graph (the same results as
    eagerly), not the first graph run on them: on a CPU, AheadOfTime's layout compiles anew."""
    torch._dynamo.reset()
    compiled, eager = Scale(), Scale()
    eager.layer.load_state_dict(compiled.layer.state_dict())
    program = compile_program(compiled.step, cuda=False, modules=compiled.layer)
    assert isinstance(program, AheadOfTime)
    for x in (torch.randn(4, 3), torch.randn(4, 3), torch.randn(7, 3)):
        torch.testing.assert_close(program(x)["y"], eager.step(x)["y"])
    assert len(program.artifacts) == 2
    compiled.layer.double(), eager.layer.double()
    x = torch.randn(4, 3, dtype=torch.float64)
    out = program(x)["y"]
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, eager.step(x)["y"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(compiled.layer.weight, eager.layer.weight, rtol=1e-12, atol=1e-12)
    assert len(program.artifacts) == 3



def test_ahead_of_time_refuses_a_layout_beyond_its_limit(monkeypatch) -> None:
    """A program that would compile anew on every few calls (e.g. a scheduled learning rate) stops with a clear
    error after MAX_LAYOUTS layouts instead of compiling forever."""
    monkeypatch.setattr(program_module, "compile_ahead_of_time", lambda compiled, args: lambda owner, *a: {})
    scale = Scale()
    program = compile_program(scale.step, cuda=False, modules=scale.layer)
    for rows in range(1, program_module.MAX_LAYOUTS + 1):
        program(torch.randn(rows, 3))
    program(torch.randn(1, 3))  # a layout seen before: no new compilation
    with pytest.raises(BadInputError, match=r"compiled for 8 layouts.*model.update.compile none"):
        program(torch.randn(program_module.MAX_LAYOUTS + 1, 3))


class BreaksTheGraph(nn.Module):
    """An actor whose ``act`` branches on a tensor's value: no single graph."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 1)

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        return self.layer(obs) if obs.sum() > 0 else -self.layer(obs)


def test_acting_on_a_cpu_is_compiled_ahead_of_time_and_acts_as_eagerly() -> None:
    """compile_act on a CPU: the actor's own ``act`` for "none", else compiled ahead of time, drawing its noise from
    the eager generator (the same actions as eagerly for a seed, also after the parameters changed in place), one
    artifact per layout; an ``act`` that does not trace into one graph warns once and acts through torch.compile,
    and any other error in it is raised as it is."""
    torch.manual_seed(0)
    actor = DiffusionActor(3, 1, num_steps=2, hidden_dim=8, time_features=8, time_hidden_dim=8)
    assert compile_acting(actor.act, "none", "cpu") == actor.act
    act = compile_acting(actor.act, "default", "cpu")
    assert isinstance(act, AheadOfTime)

    def same_as_eager(obs: torch.Tensor) -> None:
        torch.manual_seed(1)
        expected = actor.act(obs)
        torch.manual_seed(1)
        with torch.no_grad():
            torch.testing.assert_close(act(obs), expected, rtol=1e-5, atol=1e-6)

    for obs in (torch.randn(3), torch.randn(5, 3), torch.randn(3)):
        same_as_eager(obs)
    with torch.no_grad():  # as an update does: in place, read by the next call
        actor.control_net.head.bias.add_(0.5)
    same_as_eager(obs)
    assert len(act.artifacts) == 2 and not act.fallen_back  # batch 1 and batch 5
    breaks = BreaksTheGraph()
    act = compile_acting(breaks.act, "default", "cpu")
    obs = torch.randn(3)
    with pytest.warns(RuntimeWarning, match="model.compile_act: no single graph to compile ahead of time"):
        acted = act(obs)
    torch.testing.assert_close(acted, breaks.act(obs))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        torch.testing.assert_close(act(-obs), breaks.act(-obs))  # both branches
    assert act.fallen_back and not act.artifacts
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match=r"reduction dim|cannot be multiplied"):
        warnings.simplefilter("error")  # not a graph break: raised as it is, with no fall-back
        compile_acting(actor.act, "default", "cpu")(torch.randn(4))


def test_acting_elsewhere_goes_through_torch_compile(monkeypatch) -> None:
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: seen.append((fn, kwargs)) or fn)
    actor = DiffusionActor(3, 1, num_steps=1, hidden_dim=8, time_features=8, time_hidden_dim=8)
    compile_acting(actor.act, "reduce-overhead", "cuda")
    assert seen == [(actor.act, {"mode": "reduce-overhead"})]
