"""Goal coverage on the standard multi-goal task (MultiGoalHaarnoja-v0): DIME vs the tanh-Gaussian actor.

    python benchmarks/multigoal_coverage.py                     # α 0.1, 1, 3 and auto, 2 seeds, 2 policies, 2 jobs
    python benchmarks/multigoal_coverage.py --alphas 0.1 1.0 --seeds 0 --steps 4000
    python benchmarks/multigoal_coverage.py --tiny --workdir /tmp/mgc --results /tmp/mgc.json   # seconds

Each run trains through the real CLI (``python -m dime_lightning.fit --config conf/multigoal_haarnoja.yaml``,
plus ``conf/gaussian.yaml`` for the Gaussian; the temperature is switched to ``mode: fixed`` at the given α, or
left on auto), with ``OMP_NUM_THREADS=1`` under ``nice -n 5``, at most ``--jobs`` at a time. Then ``--episodes``
stochastic rollouts from the start distribution N(0, 0.1² I) (around the origin) are run with the trained actor
and each rollout's end is assigned to the goal within 1 of it (the task's termination radius), or to none;
2,000 actions sampled at the origin are assigned to the goal whose direction is nearest theirs.
Results go to ``--results`` (JSON), rewritten after every run; finished runs found there are skipped, and a
run whose ``final.ckpt`` holds all its env steps is only evaluated, so an interrupted sweep resumes where it
stopped (an interrupted run starts over).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
BASE = [CONF / "multigoal_haarnoja.yaml"]
POLICIES = {"DIME": [], "Gaussian": [CONF / "gaussian.yaml"]}  # the actor switch comes last
LOCK = threading.Lock()


def run_name(policy: str, alpha: str, seed: int) -> str:
    return f"{policy}-alpha{alpha}-seed{seed}"


def fit_command(policy: str, alpha: str, seed: int, args: argparse.Namespace, dirpath: Path) -> list[str]:
    configs = [*BASE, *([CONF / "smoke.yaml"] if args.tiny else []), *POLICIES[policy]]
    temperature = [] if alpha == "auto" else ["--model.temperature.init_args.mode", "fixed",
                                              "--model.temperature.init_args.init_alpha", alpha]
    return ["nice", "-n", "5", sys.executable, "-m", "dime_lightning.fit",
            *[arg for config in configs for arg in ("--config", str(config))], *temperature,
            "--seed_everything", str(seed), "--data.total_env_steps", str(args.steps),
            "--mlflow.tracking_uri", f"sqlite:///{dirpath / 'mlflow.db'}",
            "--mlflow.experiment_name", "multigoal-coverage", "--mlflow.run_name", dirpath.name,
            "--checkpoint.dirpath", str(dirpath), "--trainer.enable_progress_bar", "false"]


def final_alpha(checkpoint: Path) -> float:
    from dime_lightning.checkpoint_schema import read_checkpoint

    return float(read_checkpoint(checkpoint)["state_dict"]["temperature.log_alpha"].exp())


def finished(checkpoint: Path, steps: int) -> bool:
    """Whether ``checkpoint`` exists and holds a run trained to ``steps`` env steps (a run stopped early by
    SIGTERM leaves a checkpoint too)."""
    from dime_lightning import checkpoint_schema as schema

    return checkpoint.exists() and schema.env_steps(schema.read_checkpoint(checkpoint)) >= steps


def evaluate(checkpoint: Path, episodes: int, seed: int) -> dict:
    import numpy as np
    import torch

    from dime_lightning import analysis

    torch.set_num_threads(1)
    policy = analysis.load_policy(checkpoint)
    paths = analysis.point_rollouts(policy.actor, policy.env_id, episodes=episodes, seed=seed)
    lengths = (~np.isnan(paths[..., 0])).sum(1) - 1
    first = analysis.sample_actions(policy.actor, [0.0, 0.0], n=2000, seed=seed)  # actions at the origin
    return {**analysis.coverage_summary(analysis.final_positions(paths)), "mean_length": float(lengths.mean()),
            "first_action_toward_goal": analysis.direction_shares(first).round(3).tolist(),
            "final_alpha": final_alpha(checkpoint)}


def run_one(policy: str, alpha: str, seed: int, args: argparse.Namespace) -> dict:
    dirpath = Path(args.workdir).resolve() / run_name(policy, alpha, seed)
    checkpoint = dirpath / "final.ckpt"
    started = time.perf_counter()
    if not finished(checkpoint, args.steps):
        shutil.rmtree(dirpath, ignore_errors=True)  # a fresh run, never a resume of an interrupted one
        dirpath.mkdir(parents=True)
        with open(dirpath / "train.log", "w") as log:
            result = subprocess.run(fit_command(policy, alpha, seed, args, dirpath), cwd=dirpath, stdout=log,
                                    stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if result.returncode != 0:
            raise RuntimeError(f"{dirpath.name}: training failed (exit {result.returncode}), see {log.name}")
    wall = time.perf_counter() - started
    with LOCK:  # one evaluation at a time, in this process
        coverage = evaluate(checkpoint, args.episodes, seed=1000 + seed)
    return {"policy": policy, "alpha": alpha, "seed": seed, "env_steps": args.steps, "train_wall_s": round(wall, 1),
            "episodes": args.episodes, **coverage}


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"runs": []}


def save(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")


def markdown_table(results: dict) -> str:
    """One row per policy, α and seed: per-goal shares, goals reached (any rollout / ≥ 10 %), share at none."""
    def alpha_order(alpha: str) -> float:
        return -1.0 if alpha == "auto" else float(alpha)

    rows = sorted(results["runs"], key=lambda r: (r["policy"], alpha_order(r["alpha"]), r["seed"]))
    lines = ["| policy | α | seed | share of rollouts ending at goal (+5,0) / (0,+5) / (−5,0) / (0,−5) "
             "| goals reached (any / ≥ 10 %) | no goal | first action at the origin towards each goal "
             "| mean length | final α | train wall |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shares = " / ".join(f"{x:.2f}" for x in r["per_goal"])
        first = " / ".join(f"{x:.2f}" for x in r.get("first_action_toward_goal", []))
        lines.append(f"| {r['policy']} | {r['alpha']} | {r['seed']} | {shares} | {r['goals_reached']} / "
                     f"{r['goals_covered']} | {r['none']:.2f} | {first} | {r['mean_length']:.1f} "
                     f"| {r['final_alpha']:.3g} | {r['train_wall_s'] / 60:.1f} min |")
    return "\n".join(lines)


def reevaluate(results_path: Path, workdir: Path) -> dict:
    """Recompute the rollout measures of every recorded run from its ``final.ckpt`` (training time kept)."""
    results = load_results(results_path)
    for record in results["runs"]:
        checkpoint = workdir.resolve() / run_name(record["policy"], record["alpha"], record["seed"]) / "final.ckpt"
        record.update(evaluate(checkpoint, record["episodes"], seed=1000 + record["seed"]))
    save(results_path, results)
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alphas", nargs="+", default=["0.1", "1.0", "3.0"], help="fixed α values (plus auto)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--steps", type=int, default=8_000, help="env steps per run")
    parser.add_argument("--episodes", type=int, default=100, help="rollouts per trained policy")
    parser.add_argument("--jobs", type=int, default=2, help="training processes at once")
    parser.add_argument("--workdir", default=str(ROOT / "benchmarks" / "runs" / "multigoal_coverage"))
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "multigoal_coverage.json"))
    parser.add_argument("--tiny", action="store_true", help="conf/smoke.yaml sizes (a quick check)")
    parser.add_argument("--table", action="store_true", help="print --results as a Markdown table and exit")
    parser.add_argument("--reevaluate", action="store_true",
                        help="recompute the measures of every run in --results from its checkpoint and exit")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown_table(load_results(Path(args.results))))
        return load_results(Path(args.results))
    if args.reevaluate:
        return reevaluate(Path(args.results), Path(args.workdir))
    for alpha in args.alphas:
        if not float(alpha) > 0:
            raise SystemExit(f"--alphas: every α must be > 0, got {alpha}")
    results_path = Path(args.results)
    results = load_results(results_path)
    done = {(r["policy"], r["alpha"], r["seed"]) for r in results["runs"] if r["env_steps"] == args.steps}
    todo = [(p, a, s) for s in args.seeds for a in ["auto", *args.alphas] for p in args.policies
            if (p, a, s) not in done]
    results["config"] = {"base": [str(c.relative_to(ROOT)) for c in BASE], "tiny": args.tiny,
                         "command": " ".join(["python", "benchmarks/multigoal_coverage.py", *(argv or sys.argv[1:])])}
    print(f"{len(done)} runs found in {results_path}, {len(todo)} to do", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_one, *key, args) for key in todo]
        for future in futures:
            record = future.result()
            with LOCK:
                results["runs"].append(record)
                results["updated"] = datetime.now(UTC).isoformat(timespec="seconds")
                save(results_path, results)
            print(json.dumps(record), flush=True)
    return results


if __name__ == "__main__":
    main()
