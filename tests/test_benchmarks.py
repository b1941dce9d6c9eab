"""Tiny versions of the benchmarks, so that the scripts cannot rot (they measure nothing here)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # a script's dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_throughput_benchmark_tiny(tmp_path):
    out = tmp_path / "throughput.json"
    assert load("throughput").main(["--tiny", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["overhead"]["ratio"] > 0 and results["overhead"]["steps"] == 5
    assert set(results["update"]) == {"cpu_size_critic256", "paper_size_critic2048"}
    assert results["act"]["DIME"]["ms_per_action_batch1"] > 0
    assert {"baseline/memory", "Ant-v5/memory", "Ant-v5/memmap", "Humanoid-v5/memmap"} <= set(results["memory"])
    assert results["memory"]["Humanoid-v5/memmap"]["disk_mb"] > results["memory"]["Ant-v5/memmap"]["disk_mb"]
    assert results["speed"]["device"] == "cpu"  # --device cuda on a GPU; eager only on CPU by default
    for config in ("cpu_size_critic256/none", "paper_size_critic2048/none"):
        timings = results["speed"][config]
        assert timings["learning_step_ms"] > 0 and timings["act_batch256_ms"] > 0
        assert timings["updates_per_env_step_ms"] > 0 and timings["critic_update_ms"] > 0
    dispatch = results["dispatch"]["none"]
    assert dispatch["warmup_env_steps_per_s"] > 0 and dispatch["learning_env_steps_per_s"] > 0
    for bar in ("progress_bar_off", "progress_bar_on"):
        warmup, learning = results["framework"][bar]["warmup"], results["framework"][bar]["learning"]
        assert warmup["update"] == 0 and warmup["sample"] == 0 and learning["update"] > 0 and learning["sample"] > 0
        assert warmup["collector"] > 0 and learning["acting"] > 0 and learning["framework"] > 0


def test_fit_loop_rate_tiny(capsys):
    assert load("fit_loop_rate").main(["--warmup", "60", "--learning", "5"]) == 0
    result = json.loads(capsys.readouterr().out.split("fit_loop_rate ", 1)[1].splitlines()[0])
    assert result["tree"] == str(ROOT)
    assert result["warmup_ms_per_env_step"] > 0 and result["learning_ms_per_env_step"] > 0


def test_learning_benchmark_tiny(tmp_path):
    results = tmp_path / "results"
    code = load("learning").main(["--tiny", "--suite", "bandit", "--seeds", "0", "--workdir", str(tmp_path / "runs"),
                                  "--results", str(results)])
    assert code == 0
    summary = json.loads((results / "bandit.json").read_text())
    assert {r["method"] for r in summary["runs"]} == {"DIME", "Gaussian"}
    for run in summary["runs"]:
        assert len(run["coverage"]) == 4 and 0 <= run["modes_covered"] <= 4
        assert run["eval_curve"] and run["eval_curve"][-1][0] == 300
    assert (results / "bandit.png").stat().st_size > 0


def test_bandit_sweep_tiny(tmp_path):
    out = tmp_path / "sweep.json"
    assert load("bandit_sweep").main(["--tiny", "--alphas", "0.05", "--seeds", "0", "--out", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["method"] for r in runs] == ["DIME", "Gaussian"]
    assert all(len(r["curve"]) == 3 and 0 <= r["modes_covered"] <= 4 for r in runs)


def test_scaling_benchmark_tiny(tmp_path):
    out = tmp_path / "scaling.json"
    assert load("scaling").main(["--tiny", "--setups", "1 process, 1 thread", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    setup = result["setups"]["1 process, 1 thread"]
    assert (setup["processes"], setup["threads_per_process"]) == (1, 1)  # the setup it was asked for
    # the rate read back from the run's metrics: positive, and no faster than the run's own wall time allows
    assert 0 < setup["env_steps_per_s"] and setup["wall_seconds"] >= result["steps"] / setup["env_steps_per_s"]


def test_gpu_check_cpu_dry_run(tmp_path):
    """benchmarks/gpu_check.sh's path (speed table, JAX anchor if installed, real fit, summary) on this CPU."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-dry-run"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    speed = json.loads((tmp_path / "speed_none.json").read_text())["speed"]
    assert speed["paper_size_critic2048/none"]["updates_per_env_step_ms"] > 0
    fit = json.loads((tmp_path / "fit.json").read_text())
    assert fit["learning_env_steps"] > 0 and fit["warmup_env_steps"] == 99 and fit["compile_update"] == "none"
    summary = (tmp_path / "summary.md").read_text()
    assert "paper_size_critic2048/none" in summary
    assert "Real fit loop (compile none, compile_act none, storage memory; cpu)" in summary  # the modes as run
    assert (tmp_path / "jax.json").exists() or (tmp_path / "jax_skipped.txt").exists()


