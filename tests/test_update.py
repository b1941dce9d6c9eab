"""The framework-free env-step update (update.py): eager vs "whole", host syncs, graph breaks, deferred checks."""

from __future__ import annotations

import copy
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from tensordict import TensorDict
from torch.utils._python_dispatch import TorchDispatchMode

import dime_lightning.program as program_module
import dime_lightning.update as update_module
from dime_lightning.actor import DiffusionActor
from dime_lightning.critic import DistributionalCritic
from dime_lightning.errors import NonFiniteError
from dime_lightning.safe_checkpoint import safe_load
from dime_lightning.temperature import Temperature
from dime_lightning.update import DIMEUpdater, make_target_actor
from dime_lightning.update_settings import UpdateSettings

OBS, ACT, B = 5, 2, 16


def tiny_modules(brn_warmup_steps: int = 5) -> tuple[DiffusionActor, DistributionalCritic, Temperature]:
    """Float64 modules small enough to compile in seconds; the batch-renorm warm-up ends inside 6 env steps."""
    torch.manual_seed(0)
    actor = DiffusionActor(OBS, ACT, num_steps=4, hidden_dim=16, time_features=8, time_hidden_dim=16)
    critic = DistributionalCritic(OBS, ACT, hidden_dims=(32, 32), num_atoms=11, v_min=-10.0, v_max=10.0,
                                  brn_warmup_steps=brn_warmup_steps)
    return actor.double(), critic.double(), Temperature(ACT).double()


def transitions(rows: int = B, reward: float | None = None) -> TensorDict:
    return TensorDict({
        "observation": torch.randn(rows, OBS), "action": torch.rand(rows, ACT) * 2 - 1,
        ("next", "observation"): torch.randn(rows, OBS),
        ("next", "reward"): torch.randn(rows, 1) if reward is None else torch.full((rows, 1), reward),
        ("next", "terminated"): torch.rand(rows, 1) < 0.1,
    }, batch_size=[rows]).apply(lambda t: t.double() if t.is_floating_point() else t)


def samples(env_steps: int, seed: int = 3) -> list[TensorDict]:
    torch.manual_seed(seed)
    return [torch.stack([transitions(), transitions()]) for _ in range(env_steps)]  # (utd, B) each


def run(mode: str, modules, data: list[TensorDict], **kwargs) -> tuple[DIMEUpdater, list[TensorDict]]:
    updater = DIMEUpdater(*modules, settings=UpdateSettings(compile=mode, **kwargs))
    updater.build_optimizers()
    torch.manual_seed(1)  # the same diffusion noise in both runs
    return updater, [updater(sample, diagnostics=True) for sample in data]


def state(modules) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v.detach().clone() for i, m in enumerate(modules) for k, v in m.state_dict().items()}


@pytest.fixture
def no_compile(monkeypatch):
    """Run "whole" mode's env-step body uncompiled: its logic (deferred checks, static schedule) under test."""
    monkeypatch.setattr(update_module, "compile_program", lambda method, *args: method)


def test_schedule_phases_and_counters() -> None:
    updater, _ = run("none", tiny_modules(), [])
    assert [updater.phase() for _ in range(1)] == [(False, False)]
    phases = []
    for sample in samples(6):
        phases.append(updater.phase())
        updater(sample)
    # utd 2, delay 3: the phase pattern repeats every 3 env steps (so "whole" compiles 3 variants)
    assert phases == [(False, False), (True, False), (False, True)] * 2
    assert updater.counters() == {"critic_updates": 12, "actor_updates": 4, "skipped_updates": 0}


@pytest.mark.parametrize("mode", ["none", "whole"])
def test_both_q_means_reach_the_env_steps_metrics(no_compile, mode) -> None:
    """The critic's Q of replayed actions and the actor's Q of fresh ones: both in an actor-due env step's metrics,
    neither overwriting the other (they share no name)."""
    updater, out = run(mode, tiny_modules(), samples(2))
    assert updater.counters()["actor_updates"] == 1  # env step 2 ran an actor update
    metrics = out[1]
    assert {"q_mean", "policy_q_mean", "target_q_mean", "loss_critic", "loss_actor", "loss_alpha"} <= set(
        metrics.keys())
    assert not torch.equal(metrics["q_mean"], metrics["policy_q_mean"])
    assert "policy_q_mean" not in out[0].keys()  # no actor update in env step 1


