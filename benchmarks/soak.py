"""Soak: a long smoke-size fit through the real CLI, its memory (RSS) and open file descriptors sampled.

    python benchmarks/soak.py --env-steps 20000 --every 10 --out benchmarks/results/soak.json

The fit (Pendulum-v1 at ``conf/smoke.yaml`` sizes, MLflow on its sqlite store, a checkpoint with a buffer dump
every ``--checkpoint-every`` env steps, an evaluation every ``--eval-every``) runs as a child process; every
``--every`` seconds its RSS and open descriptors are read (``psutil``) with the env step of its newest
checkpoint. Growth per 1k env steps is the least-squares slope over the samples after the first checkpoint
(the buffer is allocated whole at the first env step; the first minute holds imports and the first
compilation of nothing: everything is eager here).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
STEP = re.compile(r"step-(\d+)\.ckpt")


def newest_step(folder: Path) -> int:
    steps = [int(m.group(1)) for p in folder.glob("step-*.ckpt") if (m := STEP.fullmatch(p.name))]
    return max(steps, default=0)


def slope_per_1k(samples: list[dict], key: str) -> float:
    xs = np.array([s["env_steps"] for s in samples], dtype=float)
    ys = np.array([s[key] for s in samples], dtype=float)
    if len(samples) < 2 or np.ptp(xs) == 0:
        return float("nan")
    return float(np.polyfit(xs, ys, 1)[0] * 1000)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-steps", type=int, default=20_000)
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--checkpoint-every", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=2000)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        folder = Path(workdir) / "ckpt"
        command = [sys.executable, "-m", "dime_lightning.fit", "--config", str(ROOT / "conf" / "pendulum.yaml"),
                   "--config", str(ROOT / "conf" / "smoke.yaml"), "--data.total_env_steps", str(args.env_steps),
                   "--checkpoint.every_env_steps", str(args.checkpoint_every), "--eval.every_env_steps",
                   str(args.eval_every), "--checkpoint.dirpath", str(folder), "--trainer.enable_progress_bar",
                   "false", "--mlflow.tracking_uri", f"sqlite:///{Path(workdir) / 'mlflow.db'}"]
        started = time.monotonic()
        with open(Path(workdir) / "fit.log", "w") as log:
            child = subprocess.Popen(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
        process, samples = psutil.Process(child.pid), []
        while child.poll() is None:
            try:
                with process.oneshot():
                    sample = {"seconds": round(time.monotonic() - started, 1), "env_steps": newest_step(folder),
                              "rss_mib": process.memory_info().rss / 2**20, "open_fds": process.num_fds()}
            except psutil.NoSuchProcess:
                break
            if not (sample["rss_mib"] and sample["open_fds"]):  # exited, not yet reaped: reads as 0 MiB, 0 fds
                break
            samples.append(sample)
            time.sleep(args.every)
        code = child.wait()
        tail = (Path(workdir) / "fit.log").read_text()[-2000:]
    if code != 0:
        print(tail, file=sys.stderr)
        return 1
    steady = [s for s in samples if s["env_steps"] >= args.checkpoint_every]
    result = {
        "command": " ".join(["python", "benchmarks/soak.py", *(argv if argv is not None else sys.argv[1:])]),
        "env_steps": args.env_steps, "wall_s": round(time.monotonic() - started, 1),
        "rss_mib_growth_per_1k_env_steps": slope_per_1k(steady, "rss_mib"),
        "open_fds_growth_per_1k_env_steps": slope_per_1k(steady, "open_fds"),
        "rss_mib_first_last": [steady[0]["rss_mib"], steady[-1]["rss_mib"]] if steady else None,
        "open_fds_first_last": [steady[0]["open_fds"], steady[-1]["open_fds"]] if steady else None,
        "samples": samples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
