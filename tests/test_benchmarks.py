"""Tiny versions of the benchmarks, so that the scripts cannot rot (they measure nothing here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
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
    setup = json.loads(out.read_text())["setups"]["1 process, 1 thread"]
    assert setup["env_steps_per_s"] > 0 and setup["updates_per_s"] == 2 * setup["env_steps_per_s"]


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
    assert "paper_size_critic2048/none" in summary and "Real fit loop (none, cpu)" in summary
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
