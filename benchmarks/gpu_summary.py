"""The table of benchmarks/gpu_check.sh: speed per compile mode beside the JAX anchor, and the real fit loop.

    python benchmarks/gpu_summary.py OUT_DIR > summary.md

Reads ``speed_*.json`` (benchmarks/throughput.py), ``jax.json`` (the anchor) and ``fit.json``
(benchmarks/fit_speed.py) from OUT_DIR; missing parts are reported as missing, not left out.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def summary(out: Path) -> str:
    lines = []
    gpu = (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else "cpu (dry run)"
    lines.append(f"Device: {gpu}\n")
    jax = load(out / "jax.json")
    anchor = jax["rows"][0] if jax and jax.get("rows") else None
    lines.append("| update | ms of updates per env step | ms per action (batch 1) | ms per learning step "
                 "(updates + action to host) | updates vs JAX |")
    lines.append("|---|---|---|---|---|")
    if anchor:
        lines.append(f"| JAX anchor ({jax['device']}, critic {anchor['critic_width']}) | "
                     f"{anchor['train_env_step_ms']:.2f} | {anchor['act_b1_ms']:.2f} | "
                     f"{anchor['loop_env_step_ms']:.2f} | 1.00 |")
    else:
        lines.append("| JAX anchor | missing | | | |")
    speeds = {}
    for path in sorted(out.glob("speed_*.json")):
        speeds.update({k: v for k, v in load(path)["speed"].items() if k != "device"})
    for name, row in speeds.items():
        ratio = f"{row['updates_per_env_step_ms'] / anchor['train_env_step_ms']:.2f}" if anchor else "n/a"
        lines.append(f"| {name} | {row['updates_per_env_step_ms']:.2f} | {row['act_batch1_ms']:.2f} | "
                     f"{row['learning_step_ms']:.2f} | {ratio} |")
    fit = load(out / "fit.json")
    if fit and "learning_ms_per_env_step" in fit:
        loop = f" (JAX serial loop: {anchor['loop_env_step_ms']:.2f} ms)" if anchor else ""
        modes = ", ".join(f"{k} {v}" for k, v in (fit.get("modes") or {"compile": fit["compile_update"]}).items())
        lines.append(f"\nReal fit loop ({modes}; {fit['device']}): "
                     f"{fit['learning_ms_per_env_step']:.2f} ms per env step in the learning phase{loop}, "
                     f"{fit['learning_env_steps_per_s']:.1f} env steps/s over {fit['learning_env_steps']} env steps; "
                     f"random warm-up {fit['warmup_ms_per_env_step']:.2f} ms per env step; compile and capture "
                     f"{fit.get('compile_and_capture_s', float('nan')):.1f} s.")
    else:
        lines.append("\nReal fit loop: missing")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(summary(Path(sys.argv[1])))
