"""What SLURM adds to a reproduction, on a local single-node SLURM (tests/slurm_cluster.py, as root, Debian's
slurmctld/slurmd/munge) with a local ``mlflow server`` as the store, at smoke sizes on Pendulum-v1:

1. submission → first evaluation for two jobs submitted by ``reproduce --launcher slurm`` (also → job
   running, → run FINISHED);
2. the cost of one ``scontrol requeue`` of a running 900-step job once it has checkpoints: env steps redone
   (highest env step the first attempt logged minus the env step of the checkpoint the second one resumed
   from), SLURM's hold of a requeued job (its BeginTime), and the seconds the run loses besides the hold (the
   hold is released at once with ``scontrol update StartTime=now``, then: requeue → running again → first
   new metric, and the gap in the metric timeline).

    python benchmarks/slurm_overhead.py          # results to benchmarks/results/slurm_overhead.json
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
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import mlflow  # noqa: E402
import torch  # noqa: E402
from mlflow_server import Server  # noqa: E402
from slurm_cluster import LocalSlurm  # noqa: E402

from dime_lightning import reproduce, slurm  # noqa: E402

SMOKE = ROOT / "conf" / "smoke.yaml"


def args_for(workdir: Path, uri: str, experiment: str, *more: str) -> list[str]:
    return ["--tasks", "pendulum", "--overlay", str(SMOKE), "--reference", "none", "--launcher", "slurm",
            "--tracking_uri", uri, "--workdir", str(workdir), "--experiment", experiment, "--slurm_time", "30",
            *more]


def squeue(job: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T|%r|%S"], capture_output=True, text=True)
    return out.stdout.strip().split("|") if out.returncode == 0 and out.stdout.strip() else []


def runs(uri: str, experiment: str) -> dict:
    client = mlflow.MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return {r.info.run_name: r for r in client.search_runs([found.experiment_id])} if found else {}


def first_eval(uri: str, run_id: str) -> float | None:
    history = mlflow.MlflowClient(uri).get_metric_history(run_id, "eval/return_mean")
    return min(m.timestamp for m in history) / 1000 if history else None


def submission_latency(workdir: Path, uri: str) -> dict:
    started = time.time()
    assert reproduce.main(args_for(workdir, uri, "latency", "--seeds", "2")) == 0
    submitted = time.time()
    registry = slurm.read_registry(workdir)
    running: dict[str, float] = {}
    while any(squeue(job) for job in registry.values()):
        for name, job in registry.items():
            if name not in running and (state := squeue(job)) and state[0] == "RUNNING":
                running[name] = time.time()
        time.sleep(0.5)
    result = {"submit_command_s": round(submitted - started, 1)}
    for name, run in runs(uri, "latency").items():
        result[name] = {"to_running_s": round(running.get(name, float("nan")) - started, 1),
                        "to_first_eval_s": round(first_eval(uri, run.info.run_id) - started, 1),
                        "to_finished_s": round(run.info.end_time / 1000 - started, 1), "status": run.info.status}
    return result


def timeline(uri: str, run_id: str) -> list[tuple[float, int]]:
    """(time, env step) of every logged value of the run's per-step metrics."""
    client = mlflow.MlflowClient(uri)
    points = []
    for key in ("train/loss_critic", "time/env_steps_per_second"):
        points += [(m.timestamp / 1000, m.step) for m in client.get_metric_history(run_id, key)]
    return sorted(points)


def requeue_cost(workdir: Path, uri: str, total: int, at_step: int) -> dict:
    more = ["--seeds", "1", "--", "--data.total_env_steps", str(total), "--checkpoint.every_env_steps", "100",
            "--trainer.log_every_n_steps", "1"]
    assert reproduce.main(args_for(workdir, uri, "requeue", *more)) == 0
    job = slurm.read_registry(workdir)["pendulum-seed0"]
    folder = workdir / "pendulum-seed0"
    while max((int(p.stem.split("-")[1]) for p in folder.glob("step-*.ckpt")), default=0) < at_step:
        assert squeue(job), "the job ended before the requeue point"
        time.sleep(0.2)
    requeued = time.time()
    subprocess.run(["scontrol", "requeue", job], check=True)
    hold = resumed_from = None
    while (state := squeue(job)) and state[0] != "RUNNING":
        if state[:2] == ["PENDING", "BeginTime"] and hold is None:  # the first attempt has ended
            hold = datetime.fromisoformat(state[2]).timestamp() - requeued
            stopped = torch.load(folder / "last.ckpt", weights_only=False, map_location="cpu")
            resumed_from = stopped["dime_counters"]["env_steps"]
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
        time.sleep(0.2)
    running_again = time.time()
    while squeue(job):
        time.sleep(0.5)
    run = runs(uri, "requeue")["pendulum-seed0"]
    points = timeline(uri, run.info.run_id)
    before = [(t, s) for t, s in points if t < running_again]  # the first attempt's
    after = [(t, s) for t, s in points if t > running_again]
    final = torch.load(folder / "final.ckpt", weights_only=False, map_location="cpu")
    last_before = max(before)
    first_after = min(after)
    highest = max(s for _, s in before)
    return {"requeued_once_checkpoint_exists": at_step, "highest_step_logged_before": highest,
            "resumed_from_env_step": resumed_from, "env_steps_redone": max(0, highest - resumed_from),
            "first_step_logged_after": first_after[1],
            "slurm_hold_s": round(hold, 1) if hold is not None else None,
            "requeue_to_running_again_s": round(running_again - requeued, 1),
            "running_again_to_first_new_metric_s": round(first_after[0] - running_again, 1),
            "metric_gap_s": round(first_after[0] - last_before[0], 1),
            "status": run.info.status, "final_counters": final["dime_counters"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "slurm_overhead.json")
    parser.add_argument("--total", type=int, default=900, help="env steps of the requeued job")
    parser.add_argument("--requeue-at", type=int, default=300, help="requeue once this checkpoint exists")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dime-slurm-") as tmp:
        folder = Path(tmp)
        (folder / "mlflow").mkdir()
        server = Server(folder / "mlflow")
        server.start()
        try:
            with LocalSlurm(folder / "slurm") as cluster:
                os.environ.update(cluster.env)
                results = {"machine": f"{platform.node()}, {os.cpu_count()} CPUs",
                           "latency": submission_latency(folder / "latency", server.uri),
                           "requeue": requeue_cost(folder / "requeue", server.uri, args.total, args.requeue_at)}
        finally:
            server.stop()
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
