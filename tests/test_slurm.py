"""``reproduce --launcher slurm`` and ``srun`` DDP against a real single-node SLURM cluster (slurmctld, slurmd and
munged from Debian's packages, started in a temp folder by ``slurm_cluster.LocalSlurm``) with a local ``mlflow
server`` as the store. Skipped, with the reason, where the SLURM binaries are absent or not run as root.

SLURM holds a requeued job for about two minutes before it may start again (its ``BeginTime``); the tests
release it at once (``scontrol update StartTime=now``) to keep the suite short. BENCHMARKS.md measures both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from fit_runs import assert_histories_strictly_increasing
from mlflow_server import Server
from slurm_cluster import LocalSlurm, skip_reason

from dime_lightning import reproduce, slurm

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "conf" / "smoke.yaml"
pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    saved = os.environ.get("SLURM_CONF")
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as local:
        os.environ.update(local.env)  # sbatch, squeue, scontrol (and submitit) of this process use it
        yield local
    if saved is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = saved


def reproduce_args(workdir: Path, server: Server, experiment: str, *more: str) -> list[str]:
    return ["--tasks", "pendulum", "--overlay", str(SMOKE), "--reference", "none", "--launcher", "slurm",
            "--tracking_uri", server.uri, "--workdir", str(workdir), "--experiment", experiment, "--poll", "2",
            *more]


def runs_of(server: Server, experiment: str) -> list:
    client = mlflow.MlflowClient(server.uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def job_state(job: str) -> tuple[str, str]:
    """(state, reason) of a queued job, ("", "") once it left the queue."""
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T|%r"], capture_output=True, text=True)
    return tuple(out.stdout.strip().split("|")) if out.returncode == 0 and out.stdout.strip() else ("", "")


def wait_while_queued(jobs: list[str], timeout: float, on_poll=None) -> None:
    deadline = time.monotonic() + timeout
    while any(job_state(job)[0] for job in jobs):
        assert time.monotonic() < deadline, f"jobs {jobs} still queued after {timeout} s"
        for job in jobs:
            if job_state(job) == ("PENDING", "BeginTime"):  # requeued: SLURM's hold, released at once
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
        if on_poll is not None:
            on_poll()
        time.sleep(1.0)


def test_two_smoke_jobs_finish_and_are_not_submitted_again(tmp_path, cluster, server, capsys):
    args = reproduce_args(tmp_path / "runs", server, "two", "--seeds", "2", "--slurm_time", "20")
    assert reproduce.main(args) == 0
    out = capsys.readouterr().out
    registry = slurm.read_registry(tmp_path / "runs")
    assert sorted(registry) == ["pendulum-seed0", "pendulum-seed1"]
    for name, job in registry.items():
        assert f"{name}: submitted as SLURM job {job}" in out
    # again while they are queued or running: nothing submitted; --wait waits for them, reports and returns 0
    assert reproduce.main([*args, "--wait"]) == 0
    out = capsys.readouterr().out
    assert "0 jobs to submit" in out and out.count(", not resubmitted") == 2
    assert slurm.read_registry(tmp_path / "runs") == registry
    runs = runs_of(server, "two")
    assert sorted(run.info.run_name for run in runs) == ["pendulum-seed0", "pendulum-seed1"]
    assert {run.info.status for run in runs} == {"FINISHED"}
    client = mlflow.MlflowClient(server.uri)
    for run in runs:
        assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/return_mean")] == [150, 300]
    # once they are FINISHED: skipped; the status mode reads SLURM and MLflow
    assert reproduce.main(args) == 0
    out = capsys.readouterr().out
    assert "0 jobs to submit" in out and out.count("already FINISHED") == 2
    assert reproduce.main([*args, "--status"]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [(row[0], row[1], row[2], row[3], row[4]) for row in lines] == [
        (name, registry[name], "COMPLETED", "FINISHED", "300") for name in ("pendulum-seed0", "pendulum-seed1")]


def newest_step(folder: Path) -> int:
    return max((int(p.stem.split("-")[1]) for p in folder.glob("step-*.ckpt")), default=0)


def test_requeue_and_time_limit_resume_into_the_same_run(tmp_path, cluster, server, capsys, monkeypatch):
    # seed 0: requeued by hand (as a preemption would) once it has a checkpoint; seed 1: a 3-minute limit,
    # shorter than its run (the checkpoint signal comes 30 s before it, up to 60 s earlier: an attempt trains
    # for at most 150 s). Each env step also sleeps (tests/slow_steps.py): seed 1's 1,100 learning steps last
    # over 165 s however fast the machine, so it needs a second attempt; seed 0 lasts long enough to be requeued.
    totals = {"pendulum-seed0": 900, "pendulum-seed1": 1200}
    pause = {"pendulum-seed0": 0.05, "pendulum-seed1": 0.15}
    workdir = tmp_path / "runs"
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests"))  # the jobs inherit it (sbatch exports the environment)
    for seed, slurm_args in ((0, ["--slurm_time", "20"]), (1, ["--slurm_time", "3", "--slurm_signal_delay", "30"])):
        name = f"pendulum-seed{seed}"
        slow = json.dumps({"class_path": "slow_steps.SlowSteps", "init_args": {"seconds": pause[name]}})
        fit_args = ["--", "--data.total_env_steps", str(totals[name]), "--checkpoint.every_env_steps", "100",
                    "--eval.every_env_steps", "300", f"--trainer.callbacks+={slow}"]
        assert reproduce.main([*reproduce_args(workdir, server, "requeue", "--seeds", "1", "--first_seed", str(seed),
                                               *slurm_args), *fit_args]) == 0
    registry = slurm.read_registry(workdir)
    requeued = []

    def requeue_once() -> None:
        if not requeued and newest_step(workdir / "pendulum-seed0") >= 200:
            subprocess.run(["scontrol", "requeue", registry["pendulum-seed0"]], check=True)
            requeued.append(time.monotonic())

    wait_while_queued(list(registry.values()), timeout=1500, on_poll=requeue_once)
    assert requeued
    runs = runs_of(server, "requeue")
    assert sorted(run.info.run_name for run in runs) == ["pendulum-seed0", "pendulum-seed1"]  # one run per seed
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(server.uri)  # assert_histories_strictly_increasing reads the default store
    try:
        for run in runs:
            assert run.info.status == "FINISHED", run.info.run_name
            assert_histories_strictly_increasing(run.info.run_id)
    finally:
        mlflow.set_tracking_uri(previous)
    for run in runs:
        name = run.info.run_name
        final = torch.load(workdir / name / "final.ckpt", weights_only=False, map_location="cpu")
        assert final["mlflow"]["run_id"] == run.info.run_id
        # the counters of an uninterrupted run: nothing lost or repeated across the stops
        total = totals[name]
        assert final["dime_counters"] == {"env_steps": total, "critic_updates": 2 * (total - 100),
                                          "actor_updates": 2 * (total - 100) // 3, "skipped_updates": 0}
        log = (workdir / f"{name}.log").read_text()
        assert log.count("=== SLURM job") >= 2 and log.count("--ckpt_path last") >= 1, name


def test_srun_runs_a_two_rank_ddp_fit(tmp_path, cluster, server):
    script = tmp_path / "ddp.sh"
    script.write_text("\n".join([
        "#!/bin/bash", "#SBATCH --nodes 1 --ntasks-per-node 2 --cpus-per-task 1 --time 15",
        f"#SBATCH --output {tmp_path / 'ddp.out'}",
        f"srun --ntasks 2 --kill-on-bad-exit=1 {sys.executable} -m dime_lightning.fit "
        f"--config {ROOT / 'conf' / 'pendulum.yaml'} --config {SMOKE} "
        "--trainer.strategy ddp --trainer.devices 2 --trainer.num_nodes 1 "
        f"--trainer.callbacks+=ddp_probe.SaveRankState --mlflow.tracking_uri {server.uri} "
        f"--mlflow.experiment_name srun-ddp --checkpoint.dirpath {tmp_path / 'ckpt'} "
        "--trainer.enable_progress_bar false", ""]))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, env=env,
                         cwd=tmp_path, check=True)
    job = out.stdout.strip().split(";")[0]
    wait_while_queued([job], timeout=600)
    log = (tmp_path / "ddp.out").read_text()
    assert slurm.final_state(job) == "COMPLETED", log[-4000:]
    states = [torch.load(tmp_path / f"rank{rank}-state.pt", weights_only=False) for rank in (0, 1)]
    assert states[0]["world_size"] == 2 and states[0]["env_steps"] == states[1]["env_steps"] == 300
    for key, value in states[0]["state"].items():
        assert torch.equal(value, states[1]["state"][key]), key
    runs = runs_of(server, "srun-ddp")
    assert [run.info.status for run in runs] == ["FINISHED"]  # one run: rank 0's


def test_a_fit_that_fails_ends_its_job_failed_without_requeue(tmp_path, cluster, server, capsys):
    args = reproduce_args(tmp_path / "runs", server, "failing", "--seeds", "1", "--slurm_time", "10", "--wait",
                          "--", "--data.total_env_steps", "-5")
    assert reproduce.main(args) == 1
    captured = capsys.readouterr()
    assert "runs not FINISHED" in captured.err and "pendulum-seed0" in captured.err
    job = slurm.read_registry(tmp_path / "runs")["pendulum-seed0"]
    assert slurm.final_state(job) == "FAILED"
    log = (tmp_path / "runs" / "pendulum-seed0.log").read_text()
    assert log.count("=== SLURM job") == 1 and "total_env_steps" in log  # one attempt; the fit said why
