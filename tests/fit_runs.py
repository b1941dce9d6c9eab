"""Helpers for tests that run the fit CLI (in a subprocess, or parsed in-process): commands, environment, waits and
the MLflow runs they write. Shared by the test modules (none imports another)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from dime_lightning.fit import build_cli

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
BASE = ["--config", str(CONF / "pendulum.yaml"), "--config", str(CONF / "smoke.yaml")]


def run_fit(tmp_path: Path, *args: str, timeout: int = 300, launcher: tuple[str, ...] = ("-m",)
            ) -> subprocess.CompletedProcess:
    """The fit CLI in a subprocess; ``launcher``: what runs ``dime_lightning.fit`` (e.g. torchrun's ``-m`` line)."""
    command = [sys.executable, *launcher, "dime_lightning.fit", *args,
               "--mlflow.tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
               "--checkpoint.dirpath", str(tmp_path / "ckpt"), "--trainer.enable_progress_bar", "false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}  # test envs and callbacks
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=timeout, env=env)


def fit_command(tmp_path: Path, *args: str, dirpath: bool = True) -> list[str]:
    return [sys.executable, "-m", "dime_lightning.fit", *BASE, *args,
            "--mlflow.tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--trainer.enable_progress_bar", "false",
            *(["--checkpoint.dirpath", str(tmp_path / "ckpt")] if dirpath else [])]


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}


def start(tmp_path: Path, *args: str) -> subprocess.Popen:
    with open(tmp_path / f"log-{time.time_ns()}.txt", "w") as log:  # the child keeps its own descriptor
        return subprocess.Popen(fit_command(tmp_path, *args), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                env=environment())


def run(tmp_path: Path, *args: str, timeout: int = 300, dirpath: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(fit_command(tmp_path, *args, dirpath=dirpath), cwd=tmp_path, capture_output=True,
                          text=True, timeout=timeout, env=environment())


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, "the run ended before writing a checkpoint"
        assert time.monotonic() < deadline, f"{path} not written in {timeout}s"
        time.sleep(0.2)


def only_run(tmp_path: Path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1, f"expected one MLflow run, found {len(runs)}"
    return runs.iloc[0]


def assert_histories_strictly_increasing(run_id: str) -> None:
    client = mlflow.MlflowClient()
    keys = client.get_run(run_id).data.metrics.keys()
    assert "eval/return_mean" in keys and "train/loss_critic" in keys
    for key in keys:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert all(a < b for a, b in itertools.pairwise(steps)), f"{key}: steps {steps}"


def resume_error(tmp_path: Path, monkeypatch, capsys, *args: str) -> str:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        build_cli([*BASE, *args])
    assert exit_info.value.code == 2
    return capsys.readouterr().err
