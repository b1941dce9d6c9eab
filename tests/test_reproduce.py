"""The reproduction command end to end on a DMC task through the real CLI (smoke sizes): the fit exits 0, its
MLflow run has eval metrics, the comparison with the paper is written; and bad input stops it with exit 2."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from dime_lightning import reference, reproduce

ROOT = Path(__file__).resolve().parents[1]
needs_dmc = pytest.mark.skipif(importlib.util.find_spec("dm_control") is None, reason="needs the dmc extra")


@needs_dmc
def test_dmc_smoke_reproduction_runs_and_compares_with_the_paper(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'repro.db'}"
    args = ["--tasks", "dm_control/pendulum-swingup", "--seeds", "1", "--overlay", str(ROOT / "conf" / "smoke.yaml"),
            "--experiment", "repro", "--tracking_uri", uri, "--workdir", str(tmp_path / "runs"), "--reps", "200"]
    result = subprocess.run([sys.executable, "-m", "dime_lightning.reproduce", *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = (tmp_path / "runs" / "dmc_pendulum_swingup-seed0.log")
    assert result.returncode == 0, result.stderr[-3000:] + (log.read_text()[-3000:] if log.exists() else "")
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("repro").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "dmc_pendulum_swingup-seed0"
    assert run.data.params["data.env_id"] == "dm_control/pendulum-swingup"
    evals = client.get_metric_history(run.info.run_id, "eval/return_mean")
    assert [m.step for m in evals] == [150, 300] and all(m.value >= 0.0 for m in evals)
    assert client.get_metric_history(run.info.run_id, "eval/episode_length")[-1].value == 1000.0  # DMC time limit
    assert (tmp_path / "runs" / "compare.png").stat().st_size > 0
    table = pd.read_csv(tmp_path / "runs" / "compare.csv")
    assert {"IQM", "IQM 95% CI low", "IQM 95% CI high"} <= set(table.columns)
    assert table.group.str.contains("dmc_pendulum_swingup").any() and (table.group == "DIME").any()
    # the same command again skips the finished run and only compares
    assert reproduce.main(args) == 0
    assert "already FINISHED" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "message"), [
    (["--tasks", "nope"], "unknown task 'nope'; known: all, all-dmc, all-gym, all-myo"),
    (["--tasks", "pendulum"], "no 'paper' reference for env id 'Pendulum-v1'"),
    (["--tasks", "dmc_cheetah_run", "--seeds", "0"], "--seeds, --parallel and --reps must be >= 1"),
    (["--tasks", "dmc_cheetah_run", "--overlay", "missing.yaml"], "overlay config not found"),
])
def test_bad_input_exits_2_before_any_run(tmp_path, capsys, args, message):
    assert reproduce.main([*args, "--workdir", str(tmp_path / "runs")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "runs").exists()


def test_all_is_every_published_task_of_the_three_families():
    tasks = {t.name: t.env_id for t in reproduce.resolve_tasks(["all"])}
    assert len(tasks) == 21 and {tasks[n] for n in ("ant", "humanoid")} == {"Ant-v5", "Humanoid-v5"}
    assert sum(e.startswith("dm_control/") for e in tasks.values()) == 15
    assert {e for e in tasks.values() if e.startswith("myo")} == set(reference.MYO_TASKS)
    assert {reference.reference_task(e).task for e in tasks.values()} == set(reference.reference_tasks())
    assert [t.name for t in reproduce.resolve_tasks(["all-gym"])] == ["ant", "humanoid"]


@pytest.mark.skipif(importlib.util.find_spec("myosuite") is None or importlib.util.find_spec("dm_control") is None,
                    reason="needs the dmc and myo extras (a missing one stops reproduce before any run)")
def test_all_dry_run_lists_the_21_tasks_times_the_seeds(tmp_path, capsys):
    assert reproduce.main(["--tasks", "all", "--seeds", "2", "--dry_run", "--reference", "none", "--workdir",
                           str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 42 and sum("myo_hand_pen_twirl_random.yaml" in line for line in lines) == 2


def test_all_dmc_is_the_fifteen_published_tasks_with_seeds_and_passthrough(tmp_path, capsys):
    assert reproduce.main(["--tasks", "all-dmc", "--seeds", "2", "--first_seed", "3", "--dry_run", "--reference",
                           "none", "--workdir", str(tmp_path), "--", "--trainer.accelerator", "gpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 30 and all(line.endswith("--trainer.accelerator gpu") for line in lines)
    assert sum("--seed_everything 4 " in line for line in lines) == 15
    assert any("dmc_dog_run.yaml" in line and "--mlflow.run_name dmc_dog_run-seed3" in line for line in lines)


def test_a_seed_whose_folder_holds_checkpoints_is_resumed_not_restarted(tmp_path, capsys):
    (tmp_path / "runs" / "pendulum-seed0").mkdir(parents=True)
    (tmp_path / "runs" / "pendulum-seed0" / "last.ckpt").write_bytes(b"")  # an earlier attempt's checkpoint
    assert reproduce.main(["--tasks", "pendulum", "--seeds", "2", "--workdir", str(tmp_path / "runs"),
                           "--reference", "none", "--dry_run"]) == 0
    seed0, seed1 = capsys.readouterr().out.strip().splitlines()
    assert seed0.endswith("--ckpt_path last") and "--ckpt_path" not in seed1
