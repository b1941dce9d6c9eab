"""A smoke fit against a local ``mlflow server`` that goes away for longer than the client's retry budget: the
fit trains on, exits 0, and every record arrives exactly once, in order (when the server returns, or by the
replay command when it does not)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow_server import Server

from dime_lightning import tracking_queue
from dime_lightning.checkpoint_schema import read_checkpoint
from dime_lightning.tracking_queue import PENDING_GLOB

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--config", str(ROOT / "conf" / "pendulum.yaml"), "--config", str(ROOT / "conf" / "smoke.yaml")]
TOTAL = 450
SHORT_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


def start_fit(tmp_path: Path, uri: str, *args: str) -> tuple[subprocess.Popen, Path]:
    command = [sys.executable, "-m", "dime_lightning.fit", *BASE, "--data.total_env_steps", str(TOTAL),
               "--checkpoint.every_env_steps", "50", "--checkpoint.keep", "100", "--checkpoint.save_buffer", "false",
               "--trainer.log_every_n_steps", "1", "--mlflow.tracking_uri", uri,
               "--checkpoint.dirpath", str(tmp_path / "ckpt"), "--trainer.enable_progress_bar", "false", *args]
    env = {**os.environ, **SHORT_RETRIES, "OMP_NUM_THREADS": "1"}
    log_path = tmp_path / "fit.log"
    with open(log_path, "w") as log:
        return subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env), log_path


def newest_step(folder: Path) -> int:
    return max((int(p.stem.split("-")[1]) for p in folder.glob("step-*.ckpt")), default=0)


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the fit ended before {what}"
        assert time.monotonic() < deadline, f"{what}: not in {timeout} s"
        time.sleep(0.2)


def outage(tmp_path: Path, server: Server, flush_timeout: str) -> tuple[subprocess.Popen, Path]:
    """Start a fit, take the server down once it logs, and check that env steps advance while it is down."""
    process, log = start_fit(tmp_path, server.uri, "--mlflow.flush_timeout", flush_timeout)
    ckpt = tmp_path / "ckpt"
    wait_for(lambda: newest_step(ckpt) >= 150, process, "the first checkpoints")  # updates are being logged
    server.stop()
    down_at = newest_step(ckpt)
    wait_for(lambda: "is unreachable" in log.read_text(), process, "the outage warning")
    wait_for(lambda: newest_step(ckpt) >= down_at + 100, process, "env steps during the outage")
    return process, log


def check_run_complete(uri: str, folder: Path) -> None:
    client = mlflow.MlflowClient(uri)
    run = client.get_run(read_checkpoint(folder / "final.ckpt")["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    evals = [m.step for m in client.get_metric_history(run.info.run_id, "eval/return_mean")]
    assert evals == [150, 300, TOTAL]
    losses = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss_critic")]
    assert losses == list(range(losses[0], losses[0] + TOTAL - 100))  # one per update env step, once, in order
    for key in run.data.metrics:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert all(a < b for a, b in itertools.pairwise(steps)), f"{key}: {steps}"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert artifacts == {"checkpoints/final.ckpt"}


def test_fit_trains_through_an_outage_and_delivers_everything_when_the_server_returns(tmp_path, server):
    process, log = outage(tmp_path, server, flush_timeout="300")
    server.start()
    assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert "reachable again" in log.read_text()
    assert not list((tmp_path / "ckpt").glob(PENDING_GLOB))
    check_run_complete(server.uri, tmp_path / "ckpt")


def test_with_a_server_that_never_returns_the_records_stay_on_disk_and_replay_later(tmp_path, server):
    process, log = outage(tmp_path, server, flush_timeout="2")
    assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
    [pending] = (tmp_path / "ckpt").glob(PENDING_GLOB)
    assert "tracking_queue replay" in log.read_text()
    server.start()
    with pytest.raises(SystemExit) as replayed:  # python -m dime_lightning.tracking_queue replay <folder>
        tracking_queue.main(["replay", str(tmp_path / "ckpt")])
    assert replayed.value.code == 0
    assert not pending.exists()
    check_run_complete(server.uri, tmp_path / "ckpt")
