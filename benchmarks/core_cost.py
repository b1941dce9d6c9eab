"""Parameter counts and forward+backward cost of DIME's networks at paper size.

    python benchmarks/core_cost.py [--threads 2] [--repeats 5] [--out benchmarks/results/core_cost.json]

For each env shape (HalfCheetah-v5: obs 17, act 6; Ant-v5: obs 105, act 8): actor and critic parameter
counts at the paper sizes (control net 3×256, 2 critics × [2048, 2048], 101 atoms), and milliseconds for one
critic loss forward+backward (including the no-grad 16-step sample of next actions) and one actor loss
forward+backward (16-step backprop through time), batch 256, on this machine's CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from tensordict import TensorDict

from dime_lightning.actor import DiffusionActor
from dime_lightning.critic import DistributionalCritic
from dime_lightning.losses import actor_loss, critic_loss

SHAPES = {"HalfCheetah-v5": (17, 6), "Ant-v5": (105, 8)}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def measure(obs_dim: int, action_dim: int, batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    actor = DiffusionActor(obs_dim, action_dim)
    critic = DistributionalCritic(obs_dim, action_dim)
    data = TensorDict({
        "observation": torch.randn(batch, obs_dim), "action": torch.rand(batch, action_dim) * 2 - 1,
        ("next", "observation"): torch.randn(batch, obs_dim), ("next", "reward"): torch.randn(batch, 1),
        ("next", "terminated"): torch.zeros(batch, 1, dtype=torch.bool),
    }, batch_size=[batch])
    alpha = torch.tensor(1.0)

    def critic_step():
        critic.zero_grad()
        critic_loss(critic, actor, data, alpha, 0.99)["loss_critic"].backward()

    def actor_step():
        actor.zero_grad()
        actor_loss(actor, critic, data["observation"], alpha)["loss_actor"].backward()

    def act_one():
        actor.act(data["observation"][0])

    critic_ms, actor_ms = timed(critic_step, repeats), timed(actor_step, repeats)
    return {
        "actor_params": count(actor), "critic_params": count(critic), "critic_params_per_member": count(critic) // 2,
        "critic_loss_fwd_bwd_ms": critic_ms, "actor_loss_fwd_bwd_ms": actor_ms,
        "act_batch1_ms": timed(act_one, 20),
        "update_ms_per_env_step": 2 * critic_ms + 2 / 3 * actor_ms,  # UTD 2, policy delay 3
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {"machine": f"{platform.processor() or platform.machine()}, {args.threads} threads, torch "
                          f"{torch.__version__}", "date": time.strftime("%Y-%m-%d"), "batch": args.batch}
    for name, (obs_dim, action_dim) in SHAPES.items():
        results[name] = measure(obs_dim, action_dim, args.batch, args.repeats)
        print(name, json.dumps(results[name], indent=1))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