@pytest.fixture
def eager_random_in_graphs():
    """Compiled graphs draw from the eager RNG stream (inductor's fallback_random), set through the config's own
    patch(): pytest's monkeypatch cannot restore torch's config modules (the option vanishes after undo)."""
    with torch._inductor.config.patch(fallback_random=True):
        yield


@pytest.mark.parametrize("mode", ["whole", "default"])
def test_compiled_update_matches_eager_over_a_schedule_cycle(eager_random_in_graphs, mode) -> None:
    """6 env steps (two schedule cycles, 4 actor updates, past the batch-renorm warm-up), same seed and noise:
    the whole step, and the compiled losses (which read mutated batch-renorm statistics in their backward
    before critic.BatchRenorm deferred them)."""
    data = samples(6)
    eager_modules, whole_modules = tiny_modules(), tiny_modules()
    eager, eager_out = run("none", eager_modules, data)
    whole, whole_out = run(mode, whole_modules, data)
    assert eager.counters() == whole.counters() == {"critic_updates": 12, "actor_updates": 4, "skipped_updates": 0}
    for key in ("loss_critic", "q_mean", "critic_entropy"):  # the first update's losses
        torch.testing.assert_close(whole_out[0][key], eager_out[0][key], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(whole_out[1]["loss_actor"], eager_out[1]["loss_actor"], rtol=1e-12, atol=1e-12)
    assert sorted(whole_out[-1].keys()) == sorted(eager_out[-1].keys())
    expected, got = state(eager_modules), state(whole_modules)
    assert expected.keys() == got.keys()
    for key, value in expected.items():  # actor, critic (incl. batch-renorm statistics) and log α
        torch.testing.assert_close(got[key], value, rtol=1e-9, atol=1e-10, msg=key)
    assert not torch.equal(expected["2.log_alpha"], state(tiny_modules())["2.log_alpha"])  # something did move


class HostSyncCounter(TorchDispatchMode):
    """Counts the aten ops that read a tensor's value back to the host."""

    SYNCS = frozenset({"aten::_local_scalar_dense", "aten::is_nonzero", "aten::item", "aten::equal"})

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.SYNCS:
            self.seen.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def test_whole_step_reads_nothing_back_to_the_host(no_compile) -> None:
    data = samples(4)
    whole, _ = run("whole", tiny_modules(), data[:1])  # optimizer state exists: steady-state steps are counted
    with HostSyncCounter() as counter:
        for sample in data[1:]:  # phases (T, F), (F, T), (F, F): critic, actor and temperature updates
            whole(sample)
    assert whole.counters()["actor_updates"] == 2
    assert counter.seen == []
    eager, _ = run("none", tiny_modules(), data[:1])  # the counter sees the eager check's syncs
    with HostSyncCounter() as counter:
        eager(data[1])
    assert len(counter.seen) >= 3


@pytest.mark.parametrize("update", ["critic_step", "actor_step"])
def test_whole_mode_programs_are_one_graph_each(update) -> None:
    """The critic program and the actor (+ temperature + target) program each trace into exactly one graph with
    no break (Dynamo's explain: tracing only; "whole" compiles them with fullgraph=True as well)."""
    torch._dynamo.reset()  # explain reports what it traces: code compiled by earlier tests would be skipped
    actor, critic, temperature = tiny_modules()
    updater = DIMEUpdater(actor, critic, temperature, make_target_actor(actor, 0.5),
                          settings=UpdateSettings(compile="whole", policy_tau=0.5))
    updater.build_optimizers()
    minibatch = transitions()
    args = [minibatch.get(key) for key in program_module.MINIBATCH_KEYS] if update == "critic_step" else [
        minibatch["observation"]]
    explained = torch._dynamo.explain(getattr(updater.program(), update))(*args)
    assert [reason.reason for reason in explained.break_reasons] == []
    assert explained.graph_count == 1


def test_deferred_nonfinite_check_stops_naming_the_losses_and_range(no_compile) -> None:
    whole, _ = run("whole", tiny_modules(), samples(1))
    bad = torch.stack([transitions(reward=float("nan")), transitions()])
    whole(bad)  # no sync, no raise inside the step; with "stop" the NaN spreads to the next updates
    with pytest.raises(NonFiniteError, match=r"loss_critic \(2×\), loss_actor \(1×\) between env steps 2 and 2"):
        whole.check_nonfinite("between env steps 2 and 2")
    good, _ = run("whole", tiny_modules(), samples(3))
    good.check_nonfinite("never")  # finite losses: nothing raised


def test_deferred_nonfinite_skip_undoes_the_step_in_place(no_compile) -> None:
    modules = tiny_modules()
    whole, _ = run("whole", modules, samples(1), nonfinite="skip")
    critic_before = {k: v.clone() for k, v in modules[1].named_parameters()}
    statistics_before = {k: v.clone() for k, v in modules[1].state_dict().items() if "running" in k}
    actor_before = {k: v.clone() for k, v in modules[0].named_parameters()}
    optimizer_before = copy.deepcopy(whole.critic_opt.state_dict()["state"])
    nan = float("nan")
    assert whole.phase() == (True, False)  # critic update, actor + temperature update, critic update
    whole(torch.stack([transitions(reward=nan), transitions(reward=nan)]))
    for name, value in modules[1].named_parameters():  # both critic steps (NaN targets) were undone ...
        assert torch.equal(value, critic_before[name]), name
    for name, value in statistics_before.items():  # ... and kept their batch-renorm statistics
        assert torch.equal(modules[1].state_dict()[name], value), name
    for index, entry in optimizer_before.items():  # ... with the optimizer's moments and step counts
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(whole.critic_opt.state_dict()["state"][index][key], entry[key]), key
    assert any(not torch.equal(v, actor_before[k]) for k, v in modules[0].named_parameters())  # a finite step ran
    assert whole.skipped_updates == 0  # counted on the device until the check
    whole.check_nonfinite("now")
    assert whole.skipped_updates == 2
    assert whole.counters()["critic_updates"] == 4  # skipped steps still count: the schedule is static


def test_whole_mode_fit_is_killed_and_resumes_with_the_counters_of_an_uninterrupted_run(tmp_path) -> None:
    """The real CLI in "whole" mode: trains, checkpoints, is SIGKILLed after its first checkpoint and resumes."""
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "dime_lightning.fit", "--config", str(root / "conf" / "pendulum.yaml"),
               "--config", str(root / "conf" / "smoke.yaml"), "--model.update.compile", "whole",
               "--data.total_env_steps", "450", "--mlflow.tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
               "--trainer.enable_progress_bar", "false", "--checkpoint.dirpath", str(tmp_path / "ckpt")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "first.log", "w") as log:
        process = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env)
    last = tmp_path / "ckpt" / "last.ckpt"
    deadline = time.monotonic() + 600
    while not last.exists():
        assert process.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 600 s"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    result = subprocess.run([*command, "--ckpt_path", "last"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    counters = safe_load(tmp_path / "ckpt" / "final.ckpt")["dime_counters"]
    assert counters == {"env_steps": 450, "critic_updates": 2 * (450 - 100), "actor_updates": 2 * (450 - 100) // 3,
                        "skipped_updates": 0}
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1 and runs.iloc[0].status == "FINISHED"
    history = mlflow.MlflowClient().get_metric_history(runs.iloc[0].run_id, "train/loss_critic")
    steps = [m.step for m in history]
    assert steps == sorted(set(steps)) and steps[-1] > 300 and all(math.isfinite(m.value) for m in history)



