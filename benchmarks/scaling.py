"""Scaling benchmark: env steps/s and updates/s of the real fit loop for 1 vs 2 DDP processes and 1 vs 2 env
worker processes (Pendulum-v1 at conf/pendulum.yaml sizes; evaluation and checkpoints off).

    python benchmarks/scaling.py                # results to benchmarks/results/scaling.json
    python benchmarks/scaling.py --tiny         # seconds; used by the tests

Each setup is one ``python -m dime_lightning.fit`` subprocess. Throughput is read from the run's
``time/env_steps_per_second`` metric (TrainingMonitor), averaged over the learning phase (after
``learning_starts``). Optimizer updates/s = env steps/s × utd / processes: under DDP every rank takes ``utd``
updates per own env step, and one update is a single all-reduced step over all ranks' minibatches.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUPS = {  # name: (extra CLI arguments, processes, torch threads per process)
    "1 process, 1 thread": ([], 1, 1),
    "1 process, 2 threads": ([], 1, 2),
    "DDP 2 processes (gloo), 1 thread each": (["--trainer.strategy", "ddp", "--trainer.devices", "2"], 2, 1),
    "1 process + 2 env workers, 1 thread": (["--data.num_workers", "2", "--data.frames_per_batch", "2"], 1, 1),
}


def run_setup(name: str, workdir: Path, steps: int, learning_starts: int, tiny: bool) -> dict:
    extra, processes, threads = SETUPS[name]
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    run_name = name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
    configs = ["--config", str(ROOT / "conf" / "pendulum.yaml")]
    if tiny:
        configs += ["--config", str(ROOT / "conf" / "smoke.yaml")]
    every = max(steps // 10, 1)
    command = [sys.executable, "-m", "dime_lightning.fit", *configs, *extra,
               "--data.learning_starts", str(learning_starts), "--data.total_env_steps", str(learning_starts + steps),
               "--eval.every_env_steps", "100000000", "--checkpoint.every_env_steps", "100000000",
               "--checkpoint.save_buffer", "false", "--checkpoint.log_artifacts", "false",
               "--checkpoint.dirpath", str(workdir / run_name), "--monitor.every_env_steps", str(every),
               "--mlflow.tracking_uri", uri, "--mlflow.run_name", run_name,
               "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{name}: exit {result.returncode}\n{result.stderr[-3000:]}")
    import mlflow

    mlflow.set_tracking_uri(uri)
    run_id = mlflow.search_runs(experiment_names=["Pendulum-v1"],
                                filter_string=f"tags.mlflow.runName = '{run_name}'").run_id[0]
    history = mlflow.MlflowClient().get_metric_history(run_id, "time/env_steps_per_second")
    learning = [m.value for m in history if m.step > learning_starts + every]  # whole windows after the warm-up
    env_steps_per_s = sum(learning) / len(learning)
    return {"processes": processes, "threads_per_process": threads, "env_steps_per_s": env_steps_per_s,
            "updates_per_s": env_steps_per_s * 2 / processes, "wall_seconds": wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="learning env steps timed per setup")
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scaling.json")
    args = parser.parse_args(argv)
    steps, learning_starts = (40, 100) if args.tiny else (args.steps, 400)
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "date": time.strftime("%Y-%m-%d"),
               "tiny": args.tiny, "steps": steps, "setups": {}}
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.setups:
            results["setups"][name] = run_setup(name, Path(workdir), steps, learning_starts, args.tiny)
            print(name, json.dumps(results["setups"][name]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