def test_dump_verify_benchmark_tiny(tmp_path):
    out = tmp_path / "dump_verify.json"
    assert load("dump_verify").main(["--transitions", "500", "--dir", str(tmp_path), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["dump_mib"] * 2**20 >= 500 * ((2 * 105 + 8 + 1) * 4 + 1)  # every transition was written
    assert result["write_manifest_s"] >= 0 and result["verify_dump_s"] >= 0


def test_soak_benchmark_tiny(tmp_path):
    out = tmp_path / "soak.json"
    assert load("soak").main(["--env-steps", "300", "--every", "1", "--checkpoint-every", "150", "--eval-every",
                              "150", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["samples"] and all(s["open_fds"] > 0 and s["rss_mib"] > 0 for s in result["samples"])


def _paper_task_runs(uri: str, curves: dict[str, dict[int, list[float]]], variant: str = "diffusion") -> None:
    """Runs named as the benchmark names them: env id → seed → returns at 24k, 48k and 72k env steps."""
    import mlflow

    class_path = ("dime_lightning.gaussian.TanhGaussianActor" if variant == "gaussian"
                  else "dime_lightning.actor.DiffusionActor")
    client = mlflow.MlflowClient(uri)
    for env_id, seeds in curves.items():
        found = client.get_experiment_by_name(env_id)
        experiment_id = found.experiment_id if found else client.create_experiment(env_id)
        for seed, values in seeds.items():
            run = client.create_run(experiment_id, run_name=load("paper_tasks_cpu").run_name(seed, variant))
            for key, value in (("model.actor.class_path", class_path),
                               ("data.env_id", env_id), ("seed_everything", str(seed))):
                client.log_param(run.info.run_id, key, value)
            for step, value in zip((24_000, 48_000, 72_000), values, strict=True):
                client.log_metric(run.info.run_id, "eval/return_mean", value, step=step)
            client.set_terminated(run.info.run_id)


def test_paper_tasks_report_sets_each_seed_beside_the_published_band(tmp_path):
    bench = load("paper_tasks_cpu")
    uri = f"sqlite:///{tmp_path / 'bench.db'}"
    _paper_task_runs(uri, {"dm_control/cheetah-run": {0: [50.0, 300.0, 500.0], 1: [60.0, 100.0, 400.0]},
                           "dm_control/pendulum-swingup": {0: [0.0, 20.0, 700.0]}})
    tables = bench.report(uri, tmp_path / "results", reps=200)
    data = json.loads((tmp_path / "results" / "paper_tasks_cpu.json").read_text())
    assert data == {"dm_control/cheetah-run": {"0": [[24000, 50.0], [48000, 300.0], [72000, 500.0]],
                                               "1": [[24000, 60.0], [48000, 100.0], [72000, 400.0]]},
                    "dm_control/pendulum-swingup": {"0": [[24000, 0.0], [48000, 20.0], [72000, 700.0]]}}
    for stem in ("dmc_cheetah_run", "dmc_pendulum_swingup"):
        assert (tmp_path / "results" / f"paper_tasks_cpu_{stem}.png").stat().st_size > 0
    # published cheetah-run at 48k: mean 314.7, min 181.6, max 426.8; seed 1's 100.0 lies below the band
    assert "| 48,000 | 200.0 (n=2) | 314.7 | [181.6, 426.8] |" in tables and "| **no** |" in tables
    assert "| 72,000 | 700.0 (n=1) | 815.4 | [718.6, 894.8] |" in tables  # pendulum-swingup, below the band
    rows = bench.task_rows("cheetah-run", data["dm_control/cheetah-run"], reps=200)
    assert [row["in_band"] for row in rows] == [True, False, True] and rows[1]["seeds"] == 2
    rows = bench.task_rows("pendulum-swingup", data["dm_control/pendulum-swingup"], reps=200)
    assert [row["in_band"] for row in rows] == [True, True, False]
    assert not (tmp_path / "results" / "paper_tasks_cpu_gaussian.json").exists()
    # a Gaussian-actor run of the same task: its own column and file, the DIME rows unchanged
    _paper_task_runs(uri, {"dm_control/pendulum-swingup": {0: [0.0, 400.0, 800.0]}}, variant="gaussian")
    tables = bench.report(uri, tmp_path / "results", reps=200)
    assert "| 72,000 | 700.0 (n=1) | 800.0 (n=1) | 815.4 | [718.6, 894.8] |" in tables
    assert "| 48,000 | 200.0 (n=2) | 314.7 |" in tables  # cheetah-run has no Gaussian run: no column
    gaussian = json.loads((tmp_path / "results" / "paper_tasks_cpu_gaussian.json").read_text())
    assert gaussian == {"dm_control/pendulum-swingup": {"0": [[24000, 0.0], [48000, 400.0], [72000, 800.0]]}}
    assert json.loads((tmp_path / "results" / "paper_tasks_cpu.json").read_text()) == data
    # a DIME variant (the same actor class): told apart by its run name, its own column after the Gaussian one
    _paper_task_runs(uri, {"dm_control/pendulum-swingup": {0: [10.0, 30.0, 750.0]}}, variant="brn-warmup-100k")
    tables = bench.report(uri, tmp_path / "results", reps=200)
    assert "| 72,000 | 700.0 (n=1) | 800.0 (n=1) | 750.0 (n=1) | 815.4 | [718.6, 894.8] |" in tables
    assert "batch-renorm warm-up 100,000 (the paper's) |" in tables
    assert json.loads((tmp_path / "results" / "paper_tasks_cpu.json").read_text()) == data
    variant = json.loads((tmp_path / "results" / "paper_tasks_cpu_brn-warmup-100k.json").read_text())
    assert variant == {"dm_control/pendulum-swingup": {"0": [[24000, 10.0], [48000, 30.0], [72000, 750.0]]}}
    assert bench.parse_run_name("cpu-brn-warmup-100k-seed3") == ("brn-warmup-100k", 3)
    assert bench.parse_run_name("cpu-seed12") == ("diffusion", 12) and bench.parse_run_name("other-seed0") is None


def test_paper_tasks_launch_resumes_a_folder_with_checkpoints_and_skips_finished_runs(tmp_path, capsys):
    bench = load("paper_tasks_cpu")
    uri, runs = f"sqlite:///{tmp_path / 'bench.db'}", tmp_path / "runs"
    _paper_task_runs(uri, {"dm_control/cheetah-run": {1: [50.0, 300.0, 500.0]}})  # seed 1 FINISHED
    (runs / "dmc_pendulum_swingup-seed0").mkdir(parents=True)
    (runs / "dmc_pendulum_swingup-seed0" / "step-0000008000.ckpt").write_bytes(b"")  # a checkpoint: resume
    lines = bench.launch(["cheetah-run:0", "cheetah-run:1", "pendulum-swingup:0", "pendulum-swingup:0:gaussian",
                          "pendulum-swingup:0:brn-warmup-100k"], [], True, uri, runs)
    fresh, finished, resumed, gaussian, warmup = lines
    assert "--model.critic.init_args.brn_warmup_steps 100000" in warmup  # after the CPU overlay: it wins
    assert warmup.index("paper_tasks_cpu.yaml") < warmup.index("brn_warmup_steps")
    assert "--mlflow.run_name cpu-brn-warmup-100k-seed0" in warmup
    assert "conf/gaussian.yaml" in gaussian and "--mlflow.run_name cpu-gaussian-seed0" in gaussian
    assert "dmc_pendulum_swingup-gaussian-seed0" in gaussian and "--ckpt_path" not in gaussian
    assert "--config" in fresh and "dmc_cheetah_run.yaml" in fresh and "--data.total_env_steps 48000" in fresh
    assert "--seed_everything 0 --mlflow.run_name cpu-seed0" in fresh and "--ckpt_path" not in fresh
    assert finished.startswith("cheetah-run:1 FINISHED") and "skipped" in finished
    assert resumed.endswith("--ckpt_path last") and "--data.total_env_steps 96000" in resumed
    assert not list(runs.glob("*.log"))  # a dry run starts nothing
    assert bench.main(["launch", "cheetah-run:x"]) == 2
    assert "expected <task>:<seed>" in capsys.readouterr().err
    assert bench.main(["launch", "cheetah-run:0", "--cpus", "0", "1", "--dry_run"]) == 2
    assert "--cpus names 2 cores for 1 runs" in capsys.readouterr().err
