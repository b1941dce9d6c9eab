"""DMC pendulum-swingup at CPU size beside the DIME paper's curve: PNG, JSON and the BENCHMARKS.md table.

Train (one seed, torch on one thread; stop it whenever, the table uses what was logged):

    OMP_NUM_THREADS=1 nohup python -m dime_lightning.fit --config conf/dmc_pendulum_swingup.yaml \\
        --config benchmarks/dmc_pendulum_cpu.yaml --seed_everything 0 --mlflow.run_name cpu-seed0 \\
        --mlflow.tracking_uri sqlite:///benchmarks/runs/dmc_pendulum.db \\
        --checkpoint.dirpath benchmarks/runs/dmc_pendulum_ckpt --trainer.enable_progress_bar false \\
        > benchmarks/runs/dmc_pendulum.log 2>&1 &

Then (at any time, also while it runs):

    python benchmarks/dmc_pendulum.py            # writes benchmarks/results/dmc_pendulum_swingup.{png,json}

The table has one row per evaluation of the run; where the paper evaluated at the same env step (every 24,000)
the published mean ± sd and IQM [95 % CI] stand beside it, and the run's latest evaluation is set beside the
nearest published point.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
from pathlib import Path

import numpy as np

from dime_lightning import aggregates, compare, reference

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "dm_control/pendulum-swingup"
DEVIATIONS = ("critic [256, 256] (paper [2048, 2048])", "batch-renorm warm-up 1,000 critic updates (paper 100,000)",
              "evaluation every 4,000 env steps (paper 24,000)", "CPU, torch on one thread, run cut by the session "
              "(paper 1M env steps)")


def snapshot(tracking_uri: str, folder: Path) -> str:
    """A consistent copy of an SQLite tracking database (the run may still be writing to it); other URIs as is.

    tracking_uri: MLflow tracking URI.
    folder: where the copy goes."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return tracking_uri
    source = Path(tracking_uri[len(prefix):])
    if not source.is_file():
        raise compare.CompareError(f"no tracking database at {source}")
    copy = folder / source.name
    with sqlite3.connect(source) as live, sqlite3.connect(copy) as target:
        live.backup(target)
    return f"{prefix}{copy}"


def build(tracking_uri: str, out: Path, reps: int) -> dict:
    """Curves, PNG and the table rows of the pendulum-swingup runs in ``tracking_uri``.

    tracking_uri: MLflow tracking URI of the background run's database.
    out: PNG path (the JSON goes beside it).
    reps: bootstrap replications of the IQM confidence intervals."""
    with tempfile.TemporaryDirectory() as folder:
        curves, table, _ = compare.compare(EXPERIMENT, tracking_uri=snapshot(tracking_uri, Path(folder)), out=out,
                                           reference_source="paper", reps=reps)
    ours = [c for c in curves if not c.reference_task]
    steps, published = reference.reference_seeds("dmc_pendulum_swingup")
    rows = []
    for curve in ours:
        by_step = dict(zip(curve.steps.tolist(), curve.values.tolist(), strict=True))
        last = int(curve.steps[-1])
        nearest = int(steps[np.argmin(np.abs(steps - last))])
        for step in curve.steps.tolist():
            row = {"group": curve.label, "runs": curve.runs, "env_steps": int(step),
                   "return_mean": float(np.mean(by_step[step]))}
            ref_step = int(step) if step in steps else nearest if step == last else None
            if ref_step is not None:  # a published point at this step (or the nearest one to the last step)
                ref_values = published[list(steps).index(ref_step)]
                interval = aggregates.iqm_ci(ref_values, reps=reps)
                row.update({"paper_env_steps": ref_step, "paper_mean": float(ref_values.mean()),
                            "paper_sd": float(ref_values.std(ddof=1)), "paper_iqm": interval.point,
                            "paper_iqm_low": interval.low, "paper_iqm_high": interval.high})
            rows.append(row)
    result = {"experiment": EXPERIMENT, "tracking_uri": tracking_uri, "deviations": list(DEVIATIONS), "rows": rows,
              "curves": {c.label: {"steps": c.steps.tolist(), "mean": c.mean.tolist()} for c in ours},
              "table": json.loads(table.reset_index().to_json(orient="records"))}
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    return result


def markdown(result: dict) -> str:
    """The BENCHMARKS.md table of ``result`` (from ``build``).

    result: the dictionary ``build`` returns."""
    lines = ["| env steps | this run: eval return (5 stochastic episodes) | paper: env steps | paper mean ± sd "
             "(10 seeds) | paper IQM [95 % CI] |", "|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        ours = f"| {row['env_steps']:,} | {row['return_mean']:.1f} (n={row['runs']}) |"
        if "paper_env_steps" not in row:
            lines.append(f"{ours} – | – | – |")
            continue
        lines.append(f"{ours} {row['paper_env_steps']:,} | {row['paper_mean']:.1f} ± {row['paper_sd']:.1f} | "
                     f"{row['paper_iqm']:.1f} [{row['paper_iqm_low']:.1f}, {row['paper_iqm_high']:.1f}] |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Write the PNG and JSON and print the markdown table; returns the exit code.

    argv: arguments (default: ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", default=f"sqlite:///{ROOT / 'benchmarks' / 'runs' / 'dmc_pendulum.db'}")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "dmc_pendulum_swingup.png")
    parser.add_argument("--reps", type=int, default=aggregates.DEFAULT_REPS)
    args = parser.parse_args(argv)
    try:
        result = build(args.tracking_uri, args.out, args.reps)
    except compare.CompareError as err:
        print(f"dmc_pendulum: error: {err}")
        return 2
    print(markdown(result))
    print("deviations from the paper: " + "; ".join(DEVIATIONS))
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
