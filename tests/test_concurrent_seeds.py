"""Seeds launched side by side: three fits started at the same moment on one not-yet-existing embedded
``sqlite:///mlflow.db`` all start and finish (the store is created once, under a file lock), no metric lost."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--config", str(ROOT / "conf" / "pendulum.yaml"), "--config", str(ROOT / "conf" / "smoke.yaml")]


def test_three_fits_started_together_on_a_new_sqlite_store_all_finish(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    env["OMP_NUM_THREADS"] = "1"
    assert not (tmp_path / "mlflow.db").exists()
    processes = []
    for seed in range(3):
        log = open(tmp_path / f"fit-{seed}.log", "w")  # closed below, after the process ends
        command = [sys.executable, "-m", "dime_lightning.fit", *BASE, "--seed_everything", str(seed),
                   "--data.total_env_steps", "150", "--trainer.log_every_n_steps", "1",
                   "--checkpoint.save_buffer", "false", "--trainer.enable_progress_bar", "false"]
        processes.append((subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env),
                          log))
    for process, log in processes:
        try:
            code = process.wait(timeout=400)
        finally:
            process.kill()
            log.close()
        assert code == 0, Path(log.name).read_text()[-3000:]

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(r.data.params["seed_everything"] for r in runs) == ["0", "1", "2"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/return_mean")] == [150]
        losses = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss_critic")]
        assert losses == list(range(101, 151))  # one per update env step, each once