def test_a_checkpoint_of_another_mode_resumes_in_whole_mode(no_compile) -> None:
    """An eager run's optimizer state (step counts on the CPU, unfused) is the program's own: after
    align_loaded_optimizers its counts go on and the step reads nothing back to the host."""
    data = samples(3)
    eager, _ = run("none", tiny_modules(), data[:2])
    saved = [copy.deepcopy(optimizer.state_dict()) for optimizer in eager.optimizers]
    whole = DIMEUpdater(*tiny_modules(), settings=UpdateSettings(compile="whole"))
    for optimizer, state_dict in zip(whole.build_optimizers(), saved, strict=True):
        optimizer.load_state_dict(state_dict)
    whole.critic_updates, whole.actor_updates = eager.critic_updates, eager.actor_updates
    whole.align_loaded_optimizers()
    with HostSyncCounter() as counter:
        whole(data[2])  # phase (False, True): two critic updates, one actor update
    assert counter.seen == []
    steps = [[state["step"].item() for state in optimizer.state.values()] for optimizer in whole.optimizers]
    assert steps == [[6.0] * len(steps[0]), [2.0] * len(steps[1]), [2.0]]  # 4 + 2 critic, 1 + 1 actor and α


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.int64])
def test_assign_writes_0d_inputs_of_a_compiled_graph(dtype) -> None:
    """program.assign_ lands in 0-d inputs of every dtype (torch 2.13 drops a plain copy_ into a 0-d float64 one)."""
    target = torch.zeros((), dtype=dtype)
    write = torch.compile(program_module.assign_, fullgraph=True, backend="aot_eager")
    write(target, torch.tensor(2, dtype=dtype))
    write(target, torch.tensor(3, dtype=dtype))
    assert target.item() == 3


