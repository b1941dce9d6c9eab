"""The sqlite tracking store held under an exclusive lock by another process for a minute, mid-run.

    python benchmarks/store_lock.py --env-steps 10000 --hold 60 --out benchmarks/results/store_lock.json

Two identical smoke-size fits (Pendulum-v1, ``conf/smoke.yaml``, seed 0, CPU: deterministic), each with its
own sqlite store: the reference runs undisturbed; in the other, once its first checkpoint exists, this script
takes ``BEGIN EXCLUSIVE`` on the store (no other connection can read or write it) for ``--hold`` seconds.
Reported: env steps trained while the store was locked, both wall times, the run's final status, and whether
every metric record arrived exactly once — the (metric, env step) pairs of both runs equal, no step twice, and
the training metrics' values equal (``time/*`` values are wall-clock and differ).
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEP = re.compile(r"step-(\d+)\.ckpt")


def newest_step(folder: Path) -> int:
    return max((int(m.group(1)) for p in folder.glob("step-*.ckpt") if (m := STEP.fullmatch(p.name))), default=0)


def start(workdir: Path, env_steps: int) -> subprocess.Popen:
    workdir.mkdir(parents=True)
    command = [sys.executable, "-m", "dime_lightning.fit", "--config", str(ROOT / "conf" / "pendulum.yaml"),
               "--config", str(ROOT / "conf" / "smoke.yaml"), "--data.total_env_steps", str(env_steps),
               "--checkpoint.every_env_steps", "500", "--eval.every_env_steps", "1000",
               "--checkpoint.dirpath", str(workdir / "ckpt"), "--trainer.enable_progress_bar", "false",
               "--mlflow.tracking_uri", f"sqlite:///{workdir / 'mlflow.db'}"]
    with open(workdir / "fit.log", "w") as log:
        return subprocess.Popen(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)


def records(workdir: Path) -> tuple[str, dict[str, list[tuple[int, float]]]]:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return run.info.status, {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
                             for key in run.data.metrics}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-steps", type=int, default=10_000)
    parser.add_argument("--hold", type=float, default=60.0, help="seconds the store stays locked")
    parser.add_argument("--workdir", type=Path, default=Path("store_lock_runs"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.workdir.exists():
        sys.exit(f"{args.workdir} exists: give an empty --workdir")
    walls = {}
    for name in ("reference", "locked"):
        began = time.monotonic()
        child = start(args.workdir / name, args.env_steps)
        if name == "locked":
            while newest_step(args.workdir / name / "ckpt") == 0:
                if child.poll() is not None:
                    sys.exit(f"the fit ended before its first checkpoint: {args.workdir / name / 'fit.log'}")
                time.sleep(0.2)
            store = sqlite3.connect(args.workdir / name / "mlflow.db", isolation_level=None, timeout=60)
            store.execute("BEGIN EXCLUSIVE")
            locked_at = newest_step(args.workdir / name / "ckpt")
            time.sleep(args.hold)
            released_at = newest_step(args.workdir / name / "ckpt")
            store.execute("ROLLBACK")
            store.close()
        if child.wait() != 0:
            sys.exit(f"the {name} fit failed: {args.workdir / name / 'fit.log'}")
        walls[name] = round(time.monotonic() - began, 1)
    status_ref, reference = records(args.workdir / "reference")
    status, locked = records(args.workdir / "locked")
    twice = {key: [s for s, n in Counter(s for s, _ in values).items() if n > 1] for key, values in locked.items()}
    same_steps = {key: [s for s, _ in locked.get(key, [])] == [s for s, _ in values]
                  for key, values in reference.items()}
    same_values = {key: locked.get(key) == values for key, values in reference.items() if not key.startswith("time/")}
    result = {
        "command": " ".join(["python", "benchmarks/store_lock.py", *(argv if argv is not None else sys.argv[1:])]),
        "env_steps": args.env_steps, "hold_s": args.hold, "wall_s": walls,
        "checkpoint_step_at_lock": locked_at, "checkpoint_step_at_release": released_at,
        "status": {"reference": status_ref, "locked": status},
        "metric_keys": len(reference), "records": sum(map(len, reference.values())),
        "every_record_once": all(same_steps.values()) and not any(twice.values()) and set(locked) == set(reference),
        "training_values_equal": all(same_values.values()),
        "keys_with_other_steps": sorted(k for k, ok in same_steps.items() if not ok),
        "keys_with_other_values": sorted(k for k, ok in same_values.items() if not ok),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0 if result["every_record_once"] and status == "FINISHED" else 1


if __name__ == "__main__":
    raise SystemExit(main())
