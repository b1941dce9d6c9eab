"""Compare MLflow runs: learning curves grouped by a param, mean ± spread across seeds, and a summary table.

    python -m dime_lightning.compare --experiment Pendulum-v1 [--metric eval/return_mean]
        [--group-by params.model.actor.class_path] [--tracking-uri sqlite:///mlflow.db] [--out curves.png]

Each group (e.g. DIME vs Gaussian) is one curve: the mean over its runs at each env step, with a band from
the minimum to the maximum across runs. The table lists, per group, the number of runs, the final value
(mean ± std across runs, each run's last logged value) and the mean wall time.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dime_lightning.tracking import DEFAULT_TRACKING_URI

DEFAULT_GROUP = "params.model.actor.class_path"


class CompareError(ValueError):
    """An unknown experiment, metric or grouping key; the message lists what exists."""


@dataclass
class GroupCurve:
    label: str
    steps: np.ndarray  # (T,)
    mean: np.ndarray  # (T,)
    low: np.ndarray  # (T,)
    high: np.ndarray  # (T,)
    runs: int


def short_label(value: str) -> str:
    """``dime_lightning.gaussian.TanhGaussianActor`` → ``Gaussian``; other values are kept."""
    names = {"DiffusionActor": "DIME", "TanhGaussianActor": "Gaussian"}
    tail = str(value).rpartition(".")[2]
    return names.get(tail, str(value))


def find_runs(experiment: str, tracking_uri: str, group_by: str) -> pd.DataFrame:
    """Runs of ``experiment`` (FINISHED, RUNNING, KILLED, FAILED) with a ``group`` column."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise CompareError(f"unknown experiment {experiment!r}; experiments in {tracking_uri}: {names}")
    runs = _search(found.experiment_id, tracking_uri)
    if runs.empty:
        raise CompareError(f"experiment {experiment!r} has no runs")
    if group_by not in runs.columns:
        keys = sorted(c for c in runs.columns if c.startswith(("params.", "tags.")))
        raise CompareError(f"unknown --group-by {group_by!r}; available: {keys}")
    runs = runs.copy()
    runs["group"] = runs[group_by].fillna("(unset)").map(short_label)
    return runs


def _search(experiment_id: str, tracking_uri: str) -> pd.DataFrame:
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        return mlflow.search_runs([experiment_id])
    finally:
        mlflow.set_tracking_uri(previous)


def metric_histories(runs: pd.DataFrame, metric: str, tracking_uri: str) -> dict[str, pd.Series]:
    """run id → the metric's values indexed by env step."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    histories = {}
    for run_id in runs.run_id:
        points = client.get_metric_history(run_id, metric)
        if points:
            histories[run_id] = pd.Series({m.step: m.value for m in points}).sort_index()
    if not histories:
        available = sorted({c[len("metrics."):] for c in runs.columns if c.startswith("metrics.")})
        raise CompareError(f"unknown metric {metric!r} in these runs; available: {available}")
    return histories


def group_curves(runs: pd.DataFrame, histories: dict[str, pd.Series]) -> list[GroupCurve]:
    """Mean and min–max band per group over the env steps that all of the group's runs logged."""
    curves = []
    for label, members in runs.groupby("group"):
        series = [histories[r] for r in members.run_id if r in histories]
        if not series:
            continue
        table = pd.concat(series, axis=1).sort_index().dropna()  # steps logged by every run of the group
        if table.empty:  # runs on different grids: fall back to the union, forward-filled
            table = pd.concat(series, axis=1).sort_index().ffill().dropna()
        values = table.to_numpy()
        curves.append(GroupCurve(str(label), table.index.to_numpy(), values.mean(1), values.min(1),
                                 values.max(1), len(series)))
    return curves


def summary_table(runs: pd.DataFrame, histories: dict[str, pd.Series], metric: str) -> pd.DataFrame:
    rows = []
    for label, members in runs.groupby("group"):
        finals = [histories[r].iloc[-1] for r in members.run_id if r in histories]
        wall = (members.end_time - members.start_time).dt.total_seconds() / 60.0
        rows.append({"group": label, "runs": len(finals), f"final {metric}": np.mean(finals) if finals else np.nan,
                     "std": np.std(finals) if finals else np.nan, "wall minutes (mean)": wall.mean()})
    return pd.DataFrame(rows).set_index("group")


def plot_curves(curves: list[GroupCurve], metric: str, title: str, ax=None):
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 4))
    for curve in curves:
        line, = ax.plot(curve.steps, curve.mean, label=f"{curve.label} (n={curve.runs})")
        ax.fill_between(curve.steps, curve.low, curve.high, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("env steps")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return ax


def compare(experiment: str, metric: str = "eval/return_mean", group_by: str = DEFAULT_GROUP,
            tracking_uri: str = DEFAULT_TRACKING_URI, out: Path | None = None):
    """Find, group and plot; returns (curves, summary table, figure)."""
    import matplotlib.pyplot as plt

    runs = find_runs(experiment, tracking_uri, group_by)
    histories = metric_histories(runs, metric, tracking_uri)
    curves = group_curves(runs, histories)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    plot_curves(curves, metric, f"{experiment}: mean and min–max over runs", ax)
    fig.tight_layout()
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
    return curves, summary_table(runs, histories, metric), fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dime_lightning.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True, help="MLflow experiment name (default name: the env id)")
    parser.add_argument("--metric", default="eval/return_mean")
    parser.add_argument("--group-by", default=DEFAULT_GROUP, help="a run column, e.g. params.seed_everything")
    parser.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    parser.add_argument("--out", type=Path, default=Path("curves.png"))
    args = parser.parse_args(argv)
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    try:
        _, table, _ = compare(args.experiment, args.metric, args.group_by, uri, args.out)
    except CompareError as err:
        sys.stderr.write(f"dime_lightning.compare: error: {err}\n")
        return 2
    print(table.to_string(float_format=lambda v: f"{v:.4g}"))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
