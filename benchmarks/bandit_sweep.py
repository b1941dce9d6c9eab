"""MultimodalBandit-v0 without a critic: the actor loss against the exact reward, swept over α and seeds.

    python benchmarks/bandit_sweep.py                  # α ∈ {0.01 … 0.05}, seeds 0 1, 2,000 actor updates
    python benchmarks/bandit_sweep.py --tiny           # seconds; used by the tests

The bandit is one step, so Q(s, a) = r(a) exactly; replacing the learned critic by r isolates what the actor
objective L = E[−r(a) + α log π̂(a)] (docs/algorithm.md §1.7, the paper's optimiser and clipping) does with four
equally good modes. Every ``--every`` updates, 2,000 actions are sampled and the share within 0.25 of each
optimum is recorded (a mode counts as covered at ≥ 10 %). Results: benchmarks/results/bandit_sweep.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from dime_lightning.actor import DiffusionActor
from dime_lightning.gaussian import TanhGaussianActor
from dime_lightning.optim import adam, zero_nan_and_clip_gradients_
from dime_lightning.toy_envs import BANDIT_MODES, BANDIT_WIDTH, mode_coverage

ROOT = Path(__file__).resolve().parents[1]
RADIUS, COVERED = 0.25, 0.10


def exact_reward(action: torch.Tensor) -> torch.Tensor:
    """The bandit's reward (toy_envs.bandit_reward) in torch, differentiable: (B, 2) -> (B,)."""
    sq_dist = ((action.unsqueeze(-2) - torch.as_tensor(BANDIT_MODES)) ** 2).sum(-1)  # (B, 4)
    return torch.exp(-sq_dist / (2 * BANDIT_WIDTH**2)).max(-1).values


def run(method: str, alpha: float, seed: int, updates: int, every: int, batch: int, tiny: bool) -> dict:
    torch.manual_seed(seed)
    size = {"hidden_dim": 16} if tiny else {}
    actor = DiffusionActor(1, 2, **size) if method == "DIME" else TanhGaussianActor(1, 2, **size)
    optimizer = adam(actor.parameters(), 3e-4)
    obs = torch.zeros(batch, 1)
    curve = []
    for update in range(updates + 1):
        if update % every == 0:
            with torch.no_grad():
                actions = actor(torch.zeros(2000, 1)).action
            coverage = mode_coverage(actions.numpy(), BANDIT_MODES, RADIUS)
            curve.append({"update": update, "reward": float(exact_reward(actions).mean()),
                          "coverage": [round(float(c), 4) for c in coverage]})
        if update == updates:
            break
        out = actor(obs)
        loss = (-exact_reward(out.action) + alpha * out.log_prob).mean()
        optimizer.zero_grad()
        loss.backward()
        zero_nan_and_clip_gradients_(actor.parameters(), 1.0)
        optimizer.step()
    final = np.array(curve[-1]["coverage"])
    return {"method": method, "alpha": alpha, "seed": seed, "curve": curve,
            "modes_covered": int((final >= COVERED).sum()), "final_reward": curve[-1]["reward"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.01, 0.02, 0.03, 0.04, 0.05])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--methods", nargs="+", default=["DIME", "Gaussian"], choices=["DIME", "Gaussian"])
    parser.add_argument("--updates", type=int, default=2000)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bandit_sweep.json")
    args = parser.parse_args(argv)
    updates, every, batch = (4, 2, 16) if args.tiny else (args.updates, args.every, args.batch)
    runs = []
    for method in args.methods:
        for alpha in args.alphas:
            for seed in args.seeds:
                start = time.perf_counter()
                result = run(method, alpha, seed, updates, every, batch, args.tiny)
                result["wall_seconds"] = time.perf_counter() - start
                runs.append(result)
                print(f"{method:8s} alpha {alpha:<6} seed {seed}: reward {result['final_reward']:.3f}, coverage "
                      f"{result['curve'][-1]['coverage']}, {result['modes_covered']} of 4 modes", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "tiny": args.tiny, "updates": updates,
                                    "batch": batch, "radius": RADIUS, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
