"""Throughput benchmarks: what the software costs around the algorithm (ratios, measured in one run).

    python benchmarks/throughput.py                       # all, results to benchmarks/results/throughput.json
    python benchmarks/throughput.py --only overhead --steps 300
    python benchmarks/throughput.py --tiny                # seconds; used by the tests

- ``overhead``: env steps/s of the real fit loop (CLI → Lightning → collector → buffer → update → MLflow;
  evaluation and checkpoints off) divided by a bare loop that calls the trainer's own update object
  (``dime_lightning.update.DIMEUpdater``) on copies of the same modules with same-shaped batches drawn from a
  pre-filled buffer. Both on Pendulum-v1 at conf/pendulum.yaml sizes, timed over the same number of learning
  steps.
- ``update``: ms of updates per env step (2 critic updates + 2/3 actor and temperature update) for the
  diffusion and the Gaussian actor, at CPU size (critic 256) and paper size (critic 2048), Ant-v5 shapes.
- ``act``: ms per action at batch 1 and actions/s at batch 256, diffusion (16 steps) and Gaussian.
- ``memory``: peak RSS of a process holding a full 1M-transition replay ring at Ant-v5 and Humanoid-v5 shapes,
  ``memory`` (RAM) vs ``memmap`` (files; its size on disk reported too).
- ``framework``: the framework's cost per env step, part by part (collector, buffer write, sample, logging,
  callbacks, Lightning), in the real fit loop at the dispatch size, in the warm-up and the learning phase, with
  the progress bar off and on (``framework_parts.py``).
- ``dispatch``: the launch-bound regime, on a CPU: the real fit loop at tiny sizes (1 diffusion step, width 8,
  batch 8), where a learning step costs almost only per-op dispatch; env steps/s in the random warm-up and in
  the learning phase, per compile mode (``--compile none whole``).
- ``speed`` (``--device cuda`` for the GPU numbers; runs on CPU too): per size (``--sizes``: Ant-v5 shapes at
  CPU size and paper size; ``dispatch``: the JAX anchor's tiny size, Pendulum shapes, widths 8, batch 8, one
  diffusion step) and per compile mode (``--compile none default reduce-overhead whole``): ms of updates per
  env step (2 critic updates, 2/3 of an actor + temperature update), per critic update and per actor +
  temperature update (not for "whole", which compiles the env step, not its parts), per action at batch 1
  and 256, and per learning step (the updates and one action at batch 1 fetched to the host), timed with
  device synchronisation; also the seconds of the first 3 env steps (compilation included) and the number of
  graphs Dynamo compiled for them (for "whole": one per schedule variant, 3 at utd 2 / delay 3).

    python benchmarks/throughput.py --only speed --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from tensordict import TensorDict

from dime_lightning import host_memory
from dime_lightning.actor import DiffusionActor
from dime_lightning.critic import DistributionalCritic
from dime_lightning.gaussian import TanhGaussianActor
from dime_lightning.host_memory import HOST_MEMORY
from dime_lightning.program import compile_acting
from dime_lightning.replay import ReplayRing, transition_layout
from dime_lightning.temperature import Temperature
from dime_lightning.update import DIMEUpdater
from dime_lightning.update_settings import UpdateSettings

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"Ant-v5": (105, 8), "Humanoid-v5": (348, 17), "Pendulum-v1": (3, 1)}
# speed sizes: env shapes, critic width, actor width (and time features), batch, diffusion steps
SPEED_SIZES = {"cpu": ("cpu_size_critic256", "Ant-v5", 256, 256, 256, 16),
               "paper": ("paper_size_critic2048", "Ant-v5", 2048, 256, 256, 16),
               "dispatch": ("dispatch_size_width8", "Pendulum-v1", 8, 8, 8, 1)}


def random_batch(obs_dim: int, action_dim: int, batch: int) -> TensorDict:
    return TensorDict({
        "observation": torch.randn(batch, obs_dim), "action": torch.rand(batch, action_dim) * 2 - 1,
        ("next", "observation"): torch.randn(batch, obs_dim), ("next", "reward"): torch.randn(batch, 1),
        ("next", "terminated"): torch.zeros(batch, 1, dtype=torch.bool),
    }, batch_size=[batch])


def updater(actor, critic, temperature, mode: str = "none", fused: bool = False) -> DIMEUpdater:
    """The trainer's own update object (update.py) with the paper's settings; no host sync (check_finite off,
    as for captured updates, except in "whole" mode whose check is deferred)."""
    settings = UpdateSettings(compile=mode, check_finite=mode == "whole")
    update = DIMEUpdater(actor, critic, temperature, settings=settings)
    update.build_optimizers(fused=fused)
    return update


def update_ms(actor, critic, obs_dim: int, action_dim: int, steps: int, batch: int = 256) -> float:
    update = updater(actor, critic, Temperature(action_dim))
    sample = torch.stack([random_batch(obs_dim, action_dim, batch) for _ in range(2)])  # (utd, B)
    update(sample)  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        update(sample)
    return (time.perf_counter() - start) / steps * 1e3


class PhaseTimer(Callback):
    """Env steps/s of the fit loop in the random warm-up and in the learning phase; the first ``skip`` learning
    steps (compilation, CUDA-graph capture) are left out."""

    def __init__(self, learning_starts: int, skip: int = 1) -> None:
        self.learning_starts, self.skip, self.marks = learning_starts, skip, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        steps, now = pl_module.env_steps, time.perf_counter()
        for name, at in [("warmup_start", 1), ("warmup_end", self.learning_starts),
                         ("learning_start", self.learning_starts + self.skip)]:
            if steps == at:
                self.marks[name] = (steps, now)
        self.marks["learning_end"] = (steps, now)

    def rate(self, phase: str) -> float:
        (s0, t0), (s1, t1) = self.marks[f"{phase}_start"], self.marks[f"{phase}_end"]
        return (s1 - s0) / (t1 - t0)


TINY_NETWORKS = ["--model.actor.init_args.num_steps", "1", "--model.actor.init_args.hidden_dim", "8",
                 "--model.actor.init_args.time_features", "8", "--model.actor.init_args.time_hidden_dim", "8",
                 "--model.critic.init_args.hidden_dims", "[8, 8]", "--data.batch_size", "8"]


def fit_loop(steps: int, workdir: Path, tiny: bool, extra: list[str] = (), skip: int = 1,
             learning_starts: int = 300, callbacks: list[Callback] = ()) -> tuple[PhaseTimer, object]:
    """The real fit loop on Pendulum (evaluation, checkpoints and artifacts off) with a ``PhaseTimer``."""
    from dime_lightning.fit import build_cli

    configs = ["--config", str(ROOT / "conf" / "pendulum.yaml")] + (
        ["--config", str(ROOT / "conf" / "smoke.yaml")] if tiny else [])
    total = learning_starts + skip + steps
    cli = build_cli([*configs, "--data.learning_starts", str(learning_starts),
                     "--data.total_env_steps", str(total), "--eval.every_env_steps", "10000000",
                     "--checkpoint.every_env_steps", "10000000", "--checkpoint.save_buffer", "false",
                     "--checkpoint.log_artifacts", "false", "--checkpoint.dirpath", str(workdir / "ckpt"),
                     "--mlflow.tracking_uri", f"sqlite:///{workdir / 'mlflow.db'}",
                     "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *extra])
    timer = PhaseTimer(learning_starts, skip)
    cli.trainer.callbacks.extend([timer, *callbacks])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return timer, cli


def fit_loop_steps_per_second(steps: int, workdir: Path, tiny: bool) -> tuple[float, object]:
    timer, cli = fit_loop(steps, workdir, tiny)
    return timer.rate("learning"), cli


def dispatch(modes: list[str], steps: int, workdir: Path) -> dict[str, dict[str, float]]:
    """The launch-bound regime on a CPU: the fit loop at tiny sizes (1 diffusion step, width 8, batch 8), where
    almost all of a learning step's cost is per-op dispatch; warm-up vs learning env steps/s per compile mode."""
    results = {}
    for mode in modes:
        (workdir / mode).mkdir(parents=True, exist_ok=True)
        timer, _ = fit_loop(steps, workdir / mode, False, [*TINY_NETWORKS, "--model.update.compile", mode], skip=4)
        warmup, learning = timer.rate("warmup"), timer.rate("learning")
        results[mode] = {"warmup_env_steps_per_s": warmup, "learning_env_steps_per_s": learning,
                         "update_ms_per_env_step": 1e3 / learning - 1e3 / warmup}
        print("dispatch", mode, json.dumps(results[mode]), flush=True)
    return results


