"""Learning benchmarks: DIME vs the tanh-Gaussian actor with identical machinery, through the real trainer.

    python benchmarks/learning.py                                   # all suites, 3 seeds, 2 runs at a time
    python benchmarks/learning.py --suite pendulum bandit --seeds 0 1 2 --jobs 2
    python benchmarks/learning.py --tiny --workdir /tmp/bench       # a minute-long version (used by the tests)

Suites: ``pendulum`` (conf/pendulum.yaml, eval return per eval point), ``bandit`` (conf/bandit.yaml: share of
2,000 sampled actions near each of the 4 optimal actions), ``multigoal`` (conf/multigoal.yaml: share of 100
stochastic rollouts ending at each of the 4 goals), ``halfcheetah`` (conf/halfcheetah.yaml with the CPU-sized
overlay benchmarks/halfcheetah_cpu.yaml; paper-scale numbers need a GPU). A mode or goal counts as covered
when it gets at least 10 % of the mass. Each run is a ``python -m dime_lightning.fit`` subprocess; runs of a
suite share one MLflow database in ``--workdir`` (inspect them with ``python -m dime_lightning.compare``).
Results: ``--results``/<suite>.json and <suite>.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SUITES = {
    "pendulum": [CONF / "pendulum.yaml"],
    "bandit": [CONF / "bandit.yaml"],
    "multigoal": [CONF / "multigoal.yaml"],
    "halfcheetah": [CONF / "halfcheetah.yaml", ROOT / "benchmarks" / "halfcheetah_cpu.yaml"],
}
METHODS = {"DIME": [], "Gaussian": [CONF / "gaussian.yaml"]}
COVERED = 0.10


def run_one(suite: str, method: str, seed: int, workdir: Path, tiny: bool) -> dict:
    # the actor switch (conf/gaussian.yaml) comes last: it replaces the diffusion actor's arguments
    configs = [*SUITES[suite], *([CONF / "smoke.yaml"] if tiny else []), *METHODS[method]]
    name = f"{suite}-{method}-seed{seed}"
    config_args = [arg for config in configs for arg in ("--config", str(config))]
    command = [sys.executable, "-m", "dime_lightning.fit", *config_args,
               "--seed_everything", str(seed), "--mlflow.tracking_uri", f"sqlite:///{workdir / f'{suite}.db'}",
               "--mlflow.experiment_name", f"benchmark-{suite}", "--mlflow.run_name", name,
               "--checkpoint.dirpath", str(workdir / name), "--trainer.enable_progress_bar", "false"]
    started = time.perf_counter()
    with open(workdir / f"{name}.log", "w") as log:
        result = subprocess.run(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    return {"suite": suite, "method": method, "seed": seed, "returncode": result.returncode,
            "wall_seconds": time.perf_counter() - started, "checkpoint": str(workdir / name / "final.ckpt")}


def eval_curve(tracking_uri: str, experiment: str, run_name: str) -> list[tuple[int, float]]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`mlflow.runName` = '{run_name}'")
    return [(m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, "eval/return_mean")]


def coverage(suite: str, checkpoint: str) -> list[float]:
    from dime_lightning.analysis import (
        bandit_coverage,
        goal_coverage,
        load_policy,
        multigoal_final_positions,
        sample_actions,
    )

    policy = load_policy(checkpoint)
    if suite == "bandit":
        return bandit_coverage(sample_actions(policy.actor, [0.0], n=2000)).tolist()
    return goal_coverage(multigoal_final_positions(policy.actor, episodes=100)).tolist()


def plot(suite: str, results: list[dict], out: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method in METHODS:
        curves = [r["eval_curve"] for r in results if r["method"] == method and r["eval_curve"]]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves)))
        values = np.array([[dict(c)[s] for s in steps] for c in curves])
        line, = ax.plot(steps, values.mean(0), label=f"{method} (n={len(curves)})")
        ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel("env steps")
    ax.set_ylabel("eval return (stochastic policy)")
    ax.set_title(f"{suite}: mean and min–max over seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", nargs="+", choices=list(SUITES), default=list(SUITES))
    parser.add_argument("--method", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "runs")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--tiny", action="store_true", help="conf/smoke.yaml sizes: checks the pipeline only")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    for suite in args.suite:  # create each database and experiment once, before runs share them in parallel
        import mlflow

        client = mlflow.MlflowClient(f"sqlite:///{args.workdir.resolve() / f'{suite}.db'}")
        if client.get_experiment_by_name(f"benchmark-{suite}") is None:
            client.create_experiment(f"benchmark-{suite}")
    jobs = [(s, m, seed) for s in args.suite for m in args.method for seed in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        finished = list(pool.map(lambda job: run_one(*job, args.workdir.resolve(), args.tiny), jobs))
    failed = [r for r in finished if r["returncode"] != 0]
    for suite in args.suite:
        results = [r for r in finished if r["suite"] == suite and r["returncode"] == 0]
        uri = f"sqlite:///{args.workdir.resolve() / f'{suite}.db'}"
        for r in results:
            r["eval_curve"] = eval_curve(uri, f"benchmark-{suite}", f"{suite}-{r['method']}-seed{r['seed']}")
            r["final_eval_return"] = r["eval_curve"][-1][1] if r["eval_curve"] else None
            if suite in ("bandit", "multigoal"):
                r["coverage"] = coverage(suite, r["checkpoint"])
                r["modes_covered"] = sum(share >= COVERED for share in r["coverage"])
        summary = {"suite": suite, "tiny": args.tiny, "date": time.strftime("%Y-%m-%d"), "runs": results,
                   "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}
        (args.results / f"{suite}.json").write_text(json.dumps(summary, indent=1))
        plot(suite, results, args.results / f"{suite}.png")
        for r in results:
            extra = f" modes covered {r['modes_covered']}/4 {r['coverage']}" if "coverage" in r else ""
            print(f"{suite:12s} {r['method']:9s} seed {r['seed']}: final eval return {r['final_eval_return']}"
                  f" ({r['wall_seconds'] / 60:.1f} min){extra}")
    for r in failed:
        print(f"FAILED: {r['suite']} {r['method']} seed {r['seed']} (log: {args.workdir}/"
              f"{r['suite']}-{r['method']}-seed{r['seed']}.log)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
