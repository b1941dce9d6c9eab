"""Acting eager against compiled on a CPU: ``model.compile_act none`` / ``default`` (ahead of time,
``program.compile_acting``), and ``dynamo`` (``torch.compile(actor.act)``, what ``default`` ran before): ms per
action at batch 1 (fetched to the host, as the env needs it) and the first call's seconds, at the dispatch-bound
size (Pendulum shapes, width 8, 1 diffusion step) and at CPU size (Ant-v5 shapes, width 256, 16 diffusion steps).
The modes are timed in turns, 9 rounds, medians. What ``auto`` picks for acting on a CPU rests on it
(dime_lightning/auto.py).

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/act_modes.py benchmarks/results/act_modes.json
    # cold caches, as a first run on a machine: TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) in front
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
from throughput import SHAPES, SPEED_SIZES  # the sizes of the speed section (benchmarks/ is on the path)

from dime_lightning.actor import DiffusionActor
from dime_lightning.program import compile_acting

CALLS = {"dispatch": 300, "cpu": 60}  # per round


def main(out: str) -> dict:
    torch.manual_seed(0)
    results = {}
    for size in CALLS:
        _, env, _, width, _, steps = SPEED_SIZES[size]
        obs_dim, action_dim = SHAPES[env]
        modes = {}
        for mode in ("none", "dynamo", "default"):
            actor = DiffusionActor(obs_dim, action_dim, num_steps=steps, hidden_dim=width, time_features=width,
                                   time_hidden_dim=width)
            act = torch.compile(actor.act) if mode == "dynamo" else compile_acting(actor.act, mode, "cpu")
            obs = torch.randn(obs_dim)
            start = time.perf_counter()
            act(obs).cpu()
            modes[mode] = (act, obs, time.perf_counter() - start, [])
        for _ in range(9):
            for act, obs, _, times in modes.values():
                start = time.perf_counter()
                for _ in range(CALLS[size]):
                    act(obs).cpu()
                times.append((time.perf_counter() - start) / CALLS[size] * 1e3)
        results[size] = {mode: {"act_batch1_ms": round(statistics.median(times), 4), "first_call_s": round(first, 2)}
                         for mode, (_, _, first, times) in modes.items()}
        print(size, json.dumps(results[size]), flush=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/act_modes.json")