def bare_loop_steps_per_second(cli, steps: int) -> float:
    """Same module classes and sizes as the fit loop (fresh copies), batches from a filled replay ring."""
    import copy

    model, data = cli.model, cli.datamodule
    obs_dim, action_dim, batch = data.obs_dim, data.action_dim, data.hparams.batch_size
    buffer = ReplayRing(10_000, transition_layout(obs_dim, action_dim))
    for row in random_batch(obs_dim, action_dim, 10_000).unbind(0):
        buffer.add(row)
    update = updater(copy.deepcopy(model.actor), copy.deepcopy(model.critic), copy.deepcopy(model.temperature))
    update(buffer.sample(2, batch))
    start = time.perf_counter()
    for _ in range(steps):
        update(buffer.sample(2, batch))  # (utd, B)
    return steps / (time.perf_counter() - start)


def acting(actor, obs_dim: int, repeats: int) -> dict[str, float]:
    one, many = torch.randn(obs_dim), torch.randn(256, obs_dim)
    actor.act(one)
    start = time.perf_counter()
    for _ in range(repeats):
        actor.act(one)
    batch1_ms = (time.perf_counter() - start) / repeats * 1e3
    start = time.perf_counter()
    for _ in range(max(repeats // 10, 1)):
        actor.act(many)
    return {"ms_per_action_batch1": batch1_ms,
            "actions_per_second_batch256": 256 * max(repeats // 10, 1) / (time.perf_counter() - start)}


def _timed_ms(fn, repeats: int, device: torch.device) -> float:
    """ms per call of ``fn``: on CUDA the mean over ``repeats`` back-to-back calls (one synchronisation at the
    end, so launches overlap as in training); on a CPU the median of ``repeats`` calls timed one by one, which
    a burst of load on a shared machine does not move."""
    for _ in range(3):  # compile, CUDA-graph recording and warm-up
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeats * 1e3
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def speed(device: torch.device, mode: str, width: int, hidden: int, repeats: int, batch: int = 256,
          env: str = "Ant-v5", diffusion_steps: int = 16) -> dict:
    """ms per update / action / learning step at ``env``'s shapes for one compile mode (the module's update code:
    the same loss functions, fused Adam on CUDA, no host sync: check_finite off as for captured updates)."""
    obs_dim, action_dim = SHAPES[env]
    torch.manual_seed(0)
    actor = DiffusionActor(obs_dim, action_dim, num_steps=diffusion_steps, hidden_dim=hidden, time_features=hidden,
                           time_hidden_dim=hidden).to(device)
    critic = DistributionalCritic(obs_dim, action_dim, hidden_dims=(width, width)).to(device)
    update = updater(actor, critic, Temperature(action_dim).to(device), mode, fused=device.type == "cuda")
    sample = random_batch(obs_dim, action_dim, batch).to(device)
    # acting beside "whole": compiled, and replayed as a CUDA graph on a GPU (model.compile_act)
    act_mode = ("reduce-overhead" if device.type == "cuda" else "default") if mode == "whole" else mode
    act1, act256 = (compile_acting(actor.act, act_mode, device.type) for _ in range(2))  # one per batch size
    obs1, obs256 = torch.randn(obs_dim, device=device), torch.randn(batch, obs_dim, device=device)
    samples = torch.stack([sample, sample])  # (utd, B)

    def updates() -> None:  # 3 env steps of the reference schedule: 6 critic and 2 actor updates
        for _ in range(3):
            update(samples)

    def learning_steps() -> None:  # the same with one action at batch 1 per env step, fetched to the host
        for _ in range(3):
            update(samples)
            act1(obs1).cpu()

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # process-wide: cleared so that the graph count is this mode's
    start = time.perf_counter()
    updates()  # the first 3 env steps: every schedule variant compiled (and captured on CUDA)
    if device.type == "cuda":
        torch.cuda.synchronize()
    first = {"first_3_env_steps_s": time.perf_counter() - start,
             "update_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"]}
    result = {"updates_per_env_step_ms": _timed_ms(updates, max(repeats // 3, 1), device) / 3,
              "act_batch1_ms": _timed_ms(lambda: act1(obs1), repeats, device),
              "act_batch256_ms": _timed_ms(lambda: act256(obs256), repeats, device),
              "learning_step_ms": _timed_ms(learning_steps, max(repeats // 3, 1), device) / 3}
    if mode != "whole":  # "whole" compiles the env step, not its parts
        result["critic_update_ms"] = _timed_ms(lambda: update.critic_update(sample), repeats, device)
        result["actor_temperature_update_ms"] = _timed_ms(lambda: update.actor_update(sample), repeats, device)
    result["env_steps_per_s_update_bound"] = 1e3 / result["learning_step_ms"]
    return {**result, **first}


MEMORY_CHILD = """
import sys, tempfile, torch
from pathlib import Path
from dime_lightning.replay import ReplayRing, transition_layout
obs, act, size, kind = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
scratch = tempfile.mkdtemp()
buffer = ReplayRing(size, transition_layout(obs, act), kind, scratch=Path(scratch))
chunk = 50_000
for i in range(0, size, chunk):  # the rows filled in chunks (as a full buffer holds them), then one sample
    n = min(chunk, size - i)
    for key, leaf in buffer.leaves.items():
        values = torch.randn(n, *leaf.shape[1:])
        leaf[i:i + n] = values > 0 if leaf.dtype == torch.bool else values
buffer.written = size
buffer.sample(256)
import subprocess
disk = subprocess.run(["du", "-sm", scratch], capture_output=True, text=True).stdout.split()[0]
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(hwm / 1024, disk, flush=True)  # VmHWM: this process image only (ru_maxrss would include the parent's)
"""


def memory(size: int) -> dict[str, dict[str, float]]:
    """Peak RSS of a child process per (shape, storage); ``baseline`` is the same process with a 1-entry buffer."""
    results = {}
    for env_id, (obs_dim, action_dim) in {"baseline": (1, 1), **SHAPES}.items():
        for kind in ("memory",) if env_id == "baseline" else ("memory", "memmap"):
            size_here = 1 if env_id == "baseline" else size
            command = [sys.executable, "-c", MEMORY_CHILD, str(obs_dim), str(action_dim), str(size_here), kind]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()
            out = out.splitlines()[-1].split()
            results[f"{env_id}/{kind}"] = {"peak_rss_mb": float(out[0]), "disk_mb": float(out[1])}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sections = ["overhead", "update", "act", "memory", "speed", "dispatch", "framework"]
    parser.add_argument("--only", nargs="+", choices=sections, default=sections)
    parser.add_argument("--sizes", nargs="+", choices=list(SPEED_SIZES), default=["cpu", "paper"],
                        help="configs of the speed section: CPU size (critic 256) and paper size (critic 2048)")
    parser.add_argument("--device", default="cpu", help="device of the speed section (cpu, cuda)")
    parser.add_argument("--compile", nargs="+", default=None, choices=["none", "default", "reduce-overhead", "whole"],
                        help="compile modes of the speed and dispatch sections (default: none on CPU for speed, "
                             "none and whole for dispatch; all four on CUDA)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per figure of the speed section (default: 30 on CUDA, 5 on CPU)")
    parser.add_argument("--steps", type=int, default=300, help="learning steps timed in each overhead loop")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes and counts: checks the script only")
    parser.add_argument("--host-memory", choices=HOST_MEMORY, default="keep",
                        help="the fit's host_memory setting, applied to this process as a fit applies it")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "throughput.json")
    args = parser.parse_args(argv)
    steps = 5 if args.tiny else args.steps
    results = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
               "date": time.strftime("%Y-%m-%d"), "tiny": args.tiny, "host_memory": args.host_memory,
               "host_memory_changed": host_memory.apply(args.host_memory)}
    if "overhead" in args.only:
        with tempfile.TemporaryDirectory() as workdir:
            fit_sps, cli = fit_loop_steps_per_second(steps, Path(workdir), args.tiny)
            bare_sps = bare_loop_steps_per_second(cli, steps)
        results["overhead"] = {"fit_loop_env_steps_per_s": fit_sps, "bare_loop_env_steps_per_s": bare_sps,
                               "ratio": fit_sps / bare_sps, "steps": steps}
        print("overhead", json.dumps(results["overhead"]))
    obs_dim, action_dim = SHAPES["Ant-v5"]
    if "update" in args.only:
        widths = {"cpu_size_critic256": 32 if args.tiny else 256, "paper_size_critic2048": 64 if args.tiny else 2048}
        hidden = 16 if args.tiny else 256
        results["update"] = {}
        for name, width in widths.items():
            critic = DistributionalCritic(obs_dim, action_dim, hidden_dims=(width, width))
            n = 2 if args.tiny else (20 if width <= 256 else 5)
            dime = update_ms(DiffusionActor(obs_dim, action_dim, hidden_dim=hidden), critic, obs_dim, action_dim, n)
            critic = DistributionalCritic(obs_dim, action_dim, hidden_dims=(width, width))
            gauss = update_ms(TanhGaussianActor(obs_dim, action_dim, hidden_dim=hidden), critic, obs_dim, action_dim, n)
            results["update"][name] = {"dime_ms_per_env_step": dime, "gaussian_ms_per_env_step": gauss,
                                       "dime_over_gaussian": dime / gauss}
            print("update", name, json.dumps(results["update"][name]))
    if "act" in args.only:
        repeats = 5 if args.tiny else 200
        results["act"] = {"DIME": acting(DiffusionActor(obs_dim, action_dim), obs_dim, repeats),
                          "Gaussian": acting(TanhGaussianActor(obs_dim, action_dim), obs_dim, repeats)}
        print("act", json.dumps(results["act"]))
    if "memory" in args.only:
        results["memory"] = memory(10_000 if args.tiny else 1_000_000)
        print("memory", json.dumps(results["memory"]))
    if "speed" in args.only:
        device = torch.device(args.device)
        modes = args.compile or (["none", "default", "reduce-overhead", "whole"] if device.type == "cuda" else ["none"])
        results["speed"] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
        for size in args.sizes:
            name, env, width, hidden, batch, steps = SPEED_SIZES[size]
            if args.tiny:  # the script only
                width, hidden, steps = min(width, 32), min(hidden, 16), min(steps, 2)
            for mode in modes:
                repeats = 2 if args.tiny else args.repeats or (30 if device.type == "cuda" else 5)
                results["speed"][f"{name}/{mode}"] = speed(device, mode, width, hidden, repeats, batch, env, steps)
                print("speed", name, mode, json.dumps(results["speed"][f"{name}/{mode}"]), flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results, indent=1))  # what is done survives a time limit
    if "dispatch" in args.only:
        with tempfile.TemporaryDirectory() as workdir:
            modes = args.compile or (["none"] if args.tiny else ["none", "whole"])  # --tiny: the script only
            results["dispatch"] = dispatch(modes, 5 if args.tiny else 300, Path(workdir))
    if "framework" in args.only:
        sys.path.insert(0, str(ROOT / "benchmarks"))  # its sibling, also when this file is loaded by path
        from framework_parts import framework

        results["framework"] = {}
        for bar in (False, True):
            with tempfile.TemporaryDirectory() as workdir:
                name = "progress_bar_on" if bar else "progress_bar_off"
                warmup, learning = (120, 10) if args.tiny else (2000, 500)
                results["framework"][name] = framework(fit_loop, Path(workdir), TINY_NETWORKS, warmup, learning,
                                                       skip=5 if args.tiny else 20, progress_bar=bar)
                print("framework", name, json.dumps(results["framework"][name]), flush=True)
    results["peak_rss_mb_this_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