def test_start_up_self_check_agrees_leaves_no_trace_and_falls_back_on_a_mismatch(no_compile, monkeypatch) -> None:
    """The self-check (self_check.py) of the "compiled" programs (uncompiled here: what compiling changes is
    test_compiled_update_matches_eager's) against the same programs run eagerly, as a CUDA start-up runs it: agreement
    and an untouched state, though both runs drew noise; then a mismatch injected into the compiled critic program
    makes the next env step warn, name it and update eagerly from then on."""
    data = samples(3)
    modules = tiny_modules()
    updater, _ = run("whole", modules, data[:1])  # past the first env step: optimizer state exists
    before = state(modules)
    assert updater.self_check(data[1]) is None
    assert updater.counters() == {"critic_updates": 2, "actor_updates": 0, "skipped_updates": 0}
    for key, value in state(modules).items():
        assert torch.equal(value, before[key]), key

    compile_programs = updater._compile

    def compile_with_a_stale_write(sample: TensorDict) -> None:  # e.g. a replay that writes one tensor wrong
        compile_programs(sample)  # on the CPU: not captured
        compiled_critic = updater._compiled["critic"]

        def critic_update(*tensors: torch.Tensor) -> dict[str, torch.Tensor]:
            out = compiled_critic(*tensors)
            with torch.no_grad():
                next(modules[1].parameters()).add_(0.5)
            return out

        updater._compiled["critic"] = critic_update
        updater._captured = True  # as on CUDA: the check runs before the first step

    monkeypatch.setattr(updater, "_compile", compile_with_a_stale_write)
    updater._compiled.clear()  # compiled again at the next env step (Dynamo's cache holds the graphs)
    with pytest.warns(RuntimeWarning, match=r"self-check \(.* differs by .*\); this run updates eagerly"):
        updater(data[1])
    assert updater.mode == "none" and not updater._compiled
    assert updater.counters() == {"critic_updates": 4, "actor_updates": 1, "skipped_updates": 0}
    assert all(step.device.type == "cpu" for opt in updater.optimizers for s in opt.state.values()
               for step in [s["step"]])  # where eager Adam keeps its step counts
    updater(data[2])  # eager from here
    assert updater.counters()["critic_updates"] == 6


def test_self_check_comparison_names_the_worst_tensor() -> None:
    from dime_lightning.self_check import mismatch, relative_error

    nan, inf = float("nan"), float("inf")
    assert relative_error(torch.tensor([1.0, nan]), torch.tensor([1.0, nan])) == 0.0  # NaN in both agrees
    assert relative_error(torch.tensor([1.0, inf]), torch.tensor([1.0, 2.0])) == 1.0
    assert relative_error(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0 + 1e-6])) < 1e-6
    message = mismatch({"a": torch.ones(3), "b": torch.zeros(3)}, {"a": torch.ones(3), "b": torch.ones(3)})
    assert message is not None and message.startswith("b differs by 1 ")
    assert mismatch({"a": torch.ones(3)}, {"a": torch.ones(3) * (1 + 1e-4)}) is None
